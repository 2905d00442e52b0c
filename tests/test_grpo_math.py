"""GRPO math (rl/grpo.py) against independent float64 numpy references: loops and case analysis, not the
library's vectorised formulas; gradients by central finite differences of the numpy losses."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.config import GRPOConfig
from r1jax.rl import grpo

P, G, L = 3, 4, 7
B = P * G
NORM_LEN = 10  # generation budget for Dr.GRPO's constant normaliser
EMPTY_ROW = 5  # a row with no completion tokens (e.g. a truncated completion masked out)
CFG = GRPOConfig(clip_low=0.2, clip_high=0.28, kl_beta=0.05, tis_cap=2.0)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, L + 1, B)
  lengths[EMPTY_ROW] = 0
  mask = (np.arange(L)[None, :] < lengths[:, None]).astype(np.float64)
  logp = -rng.uniform(0.05, 3.0, (B, L))
  # Token ratios ~0.5..2, sequence ratios ~0.7..1.5: both clip sides are hit by both losses.
  old = logp + rng.normal(0.0, 0.3, (B, L)) + rng.normal(0.0, 0.2, (B, 1))
  ref = logp + rng.normal(0.0, 0.5, (B, L))
  tis = rng.uniform(0.5, 2.0, (B, L))
  adv = rng.normal(size=B)
  return logp, old, ref, tis, adv, mask


# ---------------------------------------------------------------------------------------------------------
# numpy float64 references


def np_advantages(r, kind, eps):
  adv = np.zeros_like(r)
  for p, row in enumerate(r):
    if len(set(row.tolist())) == 1:
      continue
    if kind == "grpo":
      adv[p] = (row - row.mean()) / (math.sqrt(np.mean((row - row.mean()) ** 2)) + eps)
    elif kind == "dr_grpo":
      adv[p] = row - row.mean()
    else:
      adv[p] = [row[i] - np.mean(np.delete(row, i)) for i in range(len(row))]
  return adv


def np_seq_ratio(logp, old, mask):
  s = np.ones(B)
  for b in range(B):
    idx = mask[b] > 0
    if idx.any():
      s[b] = math.exp(np.mean(logp[b, idx] - old[b, idx]))
  return s


def np_objective(ratio, a, cl, ch):
  """PPO clipped objective by the sign of A (equivalent to the min/clip form)."""
  return a * min(ratio, 1 + ch) if a >= 0 else a * max(ratio, 1 - cl)


def np_per_token_loss(logp, old, adv, mask, loss, cl, ch, sg_logp=None):
  """sg_logp (sequence loss): GSPO-token's s_i,t = sg[s_i] * pi_t / sg[pi_t] (GSPO §4.4) with sg taken at
  sg_logp, so finite differences around sg_logp give that objective's gradient."""
  out = np.zeros((B, L))
  s = np_seq_ratio(logp if sg_logp is None else sg_logp, old, mask)
  for b in range(B):
    for t in range(L):
      if mask[b, t]:
        if loss == "token":
          ratio = math.exp(logp[b, t] - old[b, t])
        else:
          ratio = s[b] * (1.0 if sg_logp is None else math.exp(logp[b, t] - sg_logp[b, t]))
        out[b, t] = -np_objective(ratio, adv[b], cl, ch)
  return out


def np_aggregate(x, mask, kind, norm_len=NORM_LEN):
  seqs = [b for b in range(B) if mask[b].sum() > 0]
  if kind == "token_mean":
    return sum(x[b, t] for b in range(B) for t in range(L) if mask[b, t]) / mask.sum()
  per_seq = []
  for b in seqs:
    tok = [x[b, t] for t in range(L) if mask[b, t]]
    per_seq.append(sum(tok) / (len(tok) if kind == "seq_mean_token_mean" else norm_len))
  return sum(per_seq) / len(seqs)


def np_k3(logp, ref):
  d = ref - logp
  return np.exp(d) - d - 1


