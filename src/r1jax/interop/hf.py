"""Hugging Face interop: read a model directory (config.json + safetensors shards, with or without the index)
into an r1jax config and parameters placed in their shardings on a mesh, and write one back.

Supported: DeepseekV3ForCausalLM (V3/R1, FP8 block-scaled or not, with MTP layers), DeepseekV2ForCausalLM
(V2-Lite), and the dense students Qwen2ForCausalLM and LlamaForCausalLM. Needs no torch."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax import config as config_lib
from r1jax import model, sharding
from r1jax.config import ComputeConfig, ConfigError, MeshConfig, ModelConfig, RunConfig
from r1jax.interop import hf_config, hf_weights
from r1jax.interop.hf_weights import CheckpointError
from r1jax.interop.safetensors_io import Checkpoint, ShardWriter
from r1jax.nn import fp8, layers

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "read_config", "load_params", "import_hf", "export_hf"]


def raw_config(model_dir: Path) -> dict:
  """Parsed config.json; a malformed one is a one-line ConfigError at file:line:col, not a traceback."""
  path = Path(model_dir) / "config.json"
  if not path.exists():
    raise ConfigError(f"{path} does not exist")
  try:
    raw = json.loads(path.read_bytes())  # bytes: JSON's own UTF-8/16/32 detection, not the locale's encoding
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: invalid JSON (not UTF-8: {e.reason} at byte {e.start})") from None
  if not isinstance(raw, dict):
    kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(raw), "a number")
    raise ConfigError(f"{path}: expected a JSON object of config fields, got {kind}")
  return raw


def read_config(model_dir: str | Path, overrides=()) -> RunConfig:
  """The r1jax config of an HF model directory (model section from config.json), then `overrides`.

  DeepSeek's MTP layers (after num_hidden_layers) are imported when present; transformers drops them on save,
  so when absent the model gets n_mtp=0 and a log line says so. `model.n_mtp=0` skips present ones.
  """
  fields, compute, info = hf_config.from_hf(raw_config(model_dir))
  if info.n_mtp:
    first = f"model.layers.{fields['n_layers']}."
    if any(name.startswith(first) for name in Checkpoint(model_dir).keys()):
      fields["n_mtp"] = info.n_mtp
    else:
      log.warning("config.json declares %d MTP layer(s) but the checkpoint has no %s* tensors (transformers "
                  "drops MTP when saving): importing without MTP (model.n_mtp=0)", info.n_mtp, first)
  return config_lib.apply_overrides(RunConfig(model=ModelConfig(**fields), compute=ComputeConfig(**compute)), overrides)


def _single_device_mesh():
  return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def load_params(model_dir: str | Path, cfg: ModelConfig, compute: ComputeConfig, mesh=None,
                keep_fp8: bool = False) -> dict:
  """Parameters of `cfg` from the checkpoint, each array assembled straight into its target sharding.

  Every device reads only its own slice (tensor by tensor from memory-mapped shards, FP8 dequantised on the
  fly), so host memory stays near one HF tensor plus the slices being placed. `keep_fp8` (inference only)
  keeps the e4m3 weights of the matmuls compute.fp8 runs in FP8 as fp8.weights.QuantizedWeight.
  """
  model_dir = Path(model_dir)
  info = hf_config.from_hf(raw_config(model_dir), quiet=True)[2]  # read_config already noted the mapping
  if keep_fp8 and not compute.fp8.enabled:
    raise ConfigError("keep_fp8 needs compute.fp8.enabled=true (kept e4m3 weights run only in FP8 GEMMs): set it, "
                      "or import without keep_fp8 to dequantise to compute.param_dtype")
  ckpt = Checkpoint(model_dir)
  abstract = model.abstract(cfg, compute)
  leaves = hf_weights.plan(cfg, abstract, info)
  not_read = hf_weights.check(ckpt, leaves, cfg, info)
  kept = _kept_fp8(ckpt, leaves, compute, info) if keep_fp8 else [False] * len(leaves)
  if info.fp8_block and not keep_fp8:
    log.info("dequantising FP8 weights (%dx%d blocks) to %s", *info.fp8_block, compute.param_dtype)
  mesh = mesh if mesh is not None else _single_device_mesh()
  boxed = jax.tree.leaves(abstract, is_leaf=layers.is_param)
  arrays = [_place(ckpt, leaf, p, keep, compute.fp8.block, mesh, info) for leaf, p, keep in zip(leaves, boxed, kept)]
  params = jax.tree.unflatten(jax.tree.structure(abstract, is_leaf=layers.is_param), arrays)
  if "lm_head.weight" in not_read:
    _check_tied_head(ckpt, info)
  return params


def _kept_fp8(ckpt, leaves: list[hf_weights.Leaf], compute: ComputeConfig, info) -> list[bool]:
  """Which leaves keep_fp8 keeps: FP8 in the checkpoint, FP8 in compute.fp8, tiles that are r1jax's tiles. The
  others are dequantised, listed in one log line."""
  kept, dequantised = [], []
  for leaf in leaves:
    if not hf_weights.is_fp8(ckpt, leaf):
      kept.append(False)
      continue
    part = model.fp8_part(leaf.path)
    why = ("it stays high precision" if part is None else f"compute.fp8.{part} is off" if not compute.fp8.use(part)
           else hf_weights.fp8_misfit(leaf, info, compute.fp8.block))
    kept.append(why is None)
    if why:
      dequantised.append(f"{'/'.join(leaf.path)} ({why})")
  if info.fp8_block is None:  # a full-precision import where a one-byte one was asked for: refuse it
    raise ConfigError("keep_fp8: the checkpoint holds no FP8 weights; import without keep_fp8")
  if not any(kept):
    reasons = sorted({d[d.index(" (") + 2:-1] for d in dequantised})
    raise ConfigError(f"keep_fp8: no FP8 weight fits compute.fp8, nothing would be kept: {'; '.join(reasons)}")
  else:
    log.info("keep_fp8: keeping %d weights as e4m3 with %dx%d block scales", sum(kept), *info.fp8_block)
  if dequantised:
    log.info("keep_fp8: dequantising %s", "; ".join(dequantised))
  return kept


def _place(ckpt, leaf: hf_weights.Leaf, p: layers.Param, keep: bool, block: int, mesh, info):
  """One parameter read straight into its sharding: an array, or a QuantizedWeight of two for a kept leaf."""
  if not keep:
    s = layers.shardings(p, mesh)
    return jax.make_array_from_callback(leaf.shape, s, hf_weights.reader(ckpt, leaf, info))
  s = layers.shardings(layers.Param(fp8.weights.abstract(leaf.shape, block), p.names), mesh)
  q_leaf, scale_leaf = hf_weights.fp8_leaves(leaf, block)
  q = hf_weights.reader(ckpt, q_leaf, info, hf_weights.e4m3_tensor(ckpt, leaf))
  scale = hf_weights.reader(ckpt, scale_leaf, info, hf_weights.scale_tensor(ckpt, scale_leaf))
  return fp8.weights.QuantizedWeight(jax.make_array_from_callback(q_leaf.shape, s.q_KxN, q),
                                     jax.make_array_from_callback(scale_leaf.shape, s.scale_KbxNb, scale))


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
  return cfg, load_params(model_dir, cfg.model, cfg.compute, mesh, keep_fp8)


_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _piece_to_host(x) -> np.ndarray:
  """The one device->host copy of export: a fully replicated piece, so every process holds all of it."""
  return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def _mesh_axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _exact_from_owner(x, is_owner, axes):
  """The value held where `is_owner`, on every device of `axes`: a psum of its bits (zeros elsewhere), so
  -0.0 and NaN payloads survive."""
  width = x.dtype.itemsize
  bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.int32, 8: jnp.int64}[width])
  total = jax.lax.psum(jnp.where(is_owner, bits, 0).astype(jnp.int32 if width < 4 else bits.dtype), axes)
  return jax.lax.bitcast_convert_type(total.astype(bits.dtype), x.dtype)


def _piece_fn(leaf: hf_weights.Leaf, value):
  """f(value, idx) = value[idx] for idx over the leaf's lead (layer, expert) axes, replicated on every device of
  `value`'s mesh; idx is traced, so no piece compiles anew."""
  if not isinstance(value, jax.Array):  # host numpy: nothing to gather
    return lambda x, idx: x[tuple(idx)]
  s = value.sharding
  if isinstance(s, NamedSharding):
    return _extractor(s.mesh, tuple(s.spec) + (None,) * (value.ndim - len(s.spec)), leaf.n_lead)
  if len(s.device_set) == 1:
    return _extractor(Mesh(np.array(list(s.device_set)), ("device",)), (None,) * value.ndim, leaf.n_lead)
  raise ValueError(f"parameter {'/'.join(leaf.path)}: export needs a NamedSharding (as model.init and "
                   f"load_params place parameters), got {s}")


