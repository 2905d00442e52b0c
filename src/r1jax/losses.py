"""Masked cross-entropy, the multi-token-prediction loss and the router's balance loss, all in fp32."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.nn import mtp


def cross_entropy(logits_BxLxV, targets_BxL, mask_BxL):
  """Mean token cross-entropy over mask; returns (loss, number of tokens)."""
  chex.assert_equal_shape([logits_BxLxV[..., 0], targets_BxL, mask_BxL])
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  nll_BxL = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
  mask_BxL = mask_BxL.astype(jnp.float32)
  n = mask_BxL.sum()
  return (nll_BxL * mask_BxL).sum() / jnp.maximum(n, 1.0), n


def mtp_loss(mtp_logits_NxBxLxV, targets_BxL, mask_BxL, segment_ids_BxL, cfg: ModelConfig):
  """L_MTP = lambda / D * sum_k CE_k (V3 eq. 25). Depth k at position i predicts targets[i + k]."""
  total = jnp.zeros((), jnp.float32)
  for k in range(1, cfg.n_mtp + 1):
    same_segment = mtp.shift_left(segment_ids_BxL, k, fill=-1) == segment_ids_BxL
    mask_k = mtp.shift_left(mask_BxL.astype(jnp.float32), k) * same_segment
    total = total + cross_entropy(mtp_logits_NxBxLxV[k - 1], mtp.shift_left(targets_BxL, k), mask_k)[0]
  return cfg.mtp_loss_weight * total / cfg.n_mtp


def router_aux_loss(router: dict):
  """Sum of every MoE layer's sequence-wise balance loss."""
  return sum(stats["aux_loss"].sum() for stats in router.values())