def np_policy_loss(logp, old, adv, mask, cfg, ref=None, tis=None, sg_logp=None):
  x = np_per_token_loss(logp, old, adv, mask, cfg.loss, cfg.clip_low, cfg.clip_high, sg_logp)
  if tis is not None:
    x = x * tis
  if ref is not None and cfg.kl_beta > 0:
    x = x + cfg.kl_beta * np_k3(logp, ref) * mask
  return np_aggregate(x, mask, cfg.aggregation)


def np_grad(f, x, h=1e-6):
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[i] += h
    xm[i] -= h
    g[i] = (f(xp) - f(xm)) / (2 * h)
  return g


def _jax_loss(cfg, logp, old, adv, mask, ref=None, tis=None):
  def f(lp):
    return grpo.policy_loss(lp, old, adv, mask, cfg, norm_len=NORM_LEN, ref_logp_BxL=ref, tis_BxL=tis)
  (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
  return float(loss), metrics, np.asarray(g)


# ---------------------------------------------------------------------------------------------------------
# Advantages


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_advantages_match_numpy_and_zero_variance_is_exact(kind, dtype):
  rng = np.random.default_rng(1)
  r = rng.normal(size=(6, 5))
  r[1] = 0.1  # equal rewards whose fp32 mean is not exactly 0.1
  r[3] = 1.0
  r[4] = rng.integers(0, 2, 5).astype(float)
  r[4, :2] = [0.0, 1.0]  # binary rewards, both values present
  with jax.enable_x64(dtype == np.float64):
    adv, zero_var = grpo.advantages(jnp.asarray(r.astype(dtype)), kind, 1e-6)
    adv, zero_var = np.asarray(adv), np.asarray(zero_var)
  np.testing.assert_array_equal(zero_var, [False, True, False, True, False, False])
  assert (adv[zero_var] == 0).all()
  tol = 1e-12 if dtype == np.float64 else 1e-5
  np.testing.assert_allclose(adv, np_advantages(r.astype(dtype).astype(np.float64), kind, 1e-6),
                             rtol=tol, atol=tol)


def test_grpo_uses_population_std_and_rloo_is_leave_one_out():
  adv, _ = grpo.advantages(jnp.array([[0.0, 1.0]]), "grpo", 0.0)
  np.testing.assert_allclose(adv, [[-1.0, 1.0]])  # std of {0, 1} with ddof=0 is 0.5
  r = np.array([[1.0, 0.0, 0.0, 0.5]])
  adv, _ = grpo.advantages(jnp.asarray(r), "rloo", 0.0)
  np.testing.assert_allclose(adv[0], [1.0 - 0.5 / 3, 0.0 - 1.5 / 3, 0.0 - 1.5 / 3, 0.5 - 1.0 / 3], rtol=1e-6)


def test_group_stats():
  r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
  stats = grpo.group_stats(jnp.asarray(r))
  np.testing.assert_allclose(stats["reward_mean"], r.mean(), rtol=1e-6)
  np.testing.assert_allclose(stats["reward_group_std"], np.sqrt(2 / 3) / 2, rtol=1e-6)
  np.testing.assert_allclose(stats["zero_var_frac"], 0.5)


# ---------------------------------------------------------------------------------------------------------
# Losses: values and gradients


@pytest.mark.parametrize("loss", ["token", "sequence"])
def test_ratio_losses_match_numpy(loss):
  logp, old, _, _, adv, mask = _batch()
  fn = grpo.token_ratio_loss if loss == "token" else grpo.sequence_ratio_loss
  with jax.enable_x64(True):
    out = fn(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2, 0.28)
  ref = np_per_token_loss(logp, old, adv, mask, loss, 0.2, 0.28)
  np.testing.assert_allclose(out.loss_BxL, ref, rtol=1e-12, atol=1e-12)
  ratio = np.exp(logp - old) if loss == "token" else np_seq_ratio(logp, old, mask)[:, None] + 0 * logp
  high = (mask > 0) & (adv[:, None] > 0) & (ratio > 1.28)
  low = (mask > 0) & (adv[:, None] < 0) & (ratio < 0.8)
  np.testing.assert_array_equal(out.clipped_high_BxL, high)
  np.testing.assert_array_equal(out.clipped_low_BxL, low)
  assert high.any() and low.any() and not (high & low).any()


@pytest.mark.parametrize("kind", grpo.AGGREGATIONS)
def test_aggregate_matches_numpy_and_micro_batches_add_up(kind):
  x = np.random.default_rng(2).normal(size=(B, L))
  _, _, _, _, _, mask = _batch()
  with jax.enable_x64(True):
    full = float(grpo.aggregate(jnp.asarray(x), jnp.asarray(mask), kind, NORM_LEN))
    total = mask.sum() if kind == "token_mean" else float((mask.sum(-1) > 0).sum())
    halves = [float(grpo.aggregate(jnp.asarray(x[s]), jnp.asarray(mask[s]), kind, NORM_LEN, total=total))
              for s in (slice(0, B // 2), slice(B // 2, B))]
  np.testing.assert_allclose(full, np_aggregate(x, mask, kind), rtol=1e-12)
  np.testing.assert_allclose(sum(halves), full, rtol=1e-12)


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "kl+tis"])
@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("loss", ["token", "sequence"])
def test_policy_loss_value_and_gradient_match_numpy(loss, aggregation, extras):
  logp, old, ref, tis, adv, mask = _batch()
  cfg = dataclasses.replace(CFG, loss=loss, aggregation=aggregation)
  ref, tis = (ref, tis) if extras else (None, None)
  with jax.enable_x64(True):
    value, _, grad = _jax_loss(cfg, logp, old, adv, mask, ref, tis)
  np.testing.assert_allclose(value, np_policy_loss(logp, old, adv, mask, cfg, ref, tis), rtol=1e-12)
  # Finite differences of the numpy loss. For "sequence" without TIS this differentiates the sequence-level
  # objective itself (s_i a function of all its tokens), which GSPO-token's stop-gradient form must match.
  # Per-token TIS weights make the two differ: the library weights each token's gradient (GSPO-token).
  sg = logp if (loss == "sequence" and extras) else None
  expected = np_grad(lambda lp: np_policy_loss(lp, old, adv, mask, cfg, ref, tis, sg), logp)
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-9)
  assert (grad[mask == 0] == 0).all()


def test_policy_loss_jits_in_float32():
  logp, old, ref, tis, adv, mask = _batch()
  f = jax.jit(grpo.policy_loss, static_argnames=("cfg", "norm_len"))
  for loss in ["token", "sequence"]:
    cfg = dataclasses.replace(CFG, loss=loss, aggregation="seq_mean_token_sum_norm")
    args = [jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)]
    value, metrics = f(*args, cfg, norm_len=NORM_LEN, ref_logp_BxL=jnp.asarray(ref, jnp.float32),
                       tis_BxL=jnp.asarray(tis, jnp.float32))
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, np_policy_loss(logp, old, adv, mask, cfg, ref, tis), rtol=2e-5)


