"""Masked cross-entropy (the fp32 head run in chunks), the multi-token-prediction loss and the router's
balance loss, all in fp32.

Each loss is a mean over its own units (tokens, sequences). `totals` give the units of the whole optimizer
step, so that micro-batches of gradient accumulation add up to exactly the large batch's loss.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from r1jax.nn import moe, mtp


def head_logprobs(h_BxLxD, head_fn, targets_BxL, chunk: int, temperature: float = 1.0, entropy: bool = False,
                  keep_min_BxL=None):
  """log softmax(head(h) / temperature) at the targets (and the entropy), the fp32 logits made `chunk`
  positions at a time and remade in the backward pass: no [B, L, V] array exists (at 8 x 2048 x 32k the
  logits and their log-softmax are 2 GiB each). chunk <= 0: one chunk. Returns (logp_BxL, entropy_BxL|None).

  keep_min_BxL (the sampler's kept set, V3.2's keep sampling mask): the softmax runs over the tokens whose
  tempered logit is >= it, and the target always (a top-k or nucleus set is every token above its smallest
  member, so one number per position says which tokens the sampler could draw); -inf keeps every token and
  gives the plain value exactly."""
  B, L, _ = h_BxLxD.shape
  C = L if chunk <= 0 else min(chunk, L)
  n = -(-L // C)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, n * C - L)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
  chunks = lambda x: jnp.moveaxis(pad(x).reshape(B, n, C, *x.shape[2:]), 1, 0)  # noqa: E731  [n, B, C, ...]
  keep = keep_min_BxL is not None
  thr_BxL = keep_min_BxL if keep else jnp.zeros(targets_BxL.shape, jnp.float32)

  @jax.checkpoint
  def one(h_BxCxD, t_BxC, thr_BxC):
    z_BxCxV = head_fn(h_BxCxD) / temperature
    zk_BxCxV = z_BxCxV
    if keep:
      kept_BxCxV = (z_BxCxV >= thr_BxC[..., None]) | (jnp.arange(z_BxCxV.shape[-1]) == t_BxC[..., None])
      zk_BxCxV = jnp.where(kept_BxCxV, z_BxCxV, -jnp.inf)
    lse_BxC = jax.nn.logsumexp(zk_BxCxV, axis=-1)
    logp_BxC = jnp.take_along_axis(z_BxCxV, t_BxC[..., None], axis=-1)[..., 0] - lse_BxC
    if not entropy:
      return logp_BxC, None
    p_BxCxV = jnp.exp(zk_BxCxV - lse_BxC[..., None])  # 0 outside the kept set
    return logp_BxC, lse_BxC - (p_BxCxV * z_BxCxV).sum(-1)

  logp_NxBxC, ent_NxBxC = jax.lax.map(lambda a: one(*a), (chunks(h_BxLxD), chunks(targets_BxL), chunks(thr_BxL)))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, n * C)[:, :L]  # noqa: E731
  return unchunk(logp_NxBxC), None if ent_NxBxC is None else unchunk(ent_NxBxC)


def masked_nll(logp_BxL, mask_BxL, total=None):
  """Mean negative log-likelihood over mask (divided by `total` when given); returns (loss, tokens)."""
  chex.assert_equal_shape([logp_BxL, mask_BxL])
  mask_BxL = mask_BxL.astype(jnp.float32)
  n = mask_BxL.sum()
  return -(logp_BxL * mask_BxL).sum() / jnp.maximum(n if total is None else total, 1.0), n


def cross_entropy(logits_BxLxV, targets_BxL, mask_BxL, total=None):
  """masked_nll of materialised logits (for small vocabularies and tests); returns (loss, tokens)."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  return masked_nll(jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0], mask_BxL, total)


def mtp_masks(mask_BxL, segment_ids_BxL, n_mtp: int) -> list:
  """Depth k at position i predicts targets[i + k]: only where that target is in the loss and in the same
  packed segment."""
  masks = []
  for k in range(1, n_mtp + 1):
    same_segment = mtp.shift_left(segment_ids_BxL, k, fill=-1) == segment_ids_BxL
    masks.append(mtp.shift_left(mask_BxL.astype(jnp.float32), k) * same_segment)
  return masks


def mtp_loss(mtp_h_PxBxLxD, head_fn, targets_BxL, mask_BxL, segment_ids_BxL, n_mtp: int, weight: float,
             head_chunk: int, totals=None):
  """L_MTP = lambda / D * sum_k CE_k (V3 eq. 25) from each depth's normed state; `totals` are the per-depth
  token counts of the whole step; `weight` is lambda (compute.mtp_loss_weight)."""
  total = jnp.zeros((), jnp.float32)
  for k, mask_k in enumerate(mtp_masks(mask_BxL, segment_ids_BxL, n_mtp), start=1):
    denom = None if totals is None else totals[k - 1]
    logp_BxL, _ = head_logprobs(mtp_h_PxBxLxD[k - 1], head_fn, mtp.shift_left(targets_BxL, k), head_chunk)
    total = total + masked_nll(logp_BxL, mask_k, denom)[0]
  return weight * total / n_mtp


def router_aux_loss(router: dict):
  """Sum of every MoE layer's sequence-wise balance loss (each a mean over its batch's sequences)."""
  return sum(stats["aux_loss"].sum() for stats in router.values())


def count_sequences(token_mask_BxL, segment_ids_BxL):
  """Sequences (packed segments) with at least one real token: the balance loss's unit."""
  tokens = moe.Tokens(token_mask_BxL, segment_ids_BxL)
  T = token_mask_BxL.size
  real_S = jax.ops.segment_sum(token_mask_BxL.reshape(T).astype(jnp.float32), moe.sequence_ids(tokens), T)
  return (real_S > 0).sum().astype(jnp.float32)
