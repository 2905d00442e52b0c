"""The V3 gate against a plain-numpy implementation written from the report (§2.1.2, eq. 12-16)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.config import ModelConfig
from r1jax.nn import moe


def numpy_gate(logits, bias, cfg):
  """One token at a time, float64, ties broken towards the lower index (as lax.top_k does)."""
  E, G, K = cfg.n_routed_experts, cfg.n_expert_groups, cfg.n_activated_experts
  weights, chosen = [], []
  for row in np.asarray(logits, np.float64):
    if cfg.score_func == "sigmoid":
      s = 1.0 / (1.0 + np.exp(-row))
    else:
      s = np.exp(row - row.max())
      s = s / s.sum()
    sel = s + bias
    allowed = np.ones(E, bool)
    if G > 1:
      groups = sel.reshape(G, E // G)
      if cfg.score_func == "sigmoid":
        gs = np.array([sorted(g)[-1] + sorted(g)[-2] for g in groups])
      else:
        gs = groups.max(1)
      top_groups = sorted(range(G), key=lambda g: (-gs[g], g))[:cfg.n_limited_groups]
      allowed = np.repeat(np.isin(np.arange(G), top_groups), E // G)
    candidates = [e for e in range(E) if allowed[e]]
    idx = sorted(candidates, key=lambda e: (-sel[e], e))[:K]
    w = s[idx]
    if cfg.norm_topk_prob:
      w = w / w.sum()
    weights.append(w * cfg.route_scale)
    chosen.append(idx)
  return np.array(weights), np.array(chosen)


V3_SMALL = ModelConfig(dim=8, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
                       route_scale=2.5)
CASES = {
    "v3_groups": V3_SMALL,
    "no_groups": dataclasses.replace(V3_SMALL, n_expert_groups=1, n_limited_groups=1),
    "softmax_v2": dataclasses.replace(V3_SMALL, score_func="softmax", norm_topk_prob=False, route_scale=1.0,
                                      n_expert_groups=4, n_limited_groups=3),
}


def _route(cfg, logits, bias):
  # Identity router weight so the logits are exactly what the gate sees.
  router = {"w": jnp.eye(cfg.n_routed_experts, dtype=jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  r = moe.route(router, jnp.asarray(logits, jnp.float32), dataclasses.replace(cfg, dim=cfg.n_routed_experts))
  return np.asarray(r.weights_TxK), np.asarray(r.experts_TxK)


def _check(cfg, logits, bias):
  w, idx = _route(cfg, logits, bias)
  w_ref, idx_ref = numpy_gate(logits, bias, cfg)
  np.testing.assert_array_equal(idx, idx_ref)
  np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)  # fp32 sigmoid/softmax vs float64
  return w, idx


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_scores_match_numpy(name):
  cfg = CASES[name]
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, cfg.n_routed_experts)) * 2
  bias = rng.normal(size=cfg.n_routed_experts) * 0.1
  w, _ = _check(cfg, logits, bias)
  if cfg.norm_topk_prob:
    np.testing.assert_allclose(w.sum(-1), cfg.route_scale, rtol=1e-5)


def test_bias_changes_selection_not_weights():
  cfg = CASES["no_groups"]
  logits = np.random.default_rng(1).normal(size=(32, 16))
  bias = np.zeros(16)
  bias[7] = 100.0  # expert 7 is always selected ...
  w, idx = _check(cfg, logits, bias)
  assert (idx == 7).any(axis=1).all()
  # ... but its weight is its unbiased affinity, normalised over the chosen set.
  s = 1 / (1 + np.exp(-logits))
  chosen_s = np.take_along_axis(s, idx, axis=1)
  np.testing.assert_allclose(w, chosen_s / chosen_s.sum(-1, keepdims=True) * cfg.route_scale, rtol=1e-5)


def test_group_limit_restricts_experts_to_top_groups():
  cfg = CASES["v3_groups"]
  logits = np.random.default_rng(2).normal(size=(128, 16)) * 3
  _, idx = _check(cfg, logits, np.zeros(16))
  groups_used = np.array([len(set(row // 4)) for row in idx])
  assert groups_used.max() <= cfg.n_limited_groups


@pytest.mark.parametrize("name", sorted(CASES))
def test_ties_and_all_equal_scores(name):
  cfg = CASES[name]
  logits = np.zeros((4, cfg.n_routed_experts))
  logits[1, :] = 3.0
  logits[2, ::2] = 1.0  # pairwise ties
  logits[3] = np.repeat([0.5, 0.5, -1.0, 2.0], 4)  # tied groups
  _, idx = _check(cfg, logits, np.zeros(cfg.n_routed_experts))
  np.testing.assert_array_equal(idx[0], np.arange(cfg.n_activated_experts))  # all equal -> lowest ids


def test_bias_update_formula():
  load = jnp.array([[10.0, 2.0, 6.0, 6.0]])
  bias = jnp.array([[0.5, 0.0, -0.1, 0.0]])
  new = moe.update_bias(bias, load, 0.01)
  # mean load 6: overloaded expert 0 goes down, underloaded 1 goes up, balanced ones stay.
  np.testing.assert_allclose(new, [[0.49, 0.01, -0.1, 0.0]], rtol=1e-6)


def numpy_router_stats(scores_BxLxE, experts_BxLxK, mask_BxL, seg_BxL, E, K, alpha):
  """Load and sequence-wise balance loss (V3 eq. 17-20) written out per row and per packed segment,
  counting real (mask 1) tokens only; the loss is the mean over sequences that have real tokens."""
  load, losses = np.zeros(E), []
  B, L, _ = scores_BxLxE.shape
  for b in range(B):
    starts = [0] + [t for t in range(1, L) if seg_BxL[b, t] != seg_BxL[b, t - 1]] + [L]
    for lo, hi in zip(starts[:-1], starts[1:]):
      real = [t for t in range(lo, hi) if mask_BxL[b, t]]
      if not real:
        continue
      f, p = np.zeros(E), np.zeros(E)
      for t in real:
        f[experts_BxLxK[b, t]] += E / (K * len(real))
        load[experts_BxLxK[b, t]] += 1
        p += scores_BxLxE[b, t] / scores_BxLxE[b, t].sum() / len(real)
      losses.append(alpha * (f * p).sum())
  return load, np.mean(losses)


def test_router_stats_count_real_tokens_per_packed_segment():
  cfg, alpha = V3_SMALL, 0.01
  E, K, B, L = 16, 4, 3, 12
  rng = np.random.default_rng(3)
  scores = rng.uniform(size=(B, L, E))
  experts = np.stack([rng.permutation(E)[:K] for _ in range(B * L)]).reshape(B, L, K)
  # Row 0: one sequence then right padding; row 1: three packed segments (ids need not be ordered or small)
  # with padding between and after; row 2: all padding.
  seg = np.array([[0] * L, [5] * 4 + [2] * 3 + [9] * 5, [0] * L])
  mask = np.array([[1] * 7 + [0] * 5, [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0], [0] * L])
  routing = moe.Routing(None, jnp.asarray(experts.reshape(B * L, K)), jnp.asarray(scores.reshape(B * L, E)))
  tokens = moe.Tokens(jnp.asarray(mask), jnp.asarray(seg))
  aux_sum, n_seq = moe.sequence_aux_loss(routing, tokens, cfg, alpha)
  load = moe.expert_load(routing.experts_TxK, tokens.mask_BxL.reshape(-1), E)
  load_ref, aux_ref = numpy_router_stats(scores, experts, mask, seg, E, K, 0.01)
  assert n_seq == 4
  np.testing.assert_array_equal(load, load_ref)
  np.testing.assert_allclose(aux_sum / n_seq, aux_ref, rtol=1e-5)
  # Without padding or packing it is the plain per-row formula, averaged over rows.
  dense = moe.Tokens.dense(B, L)
  aux_sum, n_seq = moe.sequence_aux_loss(routing, dense, cfg, alpha)
  _, aux_ref = numpy_router_stats(scores, experts, np.ones((B, L)), np.zeros((B, L)), E, K, 0.01)
  np.testing.assert_allclose(aux_sum / n_seq, aux_ref, rtol=1e-5)
