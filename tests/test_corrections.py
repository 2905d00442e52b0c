"""DeepSeek-V3.2's GRPO corrections and the sequence-level importance weights (rl/corrections.py) against
float64 numpy loops; gradients by central finite differences of the numpy losses; on-policy (ratio 1, full
support) each reduces to the plain loss exactly. The unbiased KL's claim itself is checked by exact
expectation over a small vocabulary."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_grpo_math import B, CFG, EMPTY_ROW, L, NORM_LEN, _batch, np_aggregate, np_grad, np_k3, np_per_token_loss

from r1jax import losses
from r1jax.rl import corrections, grpo


def np_weights(old, sampler, mask, cap, level, mode):
  w = np.ones((B, L))
  for b in range(B):
    idx = [t for t in range(L) if mask[b, t]]
    if not idx:
      continue
    if level == "sequence":
      seq = math.exp(sum(old[b, t] - sampler[b, t] for t in idx) / len(idx))
      ratios = {t: seq for t in idx}
    else:
      ratios = {t: math.exp(old[b, t] - sampler[b, t]) for t in idx}
    for t, r in ratios.items():
      w[b, t] = min(r, cap) if mode == "truncate" else (r if r <= cap else 0.0)
  return w


def np_keep(logp, sampler, adv, mask, delta):
  keep = np.ones(B, bool)
  for b in range(B):
    idx = [t for t in range(L) if mask[b, t]]
    if idx and adv[b] < 0 and sum(sampler[b, t] - logp[b, t] for t in idx) / len(idx) > delta:
      keep[b] = False
  return keep


def np_loss(logp, old, adv, mask, cfg, ref=None, w=None, keep=None, kl_old=None):
  """The V3.2 objective (eq. 8 with eq. 7's KL), negated. `kl_old` holds the denominator of the KL's ratio
  fixed while logp varies (the ratio is in the graph; old is not)."""
  x = np_per_token_loss(logp, old, adv, mask, cfg.loss, cfg.clip_low, cfg.clip_high)
  if w is not None:
    x = x * w
  if keep is not None:
    x = x * keep[:, None]
  if ref is not None:
    k3 = np_k3(logp, ref)
    if cfg.kl_estimator == "unbiased_k3":
      k3 = np.exp(logp - (old if kl_old is None else kl_old)) * (1.0 if w is None else w) * k3
    x = x + cfg.kl_beta * k3 * mask
  return np_aggregate(x, mask, cfg.aggregation)


def _f64(*xs):
  return [jnp.asarray(x, jnp.float64) for x in xs]


@pytest.mark.parametrize("level", corrections.IS_LEVELS)
@pytest.mark.parametrize("mode", corrections.IS_MODES)
def test_importance_weights_match_numpy(level, mode):
  logp, old, _, _, _, mask = _batch()
  sampler = old + np.random.default_rng(4).normal(0.0, 0.8, old.shape)
  with jax.enable_x64(True):
    w, masked = corrections.importance_weights(*_f64(old, sampler, mask), 1.5, level, mode)
    g = jax.grad(lambda a: corrections.importance_weights(a, *_f64(sampler, mask), 1.5, level, mode)[0].sum())(
        jnp.asarray(old))
  expected = np_weights(old, sampler, mask, 1.5, level, mode)
  np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-12)
  assert (np.asarray(g) == 0).all()
  assert np.asarray(masked).any() == (mode == "mask")  # this batch has ratios over the cap at both levels
  np.testing.assert_array_equal(np.asarray(masked), (expected == 0) & (mask > 0))
  if level == "sequence":  # one weight per sequence
    for b in range(B):
      assert len(set(np.asarray(w)[b][mask[b] > 0].tolist())) <= 1


def test_off_policy_keep_matches_numpy_and_only_drops_negative_advantages():
  logp, _, _, _, adv, mask = _batch()
  sampler = logp + np.random.default_rng(5).normal(0.1, 0.6, logp.shape)
  with jax.enable_x64(True):
    for delta in (0.05, 0.2, 1.0):
      keep, div = corrections.off_policy_keep(*_f64(logp, sampler, adv, mask), delta)
      expected = np_keep(logp, sampler, adv, mask, delta)
      np.testing.assert_array_equal(np.asarray(keep), expected)
      assert np.asarray(keep)[adv >= 0].all()
    assert (~np.asarray(corrections.off_policy_keep(*_f64(logp, sampler, adv, mask), 0.05)[0])).any()
    assert np.asarray(corrections.off_policy_keep(*_f64(logp, sampler, adv, mask), 1.0)[0]).all()


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("estimator", corrections.KL_ESTIMATORS)
def test_v32_loss_value_and_gradient_match_numpy(estimator, aggregation):
  """Eq. 8 with the masked policy term, weights of either level and the chosen KL estimator; the gradient
  of the unbiased KL includes its ratio's (finite differences move logp with old fixed)."""
  logp, old, ref, _, adv, mask = _batch()
  sampler = old + np.random.default_rng(4).normal(0.1, 0.5, old.shape)  # biased: some sequences are masked
  cfg = dataclasses.replace(CFG, kl_estimator=estimator, aggregation=aggregation, kl_beta=0.3)
  w = np_weights(old, sampler, mask, 1.2, "sequence", "mask")
  keep = np_keep(logp, sampler, adv, mask, 0.1)
  assert (~keep).any() and keep.any() and (w == 0).any()

  def f(lp):
    return grpo.policy_loss(lp, *_f64(old, adv, mask), cfg, norm_len=NORM_LEN, ref_logp_BxL=jnp.asarray(ref),
                            tis_BxL=jnp.asarray(w), keep_B=jnp.asarray(keep))

  with jax.enable_x64(True):
    (value, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
  np.testing.assert_allclose(float(value), np_loss(logp, old, adv, mask, cfg, ref, w, keep), rtol=1e-12)
  expected = np_grad(lambda lp: np_loss(lp, old, adv, mask, cfg, ref, w, keep, kl_old=old), logp)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6, atol=1e-9)
  real = mask.sum(-1) > 0
  assert float(metrics["off_policy_masked_frac"]) == pytest.approx((real & ~keep).sum() / real.sum(), abs=1e-15)


@pytest.mark.parametrize("loss", ["token", "sequence"])
def test_on_policy_each_correction_reduces_to_the_plain_loss_exactly(loss):
  """Ratio 1 (old = logp), sampler = learner, full support: the unbiased KL has k3's value, the weights are
  ones at either level and mode, and the off-policy mask drops nothing; the loss is bit-identical."""
  logp, _, ref, _, adv, mask = _batch()
  plain = dataclasses.replace(CFG, loss=loss, kl_beta=0.3)
  v32 = dataclasses.replace(plain, kl_estimator="unbiased_k3", tis_level="sequence", tis_mode="mask",
                            off_policy_mask=1e-6)
  with jax.enable_x64(True):
    args = _f64(logp, logp, adv, mask)
    want, _ = grpo.policy_loss(*args, plain, ref_logp_BxL=jnp.asarray(ref))
    w, _ = corrections.importance_weights(*_f64(logp, logp, mask), v32.tis_cap, v32.tis_level, v32.tis_mode)
    keep, _ = corrections.off_policy_keep(*_f64(logp, logp, adv, mask), v32.off_policy_mask)
    got, metrics = grpo.policy_loss(*args, v32, ref_logp_BxL=jnp.asarray(ref), tis_BxL=w, keep_B=keep)
  assert (np.asarray(w) == 1).all() and np.asarray(keep).all()
  assert float(got) == float(want)
  assert float(metrics["off_policy_masked_frac"]) == 0.0


def test_unbiased_k3_gradient_is_the_true_kl_gradient_in_expectation():
  """One categorical over V tokens, tokens drawn from pi_old != pi_theta: the exact expectation over pi_old
  of the gradient of ratio * k3 equals the gradient of KL(pi_theta || pi_ref); plain k3's does not (it is
  the gradient of KL(pi_ref || pi_theta) when pi_old = pi_theta, and of neither otherwise)."""
  rng = np.random.default_rng(0)
  V = 7
  theta, old_logits, ref_logits = rng.normal(size=V), rng.normal(size=V), rng.normal(size=V)

  with jax.enable_x64(True):
    logp = lambda z: jax.nn.log_softmax(z)  # noqa: E731
    lp_old, lp_ref = logp(jnp.asarray(old_logits)), logp(jnp.asarray(ref_logits))
    mask = jnp.ones((1, V))

    def expected_term(z, estimator):  # E_{v ~ pi_old}[kl_estimate(v)], old held fixed
      lp = logp(z)[None]
      kl = corrections.kl_estimate(lp, lp_old[None], lp_ref[None], mask, estimator)
      return (jnp.exp(lp_old)[None] * kl).sum()

    true_kl = lambda z: (jnp.exp(logp(z)) * (logp(z) - lp_ref)).sum()  # noqa: E731
    z = jnp.asarray(theta)
    want = np.asarray(jax.grad(true_kl)(z))
    unbiased = np.asarray(jax.grad(lambda z: expected_term(z, "unbiased_k3"))(z))
    plain = np.asarray(jax.grad(lambda z: expected_term(z, "k3"))(z))
    value, kl = float(expected_term(z, "unbiased_k3")), float(true_kl(z))
  np.testing.assert_allclose(unbiased, want, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(value, kl, rtol=1e-10)
  assert np.abs(plain - want).max() > 0.05


def np_head_logp(z, targets, thr):
  """log-softmax over {v : z_v >= thr} (the sampler's kept set) plus the target itself, in float64 loops."""
  B_, L_, V = z.shape
  out = np.zeros((B_, L_))
  for b in range(B_):
    for t in range(L_):
      kept = [v for v in range(V) if z[b, t, v] >= thr[b, t] or v == targets[b, t]]
      out[b, t] = z[b, t, targets[b, t]] - math.log(sum(math.exp(z[b, t, v]) for v in kept))
  return out


@pytest.mark.parametrize("chunk", [0, 3])
def test_keep_sampling_mask_renormalises_over_the_kept_set(chunk):
  rng = np.random.default_rng(1)
  B_, L_, D, V = 2, 5, 4, 11
  h = rng.normal(size=(B_, L_, D))
  W = rng.normal(size=(D, V))
  targets = rng.integers(0, V, (B_, L_))
  z = h @ W / 0.7
  # Thresholds keeping the 3 (row 0) and 6 (row 1) largest logits (midway to the next, so rounding cannot
  # move a logit across), one above its own target (the target always counts), one at -inf (the full softmax).
  desc = np.sort(z, axis=-1)[..., ::-1]
  thr = (desc[..., 2] + desc[..., 3]) / 2
  thr[1] = (desc[1, :, 5] + desc[1, :, 6]) / 2
  thr[0, 1] = z[0, 1, targets[0, 1]] + 1e-3
  thr[1, 4] = -np.inf
  with jax.enable_x64(True):
    head = lambda x: x @ jnp.asarray(W)  # noqa: E731
    got, ent = losses.head_logprobs(jnp.asarray(h), head, jnp.asarray(targets), chunk, 0.7, entropy=True,
                                    keep_min_BxL=jnp.asarray(thr))
    full, _ = losses.head_logprobs(jnp.asarray(h), head, jnp.asarray(targets), chunk, 0.7)
    g = jax.grad(lambda x: losses.head_logprobs(x, head, jnp.asarray(targets), chunk, 0.7,
                                                keep_min_BxL=jnp.asarray(thr))[0].sum())(jnp.asarray(h))
  np.testing.assert_allclose(np.asarray(got), np_head_logp(z, targets, thr), rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(got)[1, 4], np.asarray(full)[1, 4])  # -inf: today's value exactly
  assert np.isfinite(np.asarray(ent)).all() and np.isfinite(np.asarray(g)).all()

  def np_sum(x):
    zz = x @ W / 0.7
    return np_head_logp(zz, targets, thr).sum()

  # Finite differences hold the kept set fixed only where no logit crosses a threshold within h: true here.
  np.testing.assert_allclose(np.asarray(g), np_grad(np_sum, h), rtol=1e-5, atol=1e-8)


def test_garbage_at_padding_changes_nothing_in_the_corrections():
  logp, old, _, _, adv, mask = _batch()
  sampler = old + 0.3
  bad = np.where(mask > 0, sampler, np.nan)
  with jax.enable_x64(True):
    for level in corrections.IS_LEVELS:
      w, _ = corrections.importance_weights(*_f64(old, bad, mask), 2.0, level, "mask")
      assert np.isfinite(np.asarray(w)).all() and (np.asarray(w)[mask == 0] == 1).all()
    keep, div = corrections.off_policy_keep(*_f64(logp, bad, adv, mask), 0.1)
    assert np.isfinite(np.asarray(div)).all() and np.asarray(keep)[EMPTY_ROW]
