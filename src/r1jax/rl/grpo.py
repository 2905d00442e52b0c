"""The math of GRPO (DeepSeekMath §4.1) and its variants: group advantages, clipped token (GRPO/DAPO) and
sequence (GSPO) ratio losses, aggregations, k3 KL and truncated importance sampling. Pure jnp, jit-able.

Letters: P prompts, G completions per prompt, B = P*G rows (prompt-major: row p*G + g), L completion
positions. `mask_BxL` marks completion tokens (EOS included); nothing at a padded position reaches a loss,
a metric or a gradient, whatever garbage (inf, nan) the inputs hold there. Inputs are upcast to at least
float32 (float64 stays float64, which the tests use).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from r1jax import losses, model, train
from r1jax.batch import Batch
from r1jax.config import ComputeConfig, GRPOConfig, ModelConfig
from r1jax.rl import corrections

# Log-ratios are clamped before exp so an exploding ratio cannot overflow to inf (inf * 0 = nan in the
# backward pass); exp(20) ~ 5e8 is far outside any clip range, so the clamp never changes a clipped loss.
_MAX_LOG_RATIO = corrections.MAX_LOG_RATIO



def _registrar(registry: dict, what: str):
  """A decorator factory adding a function to `registry` under a name (replacing any earlier one)."""
  def register(name: str):
    if not isinstance(name, str) or not name or any(c in name for c in ":, "):
      raise ValueError(f"{what} name {name!r} must be non-empty, without ':', ',' or spaces")

    def add(fn):
      registry[name] = fn
      return fn
    return add
  return register


# The variants by name, as grpo.advantage / grpo.loss / grpo.aggregation choose them; register_* adds one
# (a researcher's own estimator, loss or reduction) that the config then names like a built-in.
ADVANTAGES: dict = {}  # name -> fn(r_PxG, centred_PxG, eps) -> adv_PxG
RATIO_LOSSES: dict = {}  # name -> fn(logp_BxL, old_logp_BxL, adv_B, mask_BxL, clip_low, clip_high) -> RatioLoss
AGGREGATIONS: dict = {}  # name -> fn(sum_B, n_B, norm_len, total) -> scalar loss
register_advantage = _registrar(ADVANTAGES, "advantage")
register_ratio_loss = _registrar(RATIO_LOSSES, "ratio loss")
register_aggregation = _registrar(AGGREGATIONS, "aggregation")


def _lookup(registry: dict, key: str, name: str):
  if name not in registry:
    raise ValueError(f"grpo.{key}={name!r}: expected one of {', '.join(registry)}")
  return registry[name]


def check(cfg: GRPOConfig):
  """One-line errors for variant names no registry holds (run before anything compiles)."""
  for key, registry in (("advantage", ADVANTAGES), ("loss", RATIO_LOSSES), ("aggregation", AGGREGATIONS)):
    _lookup(registry, key, getattr(cfg, key))


def _float(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked(x_BxL, mask_BxL, fill=0.0):
  """x where the mask is set, `fill` elsewhere; a `where` (not a product) so nan/inf padding never leaks."""
  return jnp.where(mask_BxL > 0, _float(x_BxL), fill)


def _log_ratio(logp_BxL, old_logp_BxL, mask_BxL):
  return _masked(logp_BxL, mask_BxL) - _masked(old_logp_BxL, mask_BxL)


# ---------------------------------------------------------------------------------------------------------
# Advantages


@register_advantage("grpo")
def _grpo_advantage(r_PxG, centred_PxG, eps):
  """(r - mean) / (std + eps), population std (ddof=0) over the G completions (DeepSeekMath §4.1.2)."""
  return centred_PxG / (r_PxG.std(axis=-1, keepdims=True) + eps)


@register_advantage("dr_grpo")
def _dr_grpo_advantage(r_PxG, centred_PxG, eps):
  """r - mean, no std division (Dr.GRPO, arXiv 2503.20783)."""
  return centred_PxG


@register_advantage("rloo")
def _rloo_advantage(r_PxG, centred_PxG, eps):
  """r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean) (leave-one-out baseline)."""
  G = r_PxG.shape[-1]
  return centred_PxG * (G / (G - 1))


def advantages(rewards_PxG, kind: str = "grpo", eps: float = 1e-6):
  """Group-relative advantages by the ADVANTAGES entry `kind`, and the zero-variance flag per group; adv is
  exactly 0 in a flagged group."""
  estimator = ADVANTAGES.get(kind)
  if estimator is None:
    raise ValueError(f"advantage kind {kind!r}: expected one of {', '.join(ADVANTAGES)}")
  r_PxG = _float(rewards_PxG)
  centred_PxG = r_PxG - r_PxG.mean(axis=-1, keepdims=True)
  adv_PxG = estimator(r_PxG, centred_PxG, eps)
  # Rounding in the mean can leave r - mean a few ulps off 0; such groups carry no signal, so force 0.
  zero_var_P = jnp.all(r_PxG == r_PxG[:, :1], axis=-1)
  return jnp.where(zero_var_P[:, None], 0.0, adv_PxG), zero_var_P


def group_stats(rewards_PxG) -> dict:
  """Reward metrics: mean, mean within-group std (ddof=0), fraction of zero-variance groups."""
  r_PxG = _float(rewards_PxG)
  zero_var_P = jnp.all(r_PxG == r_PxG[:, :1], axis=-1)
  return {"reward_mean": r_PxG.mean(), "reward_group_std": r_PxG.std(axis=-1).mean(),
          "zero_var_frac": zero_var_P.astype(r_PxG.dtype).mean()}


# ---------------------------------------------------------------------------------------------------------
# Policy losses (per token, so every aggregation applies to both)


class RatioLoss(NamedTuple):
  """Per-token loss (0 at padding), the ratio it used, and where the clipped branch won on each side."""
  loss_BxL: jax.Array
  ratio_BxL: jax.Array
  clipped_low_BxL: jax.Array  # A < 0 and ratio < 1 - clip_low: no gradient
  clipped_high_BxL: jax.Array  # A > 0 and ratio > 1 + clip_high: no gradient


def _clipped_objective(ratio_BxL, adv_B, mask_BxL, clip_low, clip_high) -> RatioLoss:
  """-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A): PPO's clip, asymmetric as in DAPO §3.1."""
  adv_Bx1 = _float(adv_B)[:, None]
  unclipped_BxL = ratio_BxL * adv_Bx1
  clipped_BxL = jnp.clip(ratio_BxL, 1.0 - clip_low, 1.0 + clip_high) * adv_Bx1
  loss_BxL = jnp.where(mask_BxL > 0, -jnp.minimum(unclipped_BxL, clipped_BxL), 0.0)
  low_BxL = (mask_BxL > 0) & (adv_Bx1 < 0) & (ratio_BxL < 1.0 - clip_low)
  high_BxL = (mask_BxL > 0) & (adv_Bx1 > 0) & (ratio_BxL > 1.0 + clip_high)
  return RatioLoss(loss_BxL, ratio_BxL, low_BxL, high_BxL)


