"""`r1jax import-hf` and `r1jax export-hf`: a Hugging Face model directory to an r1jax checkpoint and back."""

from __future__ import annotations

from pathlib import Path

import jax

from r1jax import checkpoint, sharding
from r1jax.cli.common import fail, setup_logging
from r1jax.interop import hf, hf_config
from r1jax.interop.hf_weights import CheckpointError


def import_command(model_dir: str, out: str, overrides=()) -> int:
  """`r1jax import-hf DIR OUT [k=v ...]`: HF directory -> r1jax checkpoint (checkpoint.py) on cfg.mesh."""
  setup_logging()
  cfg = hf.read_config(model_dir, overrides)
  if Path(out).exists() and any(Path(out).iterdir()):
    return fail(f"{out} is not empty; choose a new checkpoint directory")
  try:
    params = hf.load_params(model_dir, cfg.model, cfg.compute, sharding.make_mesh(cfg.mesh))
  except CheckpointError as e:
    return fail(f"checkpoint error: {e}")
  path = checkpoint.save_params(out, params, cfg)
  copied = hf.copy_tokenizer(model_dir, path / checkpoint.TOKENIZER)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"imported {hf_config.architecture(hf.raw_config(Path(model_dir)))} ({n:,} parameters) into {path}"
        + (f"; its tokenizer ({', '.join(copied)}) into {path / checkpoint.TOKENIZER}" if copied else
           "; no tokenizer.json beside it (give data.tokenizer yourself)"))
  return 0


def export_command(ckpt: str, out: str, overrides=(), arch: str | None = None, dtype: str | None = None,
                   max_shard_gb: float = 5.0) -> int:
  """`r1jax export-hf CKPT DIR`: r1jax checkpoint -> HF directory (config.json, shards, index)."""
  setup_logging()
  cfg = checkpoint.load_config(ckpt, overrides)
  try:
    hf.check_out_dir(out)  # before any weight is read
  except FileExistsError as e:
    return fail(str(e))
  params = checkpoint.load_params(ckpt, cfg, sharding.make_mesh(cfg.mesh))
  try:
    hf.export_hf(params, cfg.model, cfg.compute, out, arch=arch, dtype=dtype, max_shard_bytes=int(max_shard_gb * 2**30))
  except FileExistsError as e:
    return fail(str(e))
  if Path(cfg.data.tokenizer).is_dir():  # the run's HF tokenizer goes with the model
    hf.copy_tokenizer(cfg.data.tokenizer, out)
  print(f"exported {arch or hf_config.default_arch(cfg.model)} to {out}")
  return 0


def import_hf(args) -> int:
  return import_command(args.dir, args.out, args.overrides)


def export_hf(args) -> int:
  return export_command(args.ckpt, args.dir, args.overrides, args.arch, args.dtype, args.max_shard_gb)
