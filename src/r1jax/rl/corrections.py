"""Corrections for a sampler that is not the learner: the KL estimators, importance weights for the
sampler/learner gap (per token or per sequence, truncated or masked) and DeepSeek-V3.2's off-policy sequence
masking (V3.2 report, §3.1 "Scaling GRPO"). The third V3.2 correction, keep sampling mask, renormalises the
learner over the sampler's truncated support: `losses.head_logprobs(keep_min_BxL=...)`; the fourth, keep
routing, is routing replay (`grpo.routing_replay`). Pure jnp, jit-able.

Letters as in rl/grpo.py: B rows, L completion positions, `mask_BxL` marks completion tokens. Three policies:
pi_theta (the learner now, `logp`), pi_old (the learner before this batch's first update, the ratio's
denominator, `old_logp`) and the sampler's own numbers for the tokens it drew (`sampler_logp`), which differ
from pi_old by numerics (another kernel, bf16 cache, FP8) and, with asynchronous rollouts, by staleness."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Log-ratios are clamped before exp (see rl/grpo.py): exp(20) ~ 5e8 overflows nothing and clips nothing.
MAX_LOG_RATIO = 20.0

KL_ESTIMATORS = ("k3", "unbiased_k3")
IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")


def _float(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_diff(a_BxL, b_BxL, mask_BxL):
  """a - b on completion tokens, 0 elsewhere (a `where`, so garbage at padding never leaks)."""
  return jnp.where(mask_BxL > 0, _float(a_BxL) - _float(b_BxL), 0.0)


def _exp(d):
  return jnp.exp(jnp.clip(d, -MAX_LOG_RATIO, MAX_LOG_RATIO))


def seq_mean(x_BxL, mask_BxL):
  """Mean of x over each row's completion tokens (0 for a row with none)."""
  m_BxL = mask_BxL > 0
  return jnp.where(m_BxL, x_BxL, 0.0).sum(-1) / jnp.maximum(m_BxL.sum(-1), 1)


# ---------------------------------------------------------------------------------------------------------
# KL to the reference


def k3_kl(logp_BxL, ref_logp_BxL, mask_BxL=None):
  """Per-token k3 estimator of KL(pi || pi_ref): exp(d) - d - 1, d = ref - logp (Schulman 2020; DeepSeekMath
  eq. 4); >= 0, 0 where logp == ref. expm1 keeps it exact for small d; 0 at padding when a mask is given."""
  d_BxL = _float(ref_logp_BxL) - _float(logp_BxL)
  if mask_BxL is not None:
    d_BxL = jnp.where(mask_BxL > 0, d_BxL, 0.0)
  d_BxL = jnp.clip(d_BxL, -MAX_LOG_RATIO, MAX_LOG_RATIO)
  return jnp.maximum(jnp.expm1(d_BxL) - d_BxL, 0.0)


def kl_estimate(logp_BxL, old_logp_BxL, ref_logp_BxL, mask_BxL, estimator: str, is_BxL=None):
  """The per-token KL term the loss adds (times grpo.kl_beta).

  k3: k3_kl(logp, ref). Its tokens were drawn by the sampler, not by pi_theta, so as a loss its gradient
  is that of KL(pi_ref || pi_theta) at best (on-policy), not of KL(pi_theta || pi_ref).
  unbiased_k3 (V3.2 §3.1, "Unbiased KL Estimate"): (pi_theta / pi_old) * k3, the ratio kept in the graph, so
  that E_{pi_old}[ratio * k3] = E_{pi_theta}[k3] = KL(pi_theta || pi_ref) in value and in gradient. pi_old is
  the policy that drew the tokens: with `is_BxL` (the stop-gradient sampler correction pi_old / pi_sampler of
  `importance_weights`) the weight is pi_theta / pi_sampler, truncated as that correction is. At ratio 1
  (on-policy, first update) the value equals k3's; the gradient gains k3 * d log pi_theta.
  """
  k3_BxL = k3_kl(logp_BxL, ref_logp_BxL, mask_BxL)
  if estimator == "k3":
    return k3_BxL
  if estimator != "unbiased_k3":
    raise ValueError(f"grpo.kl_estimator={estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")
  w_BxL = _exp(_masked_diff(logp_BxL, old_logp_BxL, mask_BxL))
  if is_BxL is not None:
    w_BxL = w_BxL * jax.lax.stop_gradient(jnp.where(mask_BxL > 0, _float(is_BxL), 1.0))
  return jnp.where(mask_BxL > 0, w_BxL * k3_BxL, 0.0)


