"""The whole model: parameter counts, causality (also through MTP), data parallelism vs one device,
and a tiny overfit that proves gradients reach every part."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from digits import digit_batch

from r1jax import config, model, sharding, train
from r1jax.config import MeshConfig

ROOT = Path(__file__).resolve().parents[1]


def one_device_mesh():
  return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def test_param_count_equals_created_leaves(tiny):
  params = model.init(tiny.model, tiny.compute, jax.random.key(0))
  created = sum(x.size for x in jax.tree.leaves(params))
  counts = model.param_count(tiny.model)
  assert counts["total_with_mtp"] == created
  assert counts["total"] == created - sum(x.size for x in jax.tree.leaves(params["mtp"]))
  assert sum(counts["parts"].values()) == counts["total"]
  cfg = tiny.model
  per_expert = 3 * cfg.dim * cfg.moe_inter_dim
  inactive = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.n_activated_experts) * per_expert
  assert counts["active"] == counts["total"] - inactive


def test_preset_counts():
  v3 = model.param_count(config.load(ROOT / "configs/deepseek_v3_671b.yaml").model)
  assert abs(v3["total"] / 671e9 - 1) < 0.01, v3["total"]
  assert abs(v3["active"] / 37e9 - 1) < 0.04, v3["active"]
  lite = model.param_count(config.load(ROOT / "configs/deepseek_v2_lite_16b.yaml").model)
  assert abs(lite["total"] / 15.7e9 - 1) < 0.01, lite["total"]
  # DeepSeek quotes 2.4B activated for V2-Lite, which leaves the embedding lookup out.
  assert abs(lite["active_without_embedding"] / 2.4e9 - 1) < 0.04, lite["active_without_embedding"]


def test_tied_embeddings_drop_the_head(tiny):
  cfg = dataclasses.replace(tiny.model, tie_embeddings=True)
  assert "head" not in model.abstract(cfg, tiny.compute)
  assert model.param_count(cfg)["total"] == model.param_count(tiny.model)["total"] - cfg.dim * cfg.vocab_size


def test_causal_including_mtp(tiny):
  cfg, compute = tiny.model, tiny.compute
  params = model.init(cfg, compute, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
  j = 15
  changed = tokens.at[:, j].set((tokens[:, j] + 7) % cfg.vocab_size)
  fwd = jax.jit(lambda t: model.apply(params, t, cfg, compute))
  a, b = fwd(tokens), fwd(changed)
  np.testing.assert_array_equal(a.logits_BxLxV[:, :j], b.logits_BxLxV[:, :j])
  assert not np.allclose(a.logits_BxLxV[:, j], b.logits_BxLxV[:, j])
  # MTP depth 1 at position i reads token i+1, so positions < j-1 must not move.
  np.testing.assert_array_equal(a.mtp_logits_PxBxLxV[0, :, :j - 1], b.mtp_logits_PxBxLxV[0, :, :j - 1])
  assert not np.allclose(a.mtp_logits_PxBxLxV[0, :, j - 1], b.mtp_logits_PxBxLxV[0, :, j - 1])


def test_data_parallel_matches_one_device(tiny):
  cfg, compute = tiny.model, tiny.compute
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
  outs = {}
  for name, mesh in {"one": one_device_mesh(), "dp8": sharding.make_mesh(MeshConfig(data=8))}.items():
    with jax.set_mesh(mesh):
      params = model.init(cfg, compute, jax.random.key(0), mesh)
      out = jax.jit(lambda p, t: model.apply(p, t, cfg, compute))(params, tokens)
      outs[name] = jax.device_get(out)
      if name == "dp8":
        assert out.logits_BxLxV.sharding.shard_shape(out.logits_BxLxV.shape)[0] == 1  # batch split 8 ways
  np.testing.assert_allclose(outs["dp8"].logits_BxLxV, outs["one"].logits_BxLxV, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs["dp8"].mtp_logits_PxBxLxV, outs["one"].mtp_logits_PxBxLxV, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(outs["dp8"].router["moe_layers"]["load"], outs["one"].router["moe_layers"]["load"])


@pytest.mark.slow
def test_overfits_one_batch_and_every_part_learns():
  cfg = config.load(ROOT / "configs/tiny.yaml", ["optim.lr=0.003", "optim.warmup_steps=5", "optim.weight_decay=0"])
  mesh = one_device_mesh()
  batch = digit_batch(np.random.default_rng(0), "reverse", 8, 32)
  with jax.set_mesh(mesh):
    state = train.init_state(cfg, jax.random.key(0), mesh)
    grads = jax.jit(jax.grad(train.loss_fn, has_aux=True), static_argnums=(2, 3))(state.params, batch, cfg.model,
                                                                                 cfg.compute)[0]
    named = {"/".join(str(getattr(k, "key", k)) for k in path): g
             for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    for name, g in named.items():
      if name.endswith("router/bias"):
        assert not np.any(g), f"{name} must get no gradient"
      else:
        assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {name}"
    step = train.jit_sft_step(state, batch, mesh)
    losses = []
    for _ in range(80):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.1 * losses[0], losses[::10]
  assert np.isfinite(losses).all()


def test_train_step_updates_bias_from_load(tiny):
  cfg, compute = tiny.model, dataclasses.replace(tiny.compute, bias_update_speed=0.01)
  run = dataclasses.replace(tiny, compute=compute)
  mesh = one_device_mesh()
  batch = digit_batch(np.random.default_rng(0), "sort", 4, 16)
  with jax.set_mesh(mesh):
    state = train.init_state(run, jax.random.key(0), mesh)
    _, (_, router) = jax.jit(train.loss_fn, static_argnums=(2, 3))(state.params, batch, cfg, compute)
    before = jax.device_get(state.params)
    new, _ = jax.jit(train.sft_step)(state, batch)
  for name, path in [("moe_layers", ("moe_layers", "ffn", "router", "bias")),
                     ("mtp", ("mtp", "block", "ffn", "router", "bias"))]:
    old = before
    for k in path:
      old = old[k]
    got = new.params
    for k in path:
      got = got[k]
    load = np.asarray(router[name]["load"])
    assert (load.sum(-1) == 4 * 16 * cfg.n_activated_experts).all()  # loads sum to tokens x top-k
    np.testing.assert_allclose(got, old + 0.01 * np.sign(load.mean(-1, keepdims=True) - load), atol=1e-7)


def test_remat_changes_memory_not_math(tiny):
  batch = digit_batch(np.random.default_rng(0), "copy", 2, 16)
  grads = {}
  for remat in ["none", "full", "dots"]:
    compute = dataclasses.replace(tiny.compute, remat=remat)
    params = model.init(tiny.model, compute, jax.random.key(0))
    grads[remat] = jax.jit(jax.grad(lambda p: train.loss_fn(p, batch, tiny.model, compute)[0]))(params)
  for remat in ["full", "dots"]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads[remat], grads["none"])


def test_info_json_reports_counts_and_flops(capsys):
  import json

  from r1jax import cli
  assert cli.main(["info", str(ROOT / "configs/deepseek_v3_671b.yaml"), "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  counts = report["params"]
  assert counts["total"] == model.param_count(config.load(ROOT / "configs/deepseek_v3_671b.yaml").model)["total"]
  flops = report["train_flops_per_token"]
  assert flops["matmul"] == 6 * counts["active_without_embedding"]
  assert flops["total"] > flops["matmul"]
