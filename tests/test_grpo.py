"""The GRPO learner on real rollouts of the tiny model: the batch layout, routing replay, the on-policy ratio,
zero-advantage batches, mu > 1, the sharded step against one device, and resumable rollout sources.
(The loss and advantage formulas are tested against numpy in test_grpo_math.py.)"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import config, sharding, train
from r1jax.rl import grpo, rollouts

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")


def _cfg(*overrides):
  base = ["compute.dtype=float32", "grpo.prompts_per_step=2", "grpo.group_size=4", "data.task_examples=200",
          "sampler.max_new_tokens=12", "sampler.steps_per_call=12", "train.seq_len=40", "mesh.data=8"]
  return config.load(os.path.join(ROOT, "tiny_r1zero.yaml"), [*base, *overrides])


@pytest.fixture(scope="module")
def case():
  """A state on 8 devices and one step's rollout batch (random tiny model: rewards mostly 0)."""
  cfg = _cfg()
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    state = train.init_state(cfg, jax.random.key(0), mesh)
    source = rollouts.RolloutSource(cfg, mesh)
    batch, info = source.next_batch(state)
  return cfg, mesh, state, batch, info


@pytest.fixture(scope="module")
def step8(case):
  """The jitted GRPO step on 8 devices, compiled once for this module (the state is donated: pass copies)."""
  cfg, mesh, state, batch, _ = case
  return train.jit_step(_step_fn(cfg), state, batch, mesh)


def _step_fn(cfg):
  return functools.partial(grpo.grpo_step, gcfg=cfg.grpo, temperature=cfg.sampler.temperature,
                           norm_len=cfg.sampler.max_new_tokens)


def test_learner_batch_lines_up_with_the_rollout(case):
  cfg, mesh, state, batch, info = case
  host = jax.tree.map(np.asarray, batch)
  B, L = host.tokens_BxL.shape
  assert B == 8 and L == cfg.train.seq_len and host.routes_BxNxLxK.shape[:3] == (B, cfg.model.n_moe_layers, L)
  assert host.segment_ids_BxL is None and host.ref_logp_BxL is None  # one sequence per row; no KL term here
  for b in range(B):
    loss_pos = np.flatnonzero(host.loss_mask_BxL[b])
    assert loss_pos.size and (np.diff(loss_pos) == 1).all()  # one contiguous completion
    first = loss_pos[0]  # predicting the first completion token from the last prompt token
    np.testing.assert_array_equal(host.targets_BxL[b, first:first + loss_pos.size - 1],
                                  host.tokens_BxL[b, first + 1:first + loss_pos.size])
    real = host.token_mask_BxL[b]
    assert real[:loss_pos[-1] + 1].all() and not real[loss_pos[-1] + 1:].any()
    logp = host.sampler_logp_BxL[b]
    assert (logp[loss_pos] < 0).all() and (logp[host.loss_mask_BxL[b] == 0] == 0).all()
  adv = host.advantages_B.reshape(2, 4)
  np.testing.assert_allclose(adv.mean(1), 0, atol=1e-5)  # group-relative
  assert {"reward_mean", "reward_accuracy", "reward_format", "completion_len_mean", "rollout_s"} <= set(info)


def test_replayed_routes_and_the_on_policy_ratio(case, step8):
  """The learner routes each fed token to the sampler's experts, recomputes its log-probs to fp32 precision,
  so the ratio at mu = 1 is exactly 1."""
  cfg, mesh, state, batch, _ = case
  model_cfg = dataclasses.replace(cfg.model, n_mtp=0)
  with jax.set_mesh(mesh):
    logp, _, router = jax.jit(lambda p, b: grpo.learner_logp(p, b, model_cfg, cfg.compute, 1.0, True))(
        state.params, batch)
  routes = np.moveaxis(np.asarray(batch.routes_BxNxLxK), 1, 0)
  used = np.asarray(router["moe_layers"]["experts"])
  fed = routes >= 0
  np.testing.assert_array_equal(used[fed], routes[fed])
  mask = np.asarray(batch.loss_mask_BxL) > 0
  np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(batch.sampler_logp_BxL)[mask], atol=2e-4)
  with jax.set_mesh(mesh):
    new_state, m = step8(jax.tree.map(jnp.copy, state), batch)
  assert float(m["ratio_mean"]) == 1.0 and float(m["clip_frac"]) == 0.0
  assert float(m["sampler_learner_logp_gap"]) < 2e-4 and float(m["replay_mismatch_frac"]) == 0.0
  assert int(new_state.step) == 1