# ---------------------------------------------------------------------------------------------------------
# Clipping


def test_clip_higher_asymmetry_and_zero_gradient_when_clipped():
  adv = jnp.array([1.0, 1.0, -1.0, -1.0, -1.0])
  ratio = np.array([1.25, 0.75, 0.75, 0.85, 1.25])
  old = jnp.zeros((5, 1))
  logp = jnp.log(jnp.asarray(ratio, jnp.float32))[:, None]
  mask = jnp.ones((5, 1))

  def run(clip_high):
    out = grpo.token_ratio_loss(logp, old, adv, mask, 0.2, clip_high)
    grad = jax.grad(lambda lp: grpo.token_ratio_loss(lp, old, adv, mask, 0.2, clip_high).loss_BxL.sum())(logp)
    return out, np.asarray(grad)[:, 0]

  out, grad = run(0.28)  # DAPO clip-higher: 1.25 is inside [0.8, 1.28]
  np.testing.assert_array_equal(out.clipped_high_BxL[:, 0], [False] * 5)
  np.testing.assert_array_equal(out.clipped_low_BxL[:, 0], [False, False, True, False, False])
  np.testing.assert_allclose(out.loss_BxL[:, 0], [-1.25, -0.75, 0.8, 0.85, 1.25], rtol=1e-6)
  # d(-r A)/d logp = -r A where unclipped; 0 where the clipped branch won (A < 0, r = 0.75 < 0.8).
  np.testing.assert_allclose(grad, [-1.25, -0.75, 0.0, 0.85, 1.25], rtol=1e-6)
  assert grad[2] == 0.0

  out, grad = run(0.2)  # symmetric PPO clip: 1.25 > 1.2 is clipped for A > 0, but not for A < 0
  np.testing.assert_array_equal(out.clipped_high_BxL[:, 0], [True, False, False, False, False])
  np.testing.assert_allclose(out.loss_BxL[0, 0], -1.2, rtol=1e-6)
  assert grad[0] == 0.0 and grad[2] == 0.0 and grad[4] != 0.0