@functools.lru_cache(maxsize=64)  # leaves alike in layout share one; a repeated export compiles nothing
def _extractor(mesh: Mesh, spec: tuple, n_lead: int):
  """jit(shard_map) behind _piece_fn. A plain dynamic slice along a sharded axis makes XLA all-gather that whole
  axis first (every layer's experts on each device); here the owning shard slices and one piece crosses devices."""

  def local(x, idx):
    for d in range(n_lead):  # x's leading axis is always the next lead axis
      axes, n_local = _mesh_axes(spec[d]), x.shape[0]
      x = jax.lax.dynamic_index_in_dim(x, idx[d] % n_local, 0, keepdims=False)
      if axes:
        x = _exact_from_owner(x, jax.lax.axis_index(axes) == idx[d] // n_local, axes)
    for d, entry in enumerate(spec[n_lead:]):
      if _mesh_axes(entry):
        x = jax.lax.all_gather(x, _mesh_axes(entry), axis=d, tiled=True)
    return x

  # check_vma=False: the public all_gather's result is typed as still varying, though it is replicated.
  take = jax.shard_map(local, mesh=mesh, in_specs=(P(*spec), P()), out_specs=P(), check_vma=False)
  replicated = NamedSharding(mesh, P())
  return jax.jit(take, in_shardings=(NamedSharding(mesh, P(*spec)), replicated), out_shardings=replicated)


def _pieces(leaf: hf_weights.Leaf, value, take):
  """(layer, expert, piece in r1jax layout) for each HF tensor of one leaf, one piece on the host at a time."""
  for idx, (layer, e) in zip(np.ndindex(*leaf.shape[:leaf.n_lead]), leaf.indices()):
    yield layer, e, _piece_to_host(take(value, np.asarray(idx, np.int32)))


def _hf_tensors(params: dict, cfg: ModelConfig, arch: str, dtype: np.dtype):
  """(name, array) of every HF tensor, extracted on device and copied to the host one HF tensor at a time.

  Every process must run this in the same order (the extractions are collectives).
  """
  info = hf_config.HFInfo(arch=arch)
  leaves = hf_weights.plan(cfg, model.abstract(cfg), info)
  top = {}
  for leaf, value in zip(leaves, jax.tree.leaves(params)):
    take = _piece_fn(leaf, value)
    if leaf.path[0] in ("embed", "head"):
      top[leaf.path[0]] = (leaf, value, take)  # not their host copies: the MTP copies pull them again at the end
    if leaf.template is None:
      if any(np.any(piece) for _, _, piece in _pieces(leaf, value, take)):
        raise ConfigError(f"parameter {'/'.join(leaf.path)} is nonzero but {arch} has no such tensor")
      continue
    keep_fp32 = "router" in leaf.path  # transformers keeps the router in float32 (_keep_in_fp32_modules)
    out_dtype = np.dtype(np.float32) if keep_fp32 else dtype
    for layer, e, piece in _pieces(leaf, value, take):
      yield leaf.name(layer, e), hf_weights.to_hf(leaf, piece).astype(out_dtype)
  if not cfg.n_mtp:
    return
  mtp_layers = range(cfg.n_layers, cfg.n_layers + cfg.n_mtp)  # DeepSeek's layout repeats them per MTP layer
  for src, name in [("embed", "embed_tokens.weight"), ("head", "shared_head.head.weight")]:
    leaf, value, take = top["embed" if cfg.tie_embeddings else src]
    [(_, _, piece)] = _pieces(leaf, value, take)
    t = hf_weights.to_hf(leaf, piece).astype(dtype)
    for layer in mtp_layers:
      yield f"model.layers.{layer}.{name}", t


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def copy_tokenizer(model_dir: str | Path, out_dir: str | Path) -> list[str]:
  """A Hugging Face directory's tokenizer files (those present of TOKENIZER_FILES) into out_dir; none
  without a tokenizer.json. Returns the names copied."""
  import shutil

  src = Path(model_dir)
  if not (src / "tokenizer.json").is_file():
    return []
  names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
  if jax.process_index() == 0:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name in names:
      shutil.copyfile(src / name, Path(out_dir) / name)
  return names


def check_out_dir(out_dir: str | Path):
  """FileExistsError if `out_dir` already holds a model: an export never overwrites one."""
  out_dir = Path(out_dir)
  if out_dir.exists() and (any(out_dir.glob("*.safetensors")) or (out_dir / "config.json").exists()):
    raise FileExistsError(f"{out_dir} already holds a model (config.json or safetensors files); choose a new "
                          "directory")


def export_hf(params: dict, cfg: ModelConfig, compute: ComputeConfig, out_dir: str | Path, arch: str | None = None,
              dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
  """Write config.json, safetensors shards and their index for `arch` (default: the one `cfg` describes).

  `dtype` ("float32"/"bfloat16", default: compute.param_dtype) applies to all weights but the router (float32).
  Host memory stays near one HF tensor plus the shard being filled; in multi-process runs every process must
  call this, and process 0 writes.
  """
  if (kept := fp8.weights.first_quantized(params)) is not None:
    raise ConfigError(f"export_hf: parameter {kept} is a keep_fp8 e4m3 weight; export params imported without "
                      "keep_fp8")
  arch = arch or hf_config.default_arch(cfg)
  dtype = dtype or compute.param_dtype
  if dtype not in _DTYPES:
    raise ConfigError(f"dtype {dtype!r}: supported: {list(_DTYPES)}")
  out_dir = Path(out_dir)
  hf_cfg = hf_config.to_hf(cfg, compute, arch, dtype)  # raises before anything is written
  check_out_dir(out_dir)
  writer = ShardWriter(out_dir, max_shard_bytes) if jax.process_index() == 0 else None
  for name, t in _hf_tensors(params, cfg, arch, _DTYPES[dtype]):  # every process runs the same extractions
    if writer:
      writer.add(name, t)
  if writer:
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
  return out_dir
