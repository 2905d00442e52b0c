"""Blockwise attention: flash attention's algorithm (Rabe & Staats 2021; Dao et al. 2022) in plain JAX. The keys
are visited in blocks of `block` with an online softmax, so no [L, S] score matrix exists in the forward or
the backward pass: a custom_vjp keeps the output and each query's log-sum-exp and recomputes a block's
probabilities when it differentiates it. Memory is O(L x block) per head instead of O(L x S).

It is written with einsums and a scan over key blocks, so GSPMD partitions it like any einsum: under context
parallelism each shard's queries (a slice of L, whatever its offset) run through the same blocks of the
gathered keys, with the loop's carry split along L. That is what makes 128K over `context` fit where
attention.xla_attend's scores would not. Precision as xla_attend: fp32 scores, statistics and accumulators,
matmul inputs in the input dtype (probabilities cast to v's dtype for the second matmul).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from r1jax.sharding import constrain

F32 = jnp.float32
MASKED = float(jnp.finfo(F32).min)  # finite: a row whose first block is all masked gets weights that the first
# visible key's rescaling exp(MASKED - m) = 0 erases (causal rows always see their own position)


def attend(q_BxLxHxDk, k_BxLxHkvxDk, v_BxLxHkvxDv, scale: float, segment_ids_BxL=None, block: int = 512):
  """Causal softmax(q k^T * scale) v over a training row (keys at the queries' positions, S == L), within
  packed segments when `segment_ids_BxL` is given; query head h reads kv head h // (H / Hkv). Returns
  o_BxLxHxDv in q's dtype."""
  B, L, H, Dk = q_BxLxHxDk.shape
  S, Hkv = k_BxLxHkvxDk.shape[1:3]
  if S != L:
    raise ValueError(f"blockwise attention is for training rows (keys = queries): got L={L}, S={S}")
  C = min(block, L)
  n = math.ceil(L / C)
  # keys padded to whole blocks sit at index >= L: causally invisible to every query
  pad = lambda x: jnp.pad(x, [(0, 0), (0, n * C - L)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
  seg_BxL = jnp.zeros((B, L), jnp.int32) if segment_ids_BxL is None else segment_ids_BxL.astype(jnp.int32)
  q5 = q_BxLxHxDk.reshape(B, L, Hkv, H // Hkv, Dk)
  o5 = _flash(q5, pad(k_BxLxHkvxDk), pad(v_BxLxHkvxDv), seg_BxL, pad(seg_BxL), scale, C)
  return o5.reshape(B, L, H, v_BxLxHkvxDv.shape[-1])


def _blocks(x_BxSx, C: int):
  """[B, n*C, ...] -> [n, B, C, ...]: the scan's key blocks."""
  return jnp.moveaxis(x_BxSx.reshape(x_BxSx.shape[0], -1, C, *x_BxSx.shape[2:]), 1, 0)


def _carry(x):
  """The loop carry [B, Hkv, G, L, ...] split as the queries are (batch, heads over tensor, L over context)."""
  return constrain(x, "batch", "act_heads", None, "seq", *[None] * (x.ndim - 4))


def _scores(q5, k_BxCxHkvxDk, seg_BxL, kseg_BxC, j, C: int, scale: float):
  """Key block j's masked fp32 scores [B, Hkv, G, L, C]."""
  L = q5.shape[1]
  s = jnp.einsum("blkgd,bckd->bkglc", q5, k_BxCxHkvxDk, preferred_element_type=F32) * scale
  visible_BxLxC = (jnp.arange(L)[:, None] >= j * C + jnp.arange(C)[None, :])[None]
  visible_BxLxC = visible_BxLxC & (seg_BxL[:, :, None] == kseg_BxC[:, None, :])
  return jnp.where(visible_BxLxC[:, None, None], s, MASKED)


def _forward(q5, k, v, seg_BxL, kseg_BxS, scale: float, C: int):
  B, L, Hkv, G, _ = q5.shape
  Dv = v.shape[-1]

  def step(carry, xs):
    m, l, acc = carry
    j, k_j, v_j, kseg_j = xs
    s = _scores(q5, k_j, seg_BxL, kseg_j, j, C, scale)
    m_new = jnp.maximum(m, s.max(-1))
    rescale, p = jnp.exp(m - m_new), jnp.exp(s - m_new[..., None])
    l = l * rescale + p.sum(-1)
    acc = acc * rescale[..., None] + jnp.einsum("bkglc,bckd->bkgld", p.astype(v.dtype), v_j,
                                                preferred_element_type=F32)
    return (_carry(m_new), _carry(l), _carry(acc)), None

  init = (_carry(jnp.full((B, Hkv, G, L), MASKED, F32)), _carry(jnp.zeros((B, Hkv, G, L), F32)),
          _carry(jnp.zeros((B, Hkv, G, L, Dv), F32)))
  n = k.shape[1] // C
  (m, l, acc), _ = jax.lax.scan(step, init, (jnp.arange(n), _blocks(k, C), _blocks(v, C), _blocks(kseg_BxS, C)))
  o5 = jnp.einsum("bkgld->blkgd", acc / l[..., None]).astype(q5.dtype)
  return o5, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q5, k, v, seg_BxL, kseg_BxS, scale: float, C: int):
  return _forward(q5, k, v, seg_BxL, kseg_BxS, scale, C)[0]


def _flash_fwd(q5, k, v, seg_BxL, kseg_BxS, scale: float, C: int):
  o5, lse = _forward(q5, k, v, seg_BxL, kseg_BxS, scale, C)
  return o5, (q5, k, v, seg_BxL, kseg_BxS, o5, lse)


def _flash_bwd(scale: float, C: int, res, do5):
  """Flash attention's backward pass: per key block, p = exp(s - lse), dv = p^T do, ds = p (do v^T - D) with
  D = rowsum(do * o), dq += ds k, dk = ds^T q."""
  q5, k, v, seg_BxL, kseg_BxS, o5, lse = res
  d = jnp.einsum("blkgd,blkgd->bkgl", do5.astype(F32), o5.astype(F32))

  def step(dq, xs):
    j, k_j, v_j, kseg_j = xs
    p = jnp.exp(_scores(q5, k_j, seg_BxL, kseg_j, j, C, scale) - lse[..., None])
    dv_j = jnp.einsum("bkglc,blkgd->bckd", p.astype(do5.dtype), do5, preferred_element_type=F32)
    dp = jnp.einsum("blkgd,bckd->bkglc", do5, v_j, preferred_element_type=F32)
    ds = p * (dp - d[..., None]) * scale
    dq = dq + jnp.einsum("bkglc,bckd->blkgd", ds.astype(k_j.dtype), k_j, preferred_element_type=F32)
    dq = constrain(dq, "batch", "seq", "act_heads", None, None)
    dk_j = jnp.einsum("bkglc,blkgd->bckd", ds.astype(q5.dtype), q5, preferred_element_type=F32)
    return dq, (dk_j.astype(k.dtype), dv_j.astype(v.dtype))

  n = k.shape[1] // C
  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q5.shape, F32),
                              (jnp.arange(n), _blocks(k, C), _blocks(v, C), _blocks(kseg_BxS, C)))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])  # noqa: E731
  return dq.astype(q5.dtype), unblock(dk), unblock(dv), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
