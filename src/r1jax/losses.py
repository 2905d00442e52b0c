"""Masked cross-entropy, the multi-token-prediction loss and the router's balance loss, all in fp32.

Each loss is a mean over its own units (tokens, sequences). `totals` give the units of the whole optimizer
step, so that micro-batches of gradient accumulation add up to exactly the large batch's loss.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.nn import moe, mtp


def cross_entropy(logits_BxLxV, targets_BxL, mask_BxL, total=None):
  """Mean token cross-entropy over mask (divided by `total` when given); returns (loss, number of tokens)."""
  chex.assert_equal_shape([logits_BxLxV[..., 0], targets_BxL, mask_BxL])
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  nll_BxL = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
  mask_BxL = mask_BxL.astype(jnp.float32)
  n = mask_BxL.sum()
  return (nll_BxL * mask_BxL).sum() / jnp.maximum(n if total is None else total, 1.0), n


def mtp_masks(mask_BxL, segment_ids_BxL, n_mtp: int) -> list:
  """Depth k at position i predicts targets[i + k]: only where that target is in the loss and in the same
  packed segment."""
  masks = []
  for k in range(1, n_mtp + 1):
    same_segment = mtp.shift_left(segment_ids_BxL, k, fill=-1) == segment_ids_BxL
    masks.append(mtp.shift_left(mask_BxL.astype(jnp.float32), k) * same_segment)
  return masks


def mtp_loss(mtp_logits_NxBxLxV, targets_BxL, mask_BxL, segment_ids_BxL, cfg: ModelConfig, totals=None):
  """L_MTP = lambda / D * sum_k CE_k (V3 eq. 25); `totals` are the per-depth token counts of the whole step."""
  total = jnp.zeros((), jnp.float32)
  for k, mask_k in enumerate(mtp_masks(mask_BxL, segment_ids_BxL, cfg.n_mtp), start=1):
    denom = None if totals is None else totals[k - 1]
    total = total + cross_entropy(mtp_logits_NxBxLxV[k - 1], mtp.shift_left(targets_BxL, k), mask_k, denom)[0]
  return cfg.mtp_loss_weight * total / cfg.n_mtp


def router_aux_loss(router: dict):
  """Sum of every MoE layer's sequence-wise balance loss (each a mean over its batch's sequences)."""
  return sum(stats["aux_loss"].sum() for stats in router.values())


def count_sequences(token_mask_BxL, segment_ids_BxL):
  """Sequences (packed segments) with at least one real token: the balance loss's unit."""
  tokens = moe.Tokens(token_mask_BxL, segment_ids_BxL)
  T = token_mask_BxL.size
  real_S = jax.ops.segment_sum(token_mask_BxL.reshape(T).astype(jnp.float32), moe.sequence_ids(tokens), T)
  return (real_S > 0).sum().astype(jnp.float32)
