"""DeepSeek-V3's block-scaled FP8 GEMM (V3 report §3.3; nn/fp8/dot.py) as a grouped GEMM over rows sorted by
expert, the FP8 form of `jax.lax.ragged_dot`: x in 1 x block tiles, each expert's weight in block x block
tiles, e4m3 products promoted to fp32 every block-deep K step; dgrad and wgrad in FP8 too (custom_vjp).

G groups (experts) own contiguous rows of x, `group_sizes_G` of them in order; rows past their sum belong
to no group and give zeros, as in lax.ragged_dot."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from r1jax.nn.fp8.kernels import util, xla
from r1jax.nn.fp8.quantize import dequantize_act, quantize_act, quantize_weight

__all__ = ["grouped_scaled_matmul", "ragged_dot"]


def _row_groups(group_sizes_G, n: int):
  """The group of each of n rows (rows past sum(group_sizes) get the last group: their products are 0)."""
  ends_G = jnp.cumsum(group_sizes_G)
  gid = jnp.searchsorted(ends_G, jnp.arange(n, dtype=ends_G.dtype), side="right")
  return jnp.minimum(gid, group_sizes_G.shape[0] - 1)


def _ragged_f32(a_NxB, b_GxBxF, group_sizes_G):
  """e4m3 x e4m3 -> fp32 ragged product of one K block (xla.exact_operands). Two-dimensional on purpose: XLA
  GPU (JAX 0.11.2) rejects a ragged_dot_general with batch dimensions ("dimension number is not unique in
  Dot", on an H200), so K blocks are not batched."""
  return jax.lax.ragged_dot(*xla.exact_operands(a_NxB, b_GxBxF), group_sizes_G, preferred_element_type=jnp.float32)


def grouped_scaled_matmul(aq_NxK, as_NxKb, bq_GxKxF, bs_GxKbxFb, group_sizes_G, *, block: int, out_dtype):
  """Row n of a times its group's b: sum over K blocks of fp32(a_k @ b[g]_k) * as[n, k] * bs[g, k, f/block]
  (V3 report §3.3.2 promotion); c K blocks per loop step, their fp32 partials bounded as in xla.k_chunk."""
  (N, K), F = aq_NxK.shape, bq_GxKxF.shape[-1]
  Kb, Fb = K // block, F // block
  c = xla.k_chunk(Kb, N * F * 4)
  gid_N = _row_groups(group_sizes_G, N)

  def block_product(k):
    a_NxB = jax.lax.dynamic_slice_in_dim(aq_NxK, k * block, block, axis=1)
    b_GxBxF = jax.lax.dynamic_slice_in_dim(bq_GxKxF, k * block, block, axis=1)
    p_NxFbxB = _ragged_f32(a_NxB, b_GxBxF, group_sizes_G).reshape(N, Fb, block)
    ws_NxFb = jnp.take(jax.lax.dynamic_index_in_dim(bs_GxKbxFb, k, axis=1, keepdims=False), gid_N, axis=0)
    as_N = jax.lax.dynamic_index_in_dim(as_NxKb, k, axis=1, keepdims=False)
    return (p_NxFbxB * as_N[:, None, None] * ws_NxFb[:, :, None]).reshape(N, F)

  chunk_sum = lambda i: sum(block_product(i * c + j) for j in range(c))  # noqa: E731
  # The loop starts from the first chunk, not zeros: inside shard_map its carry must vary like the partials.
  acc_NxF = jax.lax.fori_loop(1, Kb // c, lambda i, acc: acc + chunk_sum(i), chunk_sum(0))
  return acc_NxF.astype(out_dtype)


def _tile_layout(group_sizes_G, N: int, block: int, n_tiles: int):
  """Rows moved so that each group starts on a `block` boundary: (padded position of each row, or
  n_tiles * block, out of range, for rows in no group; the group of each of the n_tiles block-row tiles)."""
  tiles_G = (group_sizes_G + block - 1) // block
  start_G, pstart_G = jnp.cumsum(group_sizes_G) - group_sizes_G, (jnp.cumsum(tiles_G) - tiles_G) * block
  gid_N = _row_groups(group_sizes_G, N)
  row_N = jnp.arange(N, dtype=group_sizes_G.dtype)
  pos_N = jnp.where(row_N < jnp.sum(group_sizes_G), pstart_G[gid_N] + row_N - start_G[gid_N], n_tiles * block)
  return pos_N, _row_groups(tiles_G, n_tiles)  # tiles past the last group's are all zero


def _wgrad(x_NxK, dy_NxF, group_sizes_G, block: int, pow2: bool):
  """dw[g] = x_g^T dy_g, contracting over tokens with x and dy in block x 1 tiles (per channel per `block`
  tokens, V3 report Figure 6), promoted to fp32 per token tile, each tile added to its group's dw.

  Tiles are per group: each group's rows start a fresh tile (zero rows pad it). A tile straddling two
  experts would share one scale between them (one expert's outlier coarsening the other's gradient) and
  would need a split contraction inside it; DeepSeek's grouped GEMMs (DeepGEMM's contiguous layout) align
  each expert's rows to the 128-row block likewise. The cost is at most block - 1 zero rows per group.
  """
  (N, K), F, G = x_NxK.shape, dy_NxF.shape[-1], group_sizes_G.shape[0]
  T = (N + G * (block - 1)) // block  # >= sum over groups of ceil(size / block), the tiles in use
  fits = max(1, xla.PARTIAL_BYTES // (K * F * 4))  # fp32 partials [c, K, F] of c tiles at a time
  n_chunks = -(-T // fits)
  c = -(-T // n_chunks)  # the fewest chunks, evened out: at most n_chunks - 1 extra all-zero tiles
  pos_N, tile_group_T = _tile_layout(group_sizes_G, N, block, n_chunks * c)

  def tokens_last(t_NxD):
    """Rows to their padded positions (rows in no group dropped), then channels x tokens, quantised per
    channel per `block` tokens: ([D, T*block] e4m3 as [D, T, block], scales [D, T])."""
    t_PxD = jnp.zeros((n_chunks * c * block, t_NxD.shape[1]), jnp.float32).at[pos_N].set(t_NxD, mode="drop")
    q_DxP, s_DxT = quantize_act(t_PxD.T, block, pow2)
    return q_DxP.reshape(-1, n_chunks * c, block), s_DxT

  xq_KxTxB, xs_KxT = tokens_last(x_NxK)
  dyq_FxTxB, dys_FxT = tokens_last(dy_NxF.astype(jnp.float32))

  def add_chunk(i, dw_GxKxF):
    sl = lambda t: jax.lax.dynamic_slice_in_dim(t, i * c, c, axis=1)  # noqa: E731
    p_CxKxF = xla.mm_f32("kcb,fcb->ckf", sl(xq_KxTxB), sl(dyq_FxTxB))
    p_CxKxF = p_CxKxF * sl(xs_KxT).T[:, :, None] * sl(dys_FxT).T[:, None, :]
    return dw_GxKxF.at[jax.lax.dynamic_slice_in_dim(tile_group_T, i * c, c)].add(p_CxKxF)

  # Started from the first chunk, so that inside shard_map the carry varies like the partials.
  return jax.lax.fori_loop(1, n_chunks, add_chunk, add_chunk(0, jnp.zeros((G, K, F), jnp.float32)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ragged(x_NxK, w_GxKxF, group_sizes_G, block, pow2):
  return _ragged_fwd(x_NxK, w_GxKxF, group_sizes_G, block, pow2)[0]


def _ragged_fwd(x_NxK, w_GxKxF, group_sizes_G, block, pow2):
  xq_NxK, xs_NxKb = quantize_act(x_NxK, block, pow2)
  wq_GxKxF, ws_GxKbxFb = quantize_weight(w_GxKxF, block, pow2)
  y_NxF = grouped_scaled_matmul(xq_NxK, xs_NxKb, wq_GxKxF, ws_GxKbxFb, group_sizes_G, block=block,
                                out_dtype=x_NxK.dtype)
  return y_NxF, (xq_NxK, xs_NxKb, w_GxKxF, group_sizes_G)  # residuals as dot.py's forward keeps them


def _ragged_bwd(block, pow2, res, dy_NxF):
  """dgrad: dy in 1 x block tiles against each group's w^T in the same block x block tiles; wgrad: the
  cached fp8 x dequantised and requantised with dy in block x 1 tiles per group (as dot.py's backward)."""
  xq_NxK, xs_NxKb, w_GxKxF, group_sizes_G = res
  wq_GxKxF, ws_GxKbxFb = quantize_weight(w_GxKxF, block, pow2)
  dyq_NxF, dys_NxFb = quantize_act(dy_NxF, block, pow2)
  dx_NxK = grouped_scaled_matmul(dyq_NxF, dys_NxFb, wq_GxKxF.transpose(0, 2, 1), ws_GxKbxFb.transpose(0, 2, 1),
                                 group_sizes_G, block=block, out_dtype=dy_NxF.dtype)
  dw_GxKxF = _wgrad(dequantize_act(xq_NxK, xs_NxKb), dy_NxF, group_sizes_G, block, pow2)
  return util.sum_to(dx_NxK, xq_NxK), util.sum_to(dw_GxKxF.astype(w_GxKxF.dtype), w_GxKxF), None


_ragged.defvjp(_ragged_fwd, _ragged_bwd)


def ragged_dot(x_NxK, w_GxKxF, group_sizes_G, block: int = 128, pow2: bool = False):
  """lax.ragged_dot(x, w, group_sizes) as the block-scaled FP8 GEMM, in x's dtype; FP8 dgrad and wgrad.

  Rows of x are contiguous per group; rows past sum(group_sizes) give zeros. No gradient for group_sizes.
  """
  if x_NxK.ndim != 2 or w_GxKxF.ndim != 3 or x_NxK.shape[1] != w_GxKxF.shape[1]:
    raise ValueError(f"fp8.ragged.ragged_dot: x {x_NxK.shape} and w {w_GxKxF.shape} need [N, K] and [G, K, F]")
  if group_sizes_G.shape != w_GxKxF.shape[:1] or not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
    raise ValueError(f"fp8.ragged.ragged_dot: group_sizes {group_sizes_G.shape} {group_sizes_G.dtype} must be "
                     f"integers, one per group of w {w_GxKxF.shape}")
  _, K, F = w_GxKxF.shape
  if K % block or F % block:
    raise ValueError(f"fp8.ragged.ragged_dot: weight shape {w_GxKxF.shape} needs K and F multiples of block {block}")
  return _ragged(x_NxK, w_GxKxF, group_sizes_G, block, pow2)