def test_sequence_clip_is_per_sequence():
  # One sequence: token log-ratios 0.5 and -0.3 -> s = exp(0.1) ~ 1.105, inside [0.8, 1.28] though one
  # token alone (e^0.5 ~ 1.65) would be clipped; and a sequence with s = exp(0.3) > 1.28 clipped throughout.
  logp = jnp.array([[0.5, -0.3], [0.3, 0.3]])
  out = grpo.sequence_ratio_loss(logp, jnp.zeros((2, 2)), jnp.array([1.0, 1.0]), jnp.ones((2, 2)), 0.2, 0.28)
  np.testing.assert_allclose(out.ratio_BxL, [[math.exp(0.1)] * 2, [math.exp(0.3)] * 2], rtol=1e-6)
  np.testing.assert_array_equal(out.clipped_high_BxL, [[False, False], [True, True]])
  grad = jax.grad(lambda lp: grpo.sequence_ratio_loss(lp, jnp.zeros((2, 2)), jnp.ones(2), jnp.ones((2, 2)),
                                                      0.2, 0.28).loss_BxL.sum())(logp)
  np.testing.assert_allclose(grad, [[-math.exp(0.1)] * 2, [0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("loss", ["token", "sequence"])
def test_clip_metrics(loss):
  logp, old, ref, _, adv, mask = _batch()
  with jax.enable_x64(True):
    _, metrics, _ = _jax_loss(dataclasses.replace(CFG, loss=loss), logp, old, adv, mask, ref)
  ratio = np.exp(logp - old) if loss == "token" else np_seq_ratio(logp, old, mask)[:, None] * np.ones(L)
  m = mask > 0
  high = (adv[:, None] > 0) & (ratio > 1.28) & m
  low = (adv[:, None] < 0) & (ratio < 0.8) & m
  np.testing.assert_allclose(metrics["clip_frac_high"], high.sum() / m.sum(), rtol=1e-12)
  np.testing.assert_allclose(metrics["clip_frac_low"], low.sum() / m.sum(), rtol=1e-12)
  np.testing.assert_allclose(metrics["clip_frac"], (high | low).sum() / m.sum(), rtol=1e-12)
  np.testing.assert_allclose(metrics["ratio_mean"], ratio[m].mean(), rtol=1e-12)
  np.testing.assert_allclose(metrics["ratio_max"], ratio[m].max(), rtol=1e-12)
  np.testing.assert_allclose(metrics["kl"], np_k3(logp, ref)[m].mean(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Special cases


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("loss", ["token", "sequence"])
def test_zero_variance_groups_give_exactly_zero_gradient(loss, aggregation):
  logp, old, _, tis, _, mask = _batch()
  rewards = np.random.default_rng(3).normal(size=(P, G))
  rewards[1] = 0.3
  adv_PxG, zero_var = grpo.advantages(jnp.asarray(rewards, jnp.float32), "grpo", 1e-6)
  assert np.asarray(zero_var).tolist() == [False, True, False]
  cfg = dataclasses.replace(CFG, loss=loss, aggregation=aggregation, kl_beta=0.0)
  _, _, grad = _jax_loss(cfg, *(jnp.asarray(x, jnp.float32) for x in (logp, old, adv_PxG.reshape(B), mask)),
                         tis=jnp.asarray(tis, jnp.float32))
  assert (grad[G:2 * G] == 0).all()
  assert (grad[:G][mask[:G] > 0] != 0).any()


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("loss", ["token", "sequence"])
def test_on_policy_gradient_is_minus_advantage_over_normaliser(loss, aggregation):
  logp, _, _, _, adv, mask = _batch()
  cfg = dataclasses.replace(CFG, loss=loss, aggregation=aggregation, kl_beta=0.0)
  with jax.enable_x64(True):
    _, metrics, grad = _jax_loss(cfg, logp, logp, adv, mask)
  n_B = mask.sum(-1)
  seqs = (n_B > 0).sum()
  norm_B = {"token_mean": np.full(B, mask.sum()), "seq_mean_token_mean": np.maximum(n_B, 1) * seqs,
            "seq_mean_token_sum_norm": np.full(B, NORM_LEN * seqs)}[aggregation]
  np.testing.assert_allclose(grad, -adv[:, None] * mask / norm_B[:, None], rtol=1e-12, atol=1e-15)
  assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
  assert float(metrics["clip_frac"]) == 0.0


def test_k3_kl():
  logp, _, ref, _, _, mask = _batch()
  with jax.enable_x64(True):
    kl = np.asarray(grpo.k3_kl(jnp.asarray(logp), jnp.asarray(ref)))
    kl_small = np.asarray(grpo.k3_kl(jnp.asarray(logp), jnp.asarray(logp + 1e-9)))
  np.testing.assert_allclose(kl, np_k3(logp, ref), rtol=1e-9)  # numpy's exp(d) - d - 1 cancels digits
  assert (kl >= 0).all() and (kl_small >= 0).all()
  kl32 = np.asarray(grpo.k3_kl(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32)))
  assert (kl32 >= 0).all()
  np.testing.assert_allclose(kl32, np_k3(logp, ref), rtol=1e-4, atol=1e-6)
  assert (np.asarray(grpo.k3_kl(jnp.asarray(logp, jnp.float32), jnp.asarray(logp, jnp.float32))) == 0).all()
  masked = np.asarray(grpo.k3_kl(jnp.asarray(logp), jnp.where(mask > 0, ref, jnp.nan), jnp.asarray(mask)))
  assert (masked[mask == 0] == 0).all()


def test_kl_term_enters_per_token():
  logp, old, ref, _, adv, mask = _batch()
  cfg = dataclasses.replace(CFG, kl_beta=0.5)
  with jax.enable_x64(True):
    with_kl, _, _ = _jax_loss(cfg, logp, old, adv, mask, ref)
    without, metrics, _ = _jax_loss(dataclasses.replace(cfg, kl_beta=0.0), logp, old, adv, mask, ref)
  np.testing.assert_allclose(with_kl - without, 0.5 * np_aggregate(np_k3(logp, ref) * mask, mask, "token_mean"),
                             rtol=1e-10)
  assert float(metrics["kl"]) > 0  # logged even when beta is 0


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("loss", ["token", "sequence"])
def test_garbage_at_padding_changes_nothing(loss, aggregation):
  logp, old, ref, tis, adv, mask = _batch()
  pad = mask == 0
  bad_logp, bad_old, bad_ref, bad_tis = logp.copy(), old.copy(), ref.copy(), tis.copy()
  bad_logp[pad] = 1e30
  bad_logp[EMPTY_ROW, 0] = np.nan
  bad_old[pad] = np.nan
  bad_old[EMPTY_ROW, 1] = -np.inf
  bad_ref[pad] = -1e30
  bad_tis[pad] = np.nan
  cfg = dataclasses.replace(CFG, loss=loss, aggregation=aggregation)
  f32 = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]  # noqa: E731
  clean = _jax_loss(cfg, *f32(logp, old, adv, mask), *f32(ref, tis))
  dirty = _jax_loss(cfg, *f32(bad_logp, bad_old, adv, mask), *f32(bad_ref, bad_tis))
  assert np.isfinite(dirty[0]) and np.isfinite(dirty[2]).all()
  assert dirty[0] == clean[0]
  np.testing.assert_array_equal(dirty[2], clean[2])
  assert (dirty[2][pad] == 0).all()
  for k in clean[1]:
    np.testing.assert_array_equal(dirty[1][k], clean[1][k], err_msg=k)


def test_tis_weights():
  logp, old, _, _, _, mask = _batch()
  sampler = old + np.random.default_rng(4).normal(0.0, 1.0, old.shape)
  with jax.enable_x64(True):
    w = np.asarray(grpo.tis_weights(jnp.asarray(old), jnp.asarray(sampler), 2.0))
    ones = np.asarray(grpo.tis_weights(jnp.asarray(old), jnp.asarray(sampler), 0.0))
    g_old, g_sampler = jax.grad(lambda a, b: grpo.tis_weights(a, b, 2.0).sum(), argnums=(0, 1))(
        jnp.asarray(old), jnp.asarray(sampler))
    # Weights passed to the loss get no gradient either, even if a caller forgot the stop-gradient.
    g_tis = jax.grad(lambda t: grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.ones(B),
                                                jnp.asarray(mask), CFG, tis_BxL=t)[0])(jnp.asarray(w))
  np.testing.assert_allclose(w, np.minimum(np.exp(old - sampler), 2.0), rtol=1e-12)
  assert w.max() == 2.0 and (w < 2.0).any()
  assert (ones == 1.0).all()
  assert (np.asarray(g_old) == 0).all() and (np.asarray(g_sampler) == 0).all() and (np.asarray(g_tis) == 0).all()
  bad = np.where(mask > 0, sampler, np.nan)
  masked = np.asarray(grpo.tis_weights(jnp.asarray(old), jnp.asarray(bad), 2.0, jnp.asarray(mask)))
  assert np.isfinite(masked).all() and (masked[mask == 0] == 1).all()


def test_unknown_kinds_raise():
  x = jnp.zeros((B, L))
  with pytest.raises(ValueError, match="advantage kind"):
    grpo.advantages(jnp.zeros((P, G)), "ppo", 1e-6)
  with pytest.raises(ValueError, match="aggregation"):
    grpo.aggregate(x, x, "sum")
  with pytest.raises(ValueError, match="norm_len"):
    grpo.aggregate(x, x, "seq_mean_token_sum_norm")
  with pytest.raises(ValueError, match="grpo.loss"):
    grpo.policy_loss(x, x, jnp.zeros(B), x, dataclasses.replace(CFG, loss="gspo"))
  with pytest.raises(ValueError, match="grpo.aggregation='sum': expected one of token_mean"):
    grpo.check(dataclasses.replace(CFG, aggregation="sum"))


def test_variants_registered_by_name_run_like_built_ins():
  """A researcher's own advantage estimator, registered by name, is chosen by grpo.advantage like a built-in:
  here the median baseline, checked against numpy."""
  grpo.register_advantage("median")(lambda r, centred, eps: r - jnp.median(r, axis=-1, keepdims=True))
  try:
    grpo.check(dataclasses.replace(CFG, advantage="median"))
    r = np.random.default_rng(0).normal(size=(P, G))
    with jax.enable_x64(True):
      adv, zero_var = grpo.advantages(jnp.asarray(r), "median")
    np.testing.assert_allclose(adv, r - np.median(r, axis=-1, keepdims=True), rtol=1e-12)
    assert not np.asarray(zero_var).any()
  finally:
    del grpo.ADVANTAGES["median"]
  with pytest.raises(ValueError, match="must be non-empty, without"):
    grpo.register_aggregation("a,b")
