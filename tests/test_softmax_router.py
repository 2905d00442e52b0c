"""Softmax-scored (DeepSeek-V2) routers have no aux-loss-free selection bias unless a config asks for one,
so a trained V2-shaped model exports to DeepseekV2 (whose format cannot hold a bias)."""

from pathlib import Path

import jax
import numpy as np
from digits import digit_batch

from r1jax import config, model, sharding, train
from r1jax.config import MeshConfig
from r1jax.interop import hf

ROOT = Path(__file__).resolve().parents[1]
V2 = ["model.score_func=softmax", "model.norm_topk_prob=false", "model.route_scale=1.0", "model.n_mtp=0",
      "compute.dtype=float32", "compute.bias_update_speed=0.01"]


def _trained(overrides, steps=2):
  cfg = config.load(ROOT / "configs/tiny.yaml", V2 + overrides)
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  batch = digit_batch(np.random.default_rng(0), "copy", 4, 16)
  with jax.set_mesh(mesh):
    state = train.init_state(cfg, jax.random.key(0), mesh)
    step = jax.jit(train.sft_step)
    for _ in range(steps):
      state, _ = step(state, batch)
  return cfg, jax.device_get(state.params)


def test_softmax_router_has_no_bias_and_a_trained_model_exports(tmp_path):
  cfg, params = _trained([])
  assert not cfg.model.has_router_bias
  assert "bias" not in params["moe_layers"]["ffn"]["router"]
  assert not any("bias" in "/".join(map(str, path)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
  hf.export_hf(params, cfg.model, cfg.compute, tmp_path / "v2", arch="DeepseekV2ForCausalLM")
  back_cfg, back = hf.import_hf(tmp_path / "v2", overrides=["compute.dtype=float32"])
  assert back_cfg.model.score_func == "softmax" and not back_cfg.model.has_router_bias
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), params)


def test_explicit_router_bias_on_softmax_is_trained_by_load(tmp_path):
  cfg, params = _trained(["model.router_bias=true"])
  bias = params["moe_layers"]["ffn"]["router"]["bias"]
  assert np.abs(bias).max() > 0  # moved by the load-based update (0.01 per step)
  np.testing.assert_allclose(bias / 0.01, np.round(bias / 0.01), atol=1e-3)  # whole steps of gamma


def test_sigmoid_router_keeps_its_bias_by_default():
  cfg = config.load(ROOT / "configs/tiny.yaml")
  assert cfg.model.has_router_bias
  assert "bias" in model.abstract(cfg.model, cfg.compute)["moe_layers"]["ffn"]["router"]