@register_ratio_loss("token")
def token_ratio_loss(logp_BxL, old_logp_BxL, adv_B, mask_BxL, clip_low: float, clip_high: float) -> RatioLoss:
  """Per-token clipped surrogate with ratio_t = exp(logp_t - old_logp_t) (DeepSeekMath eq. 3; DAPO §3.1
  clip-higher); the loss is the negated objective."""
  chex.assert_equal_shape([logp_BxL, old_logp_BxL, mask_BxL])
  ratio_BxL = jnp.exp(jnp.clip(_log_ratio(logp_BxL, old_logp_BxL, mask_BxL), -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
  return _clipped_objective(ratio_BxL, adv_B, mask_BxL, clip_low, clip_high)


@register_ratio_loss("sequence")
def sequence_ratio_loss(logp_BxL, old_logp_BxL, adv_B, mask_BxL, clip_low: float,
                        clip_high: float) -> RatioLoss:
  """GSPO (arXiv 2507.18071 §4.2), written per token as GSPO-token (§4.4) with A_i,t = A_i.

  s_i = exp(mean_t (logp_t - old_logp_t)) over the sequence's n_i tokens (eq. 7); per token
  s_i,t = sg[s_i] * exp(logp_t - sg[logp_t]), equal to s_i with d s_i,t / d logp_t = s_i. Every token of a
  sequence carries l_i = -min(s_i A_i, clip(s_i) A_i) and the clip decision is per sequence. An aggregation
  with per-token weight c_i then gives, in value and gradient, sum_i c_i n_i l_i(theta): the sequence
  objective with sequence weight c_i n_i. "seq_mean_token_mean" (c_i n_i = 1/#sequences) is exactly GSPO's;
  "token_mean" weights sequences by length. The GSPO paper clips at 3e-4 / 4e-4, not 0.2 / 0.28.
  """
  chex.assert_equal_shape([logp_BxL, old_logp_BxL, mask_BxL])
  logp_BxL = _masked(logp_BxL, mask_BxL)
  n_B = jnp.maximum((mask_BxL > 0).sum(axis=-1), 1)
  mean_log_ratio_B = _log_ratio(logp_BxL, old_logp_BxL, mask_BxL).sum(axis=-1) / n_B
  s_B = jnp.exp(jnp.clip(mean_log_ratio_B, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
  s_BxL = jax.lax.stop_gradient(s_B)[:, None] * jnp.exp(logp_BxL - jax.lax.stop_gradient(logp_BxL))
  return _clipped_objective(s_BxL, adv_B, mask_BxL, clip_low, clip_high)


def _seq_mean(per_seq_B, n_B, total):
  """Mean over sequences (rows with at least one token), or over `total` of them."""
  n_seqs = (n_B > 0).sum().astype(per_seq_B.dtype) if total is None else total
  return per_seq_B.sum() / jnp.maximum(n_seqs, 1.0)


@register_aggregation("token_mean")
def _token_mean(sum_B, n_B, norm_len, total):
  """Sum over all tokens / number of tokens (DAPO §3.3)."""
  return sum_B.sum() / jnp.maximum(n_B.sum() if total is None else total, 1.0)


@register_aggregation("seq_mean_token_mean")
def _seq_mean_token_mean(sum_B, n_B, norm_len, total):
  """Mean over sequences of each sequence's token mean (DeepSeekMath eq. 3)."""
  return _seq_mean(sum_B / jnp.maximum(n_B, 1.0), n_B, total)


@register_aggregation("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(sum_B, n_B, norm_len, total):
  """Mean over sequences of token sum / norm_len, norm_len the generation budget (Dr.GRPO, arXiv 2503.20783:
  a constant in place of |o_i|)."""
  if norm_len is None or norm_len <= 0:
    raise ValueError(f"aggregation seq_mean_token_sum_norm needs norm_len > 0 (the generation budget), "
                     f"got {norm_len}")
  return _seq_mean(sum_B / norm_len, n_B, total)


def aggregate(loss_BxL, mask_BxL, kind: str, norm_len: int | None = None, total=None):
  """Reduce a per-token loss to a scalar by the AGGREGATIONS entry `kind`. Sequences are rows with at least one
  token. `total` replaces the count (tokens for token_mean, sequences otherwise) when this batch is a
  micro-batch of a larger step, so micro-batch losses add up to the step's."""
  reduce = AGGREGATIONS.get(kind)
  if reduce is None:
    raise ValueError(f"aggregation {kind!r}: expected one of {', '.join(AGGREGATIONS)}")
  m_BxL = mask_BxL > 0
  loss_BxL = jnp.where(m_BxL, _float(loss_BxL), 0.0)
  return reduce(loss_BxL.sum(axis=-1), m_BxL.sum(axis=-1).astype(loss_BxL.dtype), norm_len, total)


# The KL estimators and the sampler/learner corrections live in rl/corrections.py; these two names stay here.
k3_kl = corrections.k3_kl
tis_weights = corrections.tis_weights


# ---------------------------------------------------------------------------------------------------------
# The loss the learner minimises


def policy_loss(logp_BxL, old_logp_BxL, adv_B, mask_BxL, cfg: GRPOConfig, *, norm_len: int | None = None,
                ref_logp_BxL=None, tis_BxL=None, keep_B=None, total=None):
  """Scalar loss and metrics: aggregate(M * is * ratio loss + kl_beta * KL) per cfg.loss / cfg.aggregation.

  The KL term (cfg.kl_estimator, rl/corrections.py) joins per token (DeepSeekMath eq. 3) when ref_logp_BxL is
  given and cfg.kl_beta > 0. `tis_BxL` (stop-gradient importance weights) multiplies only the policy term,
  token by token; with the sequence loss each token's gradient is weighted (GSPO-token form), not the
  sequence as a whole. `keep_B` (off-policy sequence masking, V3.2 eq. 8) zeroes the policy term of the
  sequences it drops, which still count in the aggregation's denominators, as in the report's 1/G sum.
  `total`: see `aggregate`.
  """
  m_BxL = mask_BxL > 0
  logp_BxL = _masked(logp_BxL, m_BxL)
  old_logp_BxL = _masked(old_logp_BxL, m_BxL)
  out = _lookup(RATIO_LOSSES, "loss", cfg.loss)(logp_BxL, old_logp_BxL, adv_B, m_BxL, cfg.clip_low, cfg.clip_high)
  loss_BxL = out.loss_BxL
  if tis_BxL is not None:
    loss_BxL = loss_BxL * _masked(jax.lax.stop_gradient(tis_BxL), m_BxL, fill=1.0)
  if keep_B is not None:
    loss_BxL = jnp.where(jnp.asarray(keep_B)[:, None], loss_BxL, 0.0)

  n = jnp.maximum(m_BxL.sum(), 1).astype(loss_BxL.dtype)
  token_mean = lambda x_BxL: jnp.where(m_BxL, x_BxL, 0.0).sum() / n  # noqa: E731
  metrics = {
      "clip_frac": token_mean(out.clipped_low_BxL | out.clipped_high_BxL),
      "clip_frac_low": token_mean(out.clipped_low_BxL),
      "clip_frac_high": token_mean(out.clipped_high_BxL),
      "ratio_mean": token_mean(out.ratio_BxL),
      "ratio_max": jnp.where(m_BxL, out.ratio_BxL, 0.0).max(),
  }
  if ref_logp_BxL is not None:
    kl_BxL = corrections.kl_estimate(logp_BxL, old_logp_BxL, ref_logp_BxL, m_BxL, cfg.kl_estimator, tis_BxL)
    metrics["kl"] = token_mean(jax.lax.stop_gradient(kl_BxL))
    if cfg.kl_beta > 0:
      loss_BxL = loss_BxL + cfg.kl_beta * kl_BxL
  if tis_BxL is not None:
    metrics["tis_mean"] = token_mean(jax.lax.stop_gradient(tis_BxL))
  if keep_B is not None:
    seqs = jnp.maximum((m_BxL.sum(-1) > 0).sum(), 1)
    metrics["off_policy_masked_frac"] = ((m_BxL.sum(-1) > 0) & ~jnp.asarray(keep_B)).sum() / seqs

  loss = aggregate(loss_BxL, m_BxL, cfg.aggregation, norm_len, total)
  metrics["policy_loss"] = loss
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


# ---------------------------------------------------------------------------------------------------------
# The learner step. A batch holds B = P*G sampled rows over the learner's L positions (prompt + completion,
# right-padded): tokens/targets/positions/token_mask as in SFT (no segment ids: one sequence per row), loss_mask
# on completion targets (EOS included), sampler_logp (the sampler's log-prob of each target), advantages [B],
# and optionally routes [B, N, L, K] (the sampler's experts per MoE layer, for routing replay) and ref_logp
# (for the KL term).

def learner_logp(params: dict, batch: Batch, cfg: ModelConfig, compute: ComputeConfig, temperature: float,
                 replay: bool, keep_sampling_mask: bool = False):
  """Per-target log-probs and entropies under softmax(logits / temperature), the distribution the sampler
  drew from, and router stats. Without keep_sampling_mask the softmax is over the whole vocabulary (the gap
  to a top-k/top-p sampler is left to the importance weights); with it, over the set each token was drawn
  from (V3.2 §3.1, "Keep Sampling Mask"), so the learner and the sampler share one support."""
  replayed = replay and batch.routes_BxNxLxK is not None
  routes = {"moe_layers": jnp.moveaxis(batch.routes_BxNxLxK, 1, 0)} if replayed else None
  out = model.apply(params, batch.tokens_BxL, cfg, compute, positions_BxL=batch.positions_BxL,
                    segment_ids_BxL=batch.segment_ids_BxL, token_mask_BxL=batch.token_mask_BxL, routes=routes,
                    logits=False)
  logp_BxL, entropy_BxL = losses.head_logprobs(out.hidden_BxLxD, model.head_fn(params, cfg), batch.targets_BxL,
                                               compute.head_chunk, temperature or 1.0, entropy=True,
                                               keep_min_BxL=batch.sampler_keep_min_BxL if keep_sampling_mask else None)
  return logp_BxL, entropy_BxL, out.router


def sampler_corrections(logp_BxL, old_logp_BxL, batch: Batch, gcfg: GRPOConfig):
  """The importance weights (grpo.tis_*; None when off), the off-policy keep mask (grpo.off_policy_mask; None
  when off) and the sampler/learner gap metrics of one learner pass."""
  mask_BxL, sampler_BxL = batch.loss_mask_BxL, batch.sampler_logp_BxL
  m_BxL = mask_BxL > 0
  n = jnp.maximum(m_BxL.sum(), 1)
  token_mean = lambda x: jnp.where(m_BxL, x, 0.0).sum() / n  # noqa: E731
  lp_BxL = jax.lax.stop_gradient(logp_BxL)
  metrics = {"sampler_learner_logp_gap": token_mean(jnp.abs(lp_BxL - sampler_BxL)),
             "sampler_learner_kl": token_mean(corrections.sampler_kl(lp_BxL, sampler_BxL, m_BxL))}
  tis_BxL = keep_B = None
  if gcfg.tis_cap > 0:
    tis_BxL, masked_BxL = corrections.importance_weights(old_logp_BxL, sampler_BxL, m_BxL, gcfg.tis_cap,
                                                         gcfg.tis_level, gcfg.tis_mode)
    if gcfg.tis_mode == "mask":
      metrics["tis_masked_frac"] = token_mean(masked_BxL)
  if gcfg.off_policy_mask > 0:
    keep_B, div_B = corrections.off_policy_keep(lp_BxL, sampler_BxL, batch.advantages_B, m_BxL,
                                                gcfg.off_policy_mask)
    real_B = m_BxL.sum(-1) > 0
    metrics["off_policy_divergence"] = jnp.where(real_B, div_B, 0.0).sum() / jnp.maximum(real_B.sum(), 1)
  return tis_BxL, keep_B, metrics


def grpo_step(state, batch: Batch, *, gcfg: GRPOConfig, temperature: float, norm_len: int):
  """mu optimiser updates on one batch of rollouts (pure; bind the keywords with functools.partial and jit
  with train.jit_step). The ratio's denominator is the learner's log-prob before the first update, so at
  mu = 1 the ratio is exactly 1 and the gradient is the plain policy gradient. The MTP module is not run
  (RL trains the main model; MTP weights only see weight decay). Router biases move with the load as in SFT;
  the sequence-wise balance loss is logged but not optimised (with zero advantages Adam would rescale its
  tiny gradient into full-size updates that wreck the policy: seen in the tiny demo)."""
  cfg = dataclasses.replace(state.cfg, n_mtp=0)
  mask_BxL = batch.loss_mask_BxL
  n_real = jnp.maximum(mask_BxL.sum(), 1)
  token_mean = lambda x: jnp.where(mask_BxL > 0, x, 0.0).sum() / n_real  # noqa: E731
  fixed_old = None
  if gcfg.mu > 1:  # stored old log-probs for every inner iteration
    fixed_old = jax.lax.stop_gradient(learner_logp(state.params, batch, cfg, state.compute, temperature,
                                                   gcfg.routing_replay, gcfg.keep_sampling_mask)[0])

  def loss_fn(params):
    logp_BxL, entropy_BxL, router = learner_logp(params, batch, cfg, state.compute, temperature, gcfg.routing_replay,
                                                 gcfg.keep_sampling_mask)
    old_BxL = jax.lax.stop_gradient(logp_BxL) if fixed_old is None else fixed_old
    tis_BxL, keep_B, extra = sampler_corrections(logp_BxL, old_BxL, batch, gcfg)
    loss, metrics = policy_loss(logp_BxL, old_BxL, batch.advantages_B, mask_BxL, gcfg, norm_len=norm_len,
                                ref_logp_BxL=batch.ref_logp_BxL, tis_BxL=tis_BxL, keep_B=keep_B)
    metrics.update(extra)
    metrics["entropy"] = token_mean(jax.lax.stop_gradient(entropy_BxL))
    if router:  # logged, not optimised: when advantages vanish, Adam would blow this tiny term up to full steps
      metrics["aux_loss"] = jax.lax.stop_gradient(losses.router_aux_loss(router))
    if router and batch.routes_BxNxLxK is not None and gcfg.routing_replay:  # how far the learner's routing drifted
      differs_N = router["moe_layers"]["replay_differs"]
      n_inputs = jnp.maximum(batch.token_mask_BxL.sum(), 1)
      metrics["replay_mismatch_frac"] = differs_N.sum() / (differs_N.shape[0] * n_inputs)
    metrics["loss"] = loss
    return loss, (metrics, router)

  def update(st, _):
    (_, (metrics, router)), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
    router = {k: {"load": s["load"], "dropped_pairs": s["dropped_pairs"]} for k, s in router.items()}
    return train.apply_gradients(st, grads, router, metrics)

  state, metrics = jax.lax.scan(update, state, None, length=gcfg.mu)
  last = ("skipped_steps", "bad_steps")  # counters: the value after the last update; the rest: mean over mu
  metrics = {k: v[-1] if k in last else v.mean(0) for k, v in metrics.items()}
  return state.replace(step=state.step + 1), metrics
