"""FP8 checkpoints as DeepSeek ships V3/R1: e4m3 weights with one float32 `weight_scale_inv` per block
(128x128; 32x32 here). Import must dequantise to what an independent numpy implementation computes."""

import json
import math
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from r1jax import config, model
from r1jax.interop import hf, hf_weights
from r1jax.nn import layers

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

F8 = ml_dtypes.float8_e4m3fn
BLOCK = (32, 32)


# The tiny preset balances faster than V3 (gamma 0.01); config.json has no field for that training knob,
# so configs compared after an HF round trip use the default.
KNOB = "model.bias_update_speed=0.001"

def _reference_dequant(q, scale_inv, block):
  """Each weight times the scale of its tile, the scale grid blown up with a Kronecker product."""
  rows, cols = q.shape
  return (q.astype(np.float64) * np.kron(scale_inv, np.ones(block))[:rows, :cols]).astype(np.float32)


def _quantize(w, block):
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


@pytest.mark.parametrize("shape,block", [((40, 72), (16, 32)), ((128, 256), (128, 128)), ((7, 5), (4, 4))])
def test_dequantize_matches_independent_numpy(shape, block):
  rng = np.random.default_rng(0)
  q = rng.uniform(-448, 448, size=shape).astype(F8)
  scale = rng.uniform(1e-4, 1e-2, size=(math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])))
  scale = scale.astype(np.float32)
  np.testing.assert_array_equal(hf_weights.dequantize(q, scale, block), _reference_dequant(q, scale, block))


def _is_quantized(name, t):
  """DeepSeek quantises every linear weight but the embedding, the heads and the router."""
  keep = ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate.weight")
  return t.ndim == 2 and not any(k in name for k in keep)


def _write(directory: Path, tensors: dict, raw_config: dict):
  directory.mkdir()
  safetensors_torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(raw_config))


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
  """(fp8 dir, dir holding the numpy-dequantised float32 weights, the model config, original params)."""
  tmp = tmp_path_factory.mktemp("fp8")
  cfg = config.load(Path(__file__).parent.parent / "configs" / "tiny.yaml", ["model.dtype=float32", KNOB]).model
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: (0.05 * rng.normal(size=p.value.shape)).astype(p.value.dtype),
                        model.abstract(cfg), is_leaf=layers.is_param)
  hf.export_hf(params, cfg, tmp / "f32")
  raw = json.loads((tmp / "f32" / "config.json").read_text())
  original = safetensors_torch.load_file(next((tmp / "f32").glob("*.safetensors")))
  fp8, dequantized = {}, {}
  for name, t in original.items():
    if _is_quantized(name, t):
      q, scale = _quantize(t.numpy(), BLOCK)
      fp8[name] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
      fp8[name[:-len("weight")] + "weight_scale_inv"] = torch.from_numpy(scale)
      dequantized[name] = torch.from_numpy(_reference_dequant(q, scale, BLOCK))
    else:
      fp8[name] = dequantized[name] = t
  quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
  _write(tmp / "fp8", fp8, {**raw, "quantization_config": quant})
  _write(tmp / "reference", dequantized, raw)
  return tmp / "fp8", tmp / "reference", cfg, params, fp8


def test_fp8_checkpoint_dequantises_on_import(fp8_checkpoints):
  fp8_dir, ref_dir, cfg, params, tensors = fp8_checkpoints
  quantized = [n for n in tensors if n.endswith("_scale_inv")]
  for part in ("experts.15.down_proj", "kv_a_proj_with_mqa", "q_b_proj", "shared_experts.up_proj", "eh_proj"):
    assert any(part in n for n in quantized), part
  cfg_fp8, got = hf.import_hf(fp8_dir, overrides=["model.dtype=float32"])
  cfg_ref, want = hf.import_hf(ref_dir, overrides=["model.dtype=float32"])
  assert cfg_fp8 == cfg_ref and cfg_fp8.model == cfg
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  # e4m3 keeps 3 mantissa bits: dequantised weights are within 1/16 (relative to the tile max) of the originals.
  w_up, w_up0 = np.asarray(got["moe_layers"]["ffn"]["experts"]["w_up"]), params["moe_layers"]["ffn"]["experts"]["w_up"]
  assert 0 < np.abs(w_up - w_up0).max() <= np.abs(w_up0).max() / 16


def test_bad_scales_are_named(fp8_checkpoints, tmp_path):
  fp8_dir, _, _, _, tensors = fp8_checkpoints
  raw = json.loads((fp8_dir / "config.json").read_text())
  name = "model.layers.1.mlp.experts.2.gate_proj.weight_scale_inv"
  _write(tmp_path / "bad", {**tensors, name: tensors[name][:1]}, raw)
  with pytest.raises(hf.CheckpointError, match=f"tensor {name}: shape"):
    hf.import_hf(tmp_path / "bad")
  unscaled = "model.layers.0.mlp.up_proj.weight"
  without = {k: v for k, v in tensors.items() if k != unscaled[:-len("weight")] + "weight_scale_inv"}
  _write(tmp_path / "unscaled", without, raw)
  with pytest.raises(hf.CheckpointError, match=f"tensor {unscaled} is FP8 but has no"):
    hf.import_hf(tmp_path / "unscaled")


def test_keeping_fp8_weights_is_refused_until_fp8_training_exists(fp8_checkpoints):
  with pytest.raises(config.ConfigError, match="keep_fp8"):
    hf.import_hf(fp8_checkpoints[0], keep_fp8=True)