def test_keep_sampling_mask_recovers_a_truncated_samplers_log_probs(case):
  """A top-k + top-p sampler records each token's kept set; the learner renormalised over it reproduces the
  sampler's log-probs (to fp32 recomputation precision, as on the full support), where the full softmax is
  off by the truncated mass. Every kept set holds its token; greedy and untruncated sampling record -inf."""
  cfg = _cfg("sampler.top_k=6", "sampler.top_p=0.8")
  _, mesh, state, _, _ = case
  with jax.set_mesh(mesh):
    batch, _ = rollouts.RolloutSource(cfg, mesh).next_batch(state)
    model_cfg = dataclasses.replace(cfg.model, n_mtp=0)
    logp = {keep: np.asarray(jax.jit(lambda p, b, keep=keep: grpo.learner_logp(
        p, b, model_cfg, cfg.compute, cfg.sampler.temperature, True, keep)[0])(state.params, batch))
        for keep in (False, True)}
  mask = np.asarray(batch.loss_mask_BxL) > 0
  sampled = np.asarray(batch.sampler_logp_BxL)[mask]
  thr = np.asarray(batch.sampler_keep_min_BxL)
  assert np.isfinite(thr[mask]).all() and (thr[~mask] == -np.inf).all()
  np.testing.assert_allclose(logp[True][mask], sampled, atol=2e-4)
  assert np.abs(logp[False][mask] - sampled).max() > 0.05  # the truncated mass the full softmax counts
  with jax.set_mesh(mesh):
    plain, _ = rollouts.RolloutSource(_cfg(), mesh).next_batch(state)
  assert (np.asarray(plain.sampler_keep_min_BxL) == -np.inf).all()


def test_zero_advantages_give_zero_gradients(case, step8):
  cfg, mesh, state, batch, _ = case
  zero = batch._replace(advantages_B=jnp.zeros_like(batch.advantages_B))
  with jax.set_mesh(mesh):
    _, m = step8(jax.tree.map(jnp.copy, state), zero)
  assert float(m["grad_norm"]) == 0.0 and float(m["policy_loss"]) == 0.0


def test_sharded_step_equals_one_device(case, step8):
  cfg, mesh, state, batch, _ = case
  batch = batch._replace(advantages_B=jnp.asarray(np.linspace(-1, 1, 8), jnp.float32))  # a gradient to compare
  host_state = jax.device_get(state)
  host_batch = jax.tree.map(np.asarray, batch)
  with jax.set_mesh(mesh):
    sharded, m8 = step8(jax.tree.map(jnp.copy, state), batch)
  one = sharding.make_mesh(config.MeshConfig(data=1), devices=jax.devices()[:1])
  with jax.set_mesh(one):
    s1 = jax.device_put(host_state, jax.tree.map(lambda x: sharding.named(one, ()), host_state))
    b1 = sharding.global_batch(host_batch, one)
    single, m1 = train.jit_step(_step_fn(cfg), s1, b1, one)(s1, b1)
  np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(jax.device_get(sharded.params)), jax.tree.leaves(jax.device_get(single.params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mu_iterations_move_the_ratio_away_from_one(case):
  cfg, mesh, state, batch, _ = case
  cfg2 = _cfg("grpo.mu=3", "optim.lr=0.01", "optim.warmup_steps=0")
  batch = batch._replace(advantages_B=jnp.asarray(np.linspace(-1, 1, 8), jnp.float32))
  with jax.set_mesh(mesh):
    fresh = train.init_state(cfg2, jax.random.key(0), mesh)
    new_state, m = train.jit_step(_step_fn(cfg2), fresh, batch, mesh)(fresh, batch)
  # the mean over the 3 updates: the first is on-policy (ratio 1), later ones see the moved policy
  assert float(m["ratio_max"]) > 1.0 and int(new_state.step) == 1


def test_rollout_source_resumes_exactly(case):
  cfg, mesh, state, _, _ = case
  with jax.set_mesh(mesh):
    a = rollouts.RolloutSource(cfg, mesh)
    a.next_batch(state)
    second, _ = a.next_batch(state)
    b = rollouts.RolloutSource(cfg, mesh)
    b.set_state({"step": 1})
    again, _ = b.next_batch(state)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), second, again)


def test_dynamic_sampling_fills_the_batch_with_informative_groups(case):
  cfg, mesh, state, _, _ = case
  cfg = _cfg("grpo.zero_variance=filter", "grpo.max_resample_rounds=2")
  with jax.set_mesh(mesh):
    batch, info = rollouts.RolloutSource(cfg, mesh).next_batch(state)
  adv = np.asarray(batch.advantages_B).reshape(2, 4)
  informative = (np.ptp(adv, axis=1) > 0).sum()
  assert 1 <= info["resample_rounds"] <= 3
  # either every group carries signal, or all rounds were used and the rest were kept (counted)
  assert informative == 2 or info["resample_rounds"] == 3
  assert info["zero_variance_groups"] == pytest.approx(1 - informative / 2)


def test_eval_reports_accuracy_format_and_pass_at_k(case):
  cfg, mesh, state, _, _ = case
  with jax.set_mesh(mesh):
    out = rollouts.evaluate(state.params, cfg, n=8, k=2)
  assert set(out) == {"n", "accuracy", "format", "completion_len_mean", "pass@2"}
  assert all(0.0 <= out[k] <= 1.0 for k in ("accuracy", "format", "pass@2")) and out["n"] == 8
