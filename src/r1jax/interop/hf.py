"""Hugging Face interop: read a model directory (config.json + safetensors shards, with or without the index)
into an r1jax config and parameters placed in their shardings on a mesh, and write one back.

Supported: DeepseekV3ForCausalLM (V3/R1, FP8 block-scaled or not, with MTP layers), DeepseekV2ForCausalLM
(V2-Lite), and the dense students Qwen2ForCausalLM and LlamaForCausalLM. Needs no torch."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from r1jax import config as config_lib
from r1jax import model, sharding
from r1jax.config import ConfigError, MeshConfig, ModelConfig, RunConfig
from r1jax.interop import hf_config, hf_weights
from r1jax.interop.hf_weights import CheckpointError
from r1jax.interop.safetensors_io import Checkpoint, ShardWriter
from r1jax.nn import layers

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "read_config", "load_params", "import_hf", "export_hf"]


def _raw_config(model_dir: Path) -> dict:
  path = Path(model_dir) / "config.json"
  if not path.exists():
    raise ConfigError(f"{path} does not exist")
  return json.loads(path.read_text())


def read_config(model_dir: str | Path, overrides=()) -> RunConfig:
  """The r1jax config of an HF model directory (model section from config.json), then `overrides`.

  DeepSeek's MTP layers (after num_hidden_layers) are imported when present; transformers drops them on save,
  so when absent the model gets n_mtp=0 and a log line says so. `model.n_mtp=0` skips present ones.
  """
  fields, info = hf_config.from_hf(_raw_config(model_dir))
  if info.n_mtp:
    first = f"model.layers.{fields['n_layers']}."
    if any(name.startswith(first) for name in Checkpoint(model_dir).keys()):
      fields["n_mtp"] = info.n_mtp
    else:
      log.warning("config.json declares %d MTP layer(s) but the checkpoint has no %s* tensors (transformers "
                  "drops MTP when saving): importing without MTP (model.n_mtp=0)", info.n_mtp, first)
  return config_lib.apply_overrides(RunConfig(model=ModelConfig(**fields)), overrides)


def _single_device_mesh():
  return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def load_params(model_dir: str | Path, cfg: ModelConfig, mesh=None, keep_fp8: bool = False) -> dict:
  """Parameters of `cfg` from the checkpoint, each array assembled straight into its target sharding.

  Every device reads only its own slice (tensor by tensor from memory-mapped shards, FP8 dequantised on the
  fly), so host memory stays near one HF tensor plus the slices being placed.
  """
  model_dir = Path(model_dir)
  info = hf_config.from_hf(_raw_config(model_dir))[1]
  if keep_fp8:
    raise ConfigError("keep_fp8: keeping FP8 weights needs FP8 training support (fp8.py), which this build "
                      "lacks; import dequantises FP8 checkpoints to model.param_dtype")
  ckpt = Checkpoint(model_dir)
  abstract = model.abstract(cfg)
  leaves = hf_weights.plan(cfg, abstract, info)
  not_read = hf_weights.check(ckpt, leaves, cfg, info)
  if info.fp8_block:
    log.info("dequantising FP8 weights (%dx%d blocks) to %s", *info.fp8_block, cfg.param_dtype)
  mesh = mesh if mesh is not None else _single_device_mesh()
  flat_shardings = jax.tree.leaves(layers.shardings(abstract, mesh))
  arrays = [jax.make_array_from_callback(leaf.shape, s, hf_weights.reader(ckpt, leaf, info))
            for leaf, s in zip(leaves, flat_shardings)]
  params = jax.tree.unflatten(jax.tree.structure(abstract, is_leaf=layers.is_param), arrays)
  if "lm_head.weight" in not_read:
    _check_tied_head(ckpt, info)
  return params


def _check_tied_head(ckpt, info):
  """Tied checkpoints sometimes still store lm_head.weight; it must then equal the embedding."""
  head = hf_weights.read_tensor(ckpt, "lm_head.weight", info)
  if not np.array_equal(head, hf_weights.read_tensor(ckpt, "model.embed_tokens.weight", info)):
    raise CheckpointError("tensor lm_head.weight differs from model.embed_tokens.weight although "
                          "tie_word_embeddings is true")
  log.info("lm_head.weight equals the tied embedding; not stored separately")


def import_hf(model_dir: str | Path, mesh=None, overrides=(), keep_fp8: bool = False) -> tuple[RunConfig, dict]:
  """(config, params) of an HF model directory; params placed on `mesh` (default: one device)."""
  cfg = read_config(model_dir, overrides)
  return cfg, load_params(model_dir, cfg.model, mesh, keep_fp8)


_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _hf_tensors(params: dict, cfg: ModelConfig, arch: str, dtype: np.dtype):
  """(name, array) of every HF tensor, one r1jax leaf on the host at a time."""
  info = hf_config.HFInfo(arch=arch)
  leaves = hf_weights.plan(cfg, model.abstract(cfg), info)
  host = {}
  for leaf, value in zip(leaves, jax.tree.leaves(params)):
    value = np.asarray(jax.device_get(value))
    if leaf.path[0] in ("embed", "head") and cfg.n_mtp:
      host[leaf.path[0]] = value
    if leaf.template is None:
      if np.any(value):
        raise ConfigError(f"parameter {'/'.join(leaf.path)} is nonzero but {arch} has no such tensor")
      continue
    keep_fp32 = "router" in leaf.path  # transformers keeps the router in float32 (_keep_in_fp32_modules)
    out_dtype = np.dtype(np.float32) if keep_fp32 else dtype
    for i, (layer, e) in enumerate(leaf.indices()):
      piece = value.reshape(-1, *leaf.piece_shape)[i] if leaf.n_lead else value
      yield leaf.name(layer, e), hf_weights.to_hf(leaf, piece).astype(out_dtype)
  head = host.get("embed") if cfg.tie_embeddings else host.get("head", np.zeros(0)).T
  for layer in range(cfg.n_layers, cfg.n_layers + cfg.n_mtp):  # DeepSeek's layout repeats them per MTP layer
    yield f"model.layers.{layer}.embed_tokens.weight", host["embed"].astype(dtype)
    yield f"model.layers.{layer}.shared_head.head.weight", np.ascontiguousarray(head).astype(dtype)


def export_hf(params: dict, cfg: ModelConfig, out_dir: str | Path, arch: str | None = None,
              dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
  """Write config.json, safetensors shards and their index for `arch` (default: the one `cfg` describes).

  `dtype` ("float32"/"bfloat16", default: cfg.param_dtype) applies to all weights but the router (float32).
  """
  arch = arch or hf_config.default_arch(cfg)
  dtype = dtype or cfg.param_dtype
  if dtype not in _DTYPES:
    raise ConfigError(f"dtype {dtype!r}: supported: {list(_DTYPES)}")
  out_dir = Path(out_dir)
  hf_cfg = hf_config.to_hf(cfg, arch, dtype)  # raises before anything is written
  if out_dir.exists() and any(out_dir.glob("*.safetensors")):
    raise FileExistsError(f"{out_dir} already holds safetensors files; choose a new directory")
  writer = ShardWriter(out_dir, max_shard_bytes)
  for name, t in _hf_tensors(params, cfg, arch, _DTYPES[dtype]):
    writer.add(name, t)
  writer.close()
  (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
  return out_dir


def _cli_logging():
  """Show r1jax's own INFO lines (MTP, FP8, tied head) without other libraries' chatter."""
  logger = logging.getLogger("r1jax")
  if not logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("r1jax: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # a library may have configured the root logger too; print once
  logger.setLevel(logging.INFO)


def _fail(message: str) -> int:
  print(f"r1jax: {message}", file=sys.stderr)
  return 2


def import_command(model_dir: str, out: str, overrides=()) -> int:
  """`r1jax import-hf DIR OUT [k=v ...]`: HF directory -> r1jax checkpoint (checkpoint.py) on cfg.mesh."""
  from r1jax import checkpoint

  _cli_logging()
  cfg = read_config(model_dir, overrides)
  if (Path(out) / checkpoint.PARAMS).exists():
    return _fail(f"{Path(out) / checkpoint.PARAMS} already exists; choose a new checkpoint directory")
  try:
    params = load_params(model_dir, cfg.model, sharding.make_mesh(cfg.mesh))
  except CheckpointError as e:
    return _fail(f"checkpoint error: {e}")
  path = checkpoint.save_params(out, params, cfg)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"imported {hf_config.architecture(_raw_config(Path(model_dir)))} ({n:,} parameters) into {path}")
  return 0


def export_command(ckpt: str, out: str, overrides=(), arch: str | None = None, dtype: str | None = None,
                   max_shard_gb: float = 5.0) -> int:
  """`r1jax export-hf CKPT DIR`: r1jax checkpoint -> HF directory (config.json, shards, index)."""
  from r1jax import checkpoint

  _cli_logging()
  cfg = checkpoint.load_config(ckpt, overrides)
  params = checkpoint.load_params(ckpt, cfg, sharding.make_mesh(cfg.mesh))
  try:
    export_hf(params, cfg.model, out, arch=arch, dtype=dtype, max_shard_bytes=int(max_shard_gb * 2**30))
  except FileExistsError as e:
    return _fail(str(e))
  print(f"exported {arch or hf_config.default_arch(cfg.model)} to {out}")
  return 0