# ---------------------------------------------------------------------------------------------------------
# Importance weights for the sampler/learner gap


def importance_weights(old_logp_BxL, sampler_logp_BxL, mask_BxL, cap: float, level: str = "token",
                       mode: str = "truncate"):
  """Stop-gradient weights pi_old / pi_sampler that multiply the policy term, and where they were masked.

  level token: w_t = exp(old_t - sampler_t) per token (truncated importance sampling, TIS).
  level sequence: one weight per sequence, the geometric mean of its token ratios, exp(mean_t(old_t -
  sampler_t)), on each of its tokens (length-invariant, unlike the product of ratios).
  mode truncate: min(w, cap). mode mask: w where w <= cap, else 0 (the token or sequence leaves the policy
  term; MIS). cap <= 0: off (ones). Padding: 1. Returns (w_BxL, masked_BxL bool).
  """
  m_BxL = mask_BxL > 0
  ones = jnp.ones(jnp.shape(old_logp_BxL), _float(old_logp_BxL).dtype)
  if cap <= 0:
    return ones, jnp.zeros(ones.shape, jnp.bool_)
  if level not in IS_LEVELS:
    raise ValueError(f"grpo.tis_level={level!r}: expected one of {', '.join(IS_LEVELS)}")
  if mode not in IS_MODES:
    raise ValueError(f"grpo.tis_mode={mode!r}: expected one of {', '.join(IS_MODES)}")
  d_BxL = _masked_diff(old_logp_BxL, sampler_logp_BxL, m_BxL)
  if level == "sequence":
    d_BxL = jnp.broadcast_to(seq_mean(d_BxL, m_BxL)[:, None], d_BxL.shape)
  w_BxL = _exp(d_BxL)
  over_BxL = m_BxL & (w_BxL > cap)
  w_BxL = jnp.minimum(w_BxL, cap) if mode == "truncate" else jnp.where(over_BxL, 0.0, w_BxL)
  w_BxL = jnp.where(m_BxL, w_BxL, 1.0)
  return jax.lax.stop_gradient(w_BxL), over_BxL if mode == "mask" else jnp.zeros_like(over_BxL)


def tis_weights(old_logp_learner_BxL, logp_sampler_BxL, cap: float, mask_BxL=None):
  """Token-level truncated weights min(exp(learner_old - sampler), cap) (ones when cap is 0)."""
  mask_BxL = jnp.ones(jnp.shape(old_logp_learner_BxL)) if mask_BxL is None else mask_BxL
  return importance_weights(old_logp_learner_BxL, logp_sampler_BxL, mask_BxL, cap)[0]


# ---------------------------------------------------------------------------------------------------------
# Off-policy sequence masking


def off_policy_keep(logp_BxL, sampler_logp_BxL, adv_B, mask_BxL, delta: float):
  """V3.2 §3.1 "Off-Policy Sequence Masking": M_i = 0 for a sequence with negative advantage whose mean
  log(pi_sampler / pi_theta) over its tokens exceeds delta, else 1 (bool [B]). pi_sampler is what the
  sampler returned (so the divergence covers numerics and staleness both); pi_theta the learner now, taken
  stop-gradient. A sequence with positive advantage is never masked: learning from one's own correct,
  if stale, samples is safe; pushing down unlikely negatives is what destabilises."""
  div_B = seq_mean(_masked_diff(sampler_logp_BxL, jax.lax.stop_gradient(logp_BxL), mask_BxL), mask_BxL)
  return ~((_float(adv_B) < 0) & (div_B > delta)), div_B


def sampler_kl(logp_BxL, sampler_logp_BxL, mask_BxL):
  """Per-token k3 estimate of KL(pi_sampler || pi_theta) on the sampler's tokens (a metric of the gap)."""
  return jax.lax.stop_gradient(k3_kl(sampler_logp_BxL, logp_BxL, mask_BxL))
