"""A tiny FP8 checkpoint as DeepSeek ships V3/R1 (e4m3 weights, one float32 `weight_scale_inv` per block),
written with torch independently of r1jax's own safetensors code; shared by the FP8 import tests."""

import json
import math
from pathlib import Path
from typing import NamedTuple

import jax
import ml_dtypes
import numpy as np

from r1jax import config, model
from r1jax.interop import hf
from r1jax.nn import layers

F8 = ml_dtypes.float8_e4m3fn
# The tiny preset balances faster than V3 (gamma 0.01); config.json has no field for that training knob,
# so configs compared after an HF round trip use the default.
KNOB = "compute.bias_update_speed=0.001"


def reference_dequant(q, scale_inv, block):
  """Each weight times the scale of its tile, the scale grid blown up with a Kronecker product."""
  rows, cols = q.shape
  return (q.astype(np.float64) * np.kron(scale_inv, np.ones(block))[:rows, :cols]).astype(np.float32)


def quantize(w, block):
  """DeepSeek's weight quantisation, tile by tile: scale = max(amax, 1e-4) / 448, q = e4m3(w / scale)."""
  rows, cols = w.shape
  scale = np.zeros((math.ceil(rows / block[0]), math.ceil(cols / block[1])), np.float32)
  q = np.zeros(w.shape, F8)
  for i in range(scale.shape[0]):
    for j in range(scale.shape[1]):
      tile = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
      scale[i, j] = max(np.abs(w[tile]).max(), 1e-4) / 448.0
      q[tile] = (w[tile] / scale[i, j]).astype(F8)
  return q, scale


def is_quantized(name, t):
  """DeepSeek quantises every linear weight but the embedding, the heads and the router."""
  keep = ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate.weight")
  return t.ndim == 2 and not any(k in name for k in keep)


def write(directory: Path, tensors: dict, raw_config: dict):
  import safetensors.torch

  directory.mkdir()
  safetensors.torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(raw_config))


class FP8Checkpoint(NamedTuple):
  fp8_dir: Path
  ref_dir: Path  # the same weights, dequantised by numpy, as a plain float32 checkpoint
  cfg: config.ModelConfig
  params: dict  # the float32 weights the FP8 ones were quantised from
  tensors: dict  # name -> torch tensor of the FP8 checkpoint


def build(tmp: Path, block: tuple[int, int]) -> FP8Checkpoint:
  """The tiny preset's random weights exported by r1jax, then quantised in `block` tiles."""
  import safetensors.torch
  import torch

  cfg = config.load(Path(__file__).parent.parent / "configs" / "tiny.yaml", ["compute.dtype=float32", KNOB])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: (0.05 * rng.normal(size=p.value.shape)).astype(p.value.dtype),
                        model.abstract(cfg.model, cfg.compute), is_leaf=layers.is_param)
  hf.export_hf(params, cfg.model, cfg.compute, tmp / "f32")
  raw = json.loads((tmp / "f32" / "config.json").read_text())
  original = safetensors.torch.load_file(next((tmp / "f32").glob("*.safetensors")))
  fp8, dequantized = {}, {}
  for name, t in original.items():
    if is_quantized(name, t):
      q, scale = quantize(t.numpy(), block)
      fp8[name] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
      fp8[name[:-len("weight")] + "weight_scale_inv"] = torch.from_numpy(scale)
      dequantized[name] = torch.from_numpy(reference_dequant(q, scale, block))
    else:
      fp8[name] = dequantized[name] = t
  quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
  write(tmp / "fp8", fp8, {**raw, "quantization_config": quant})
  write(tmp / "reference", dequantized, raw)
  return FP8Checkpoint(tmp / "fp8", tmp / "reference", cfg.model, params, fp8)
