"""FP8 checkpoints as DeepSeek ships V3/R1: e4m3 weights with one float32 `weight_scale_inv` per block
(128x128; 32x32 here). Import must dequantise to what an independent numpy implementation computes."""

import json
import math

import jax
import numpy as np
import pytest
from fp8_checkpoint import F8, build, reference_dequant, write

from r1jax.interop import hf, hf_weights

pytest.importorskip("torch")
pytest.importorskip("safetensors.torch")

BLOCK = (32, 32)


@pytest.mark.parametrize("shape,block", [((40, 72), (16, 32)), ((128, 256), (128, 128)), ((7, 5), (4, 4))])
def test_dequantize_matches_independent_numpy(shape, block):
  rng = np.random.default_rng(0)
  q = rng.uniform(-448, 448, size=shape).astype(F8)
  scale = rng.uniform(1e-4, 1e-2, size=(math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])))
  scale = scale.astype(np.float32)
  np.testing.assert_array_equal(hf_weights.dequantize(q, scale, block), reference_dequant(q, scale, block))


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
  """(fp8 dir, dir holding the numpy-dequantised float32 weights, the model config, original params, tensors)."""
  return build(tmp_path_factory.mktemp("fp8"), BLOCK)


def test_fp8_checkpoint_dequantises_on_import(fp8_checkpoints):
  fp8_dir, ref_dir, cfg, params, tensors = fp8_checkpoints
  quantized = [n for n in tensors if n.endswith("_scale_inv")]
  for part in ("experts.15.down_proj", "kv_a_proj_with_mqa", "q_b_proj", "shared_experts.up_proj", "eh_proj"):
    assert any(part in n for n in quantized), part
  cfg_fp8, got = hf.import_hf(fp8_dir, overrides=["compute.dtype=float32"])
  cfg_ref, want = hf.import_hf(ref_dir, overrides=["compute.dtype=float32"])
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
  write(tmp_path / "bad", {**tensors, name: tensors[name][:1]}, raw)
  with pytest.raises(hf.CheckpointError, match=f"tensor {name}: shape"):
    hf.import_hf(tmp_path / "bad")
  unscaled = "model.layers.0.mlp.up_proj.weight"
  without = {k: v for k, v in tensors.items() if k != unscaled[:-len("weight")] + "weight_scale_inv"}
  write(tmp_path / "unscaled", without, raw)
  with pytest.raises(hf.CheckpointError, match=f"tensor {unscaled} is FP8 but has no"):
    hf.import_hf(tmp_path / "unscaled")
