"""The block-scaled GEMM primitive, a @ b^T with per-row per-K-block scales, as XLA einsums over K blocks:
the reference formulation (any backend; GSPMD partitions it), beside the Pallas kernels of this folder."""

from __future__ import annotations

import jax
import jax.numpy as jnp

PARTIAL_BYTES = 1 << 30  # the XLA path's fp32 partial products [c, M, N] for c K blocks at a time


def exact_operands(*qs):
  """e4m3 operands as the backend's dot takes them: as they are on GPU (XLA's fp8 GEMM); elsewhere as bf16,
  which is exact (e4m3's 3 mantissa and 4 exponent bits fit in bf16's 7 and 8) and native on TPU. On GPU
  behind a barrier: where XLA upcasts an fp8 dot it cannot hand to cuBLAS, its GPU compiler (excess precision
  allowed) may drop the f32 -> e4m3 -> wider convert pair, i.e. skip the quantisation; it did so to the wgrad
  requantisation on an H200 (act_tiles)."""
  if jax.default_backend() == "gpu":
    return jax.lax.optimization_barrier(qs)
  return tuple(q.astype(jnp.bfloat16) for q in qs)


def mm_f32(spec: str, a, b):
  """e4m3 x e4m3 -> fp32 einsum (exact_operands)."""
  return jnp.einsum(spec, *exact_operands(a, b), preferred_element_type=jnp.float32)


def k_chunk(n_blocks: int, bytes_per_block: int) -> int:
  """The most K blocks (a divisor of n_blocks) whose fp32 partial products fit in PARTIAL_BYTES."""
  fits = max(1, PARTIAL_BYTES // max(bytes_per_block, 1))
  return max(c for c in range(1, n_blocks + 1) if n_blocks % c == 0 and c <= fits)


def scaled_matmul_nt(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, *, block: int, out_dtype):
  """a @ b^T = sum over K blocks of fp32(a_k @ b_k^T) * as[:, k] * bs[:, k] (V3 report §3.3.2 promotion).

  The [M, Kb, N] partials of one einsum would take 17 GB at the V3 dense-up shape (4096 x 56 x 18432
  fp32), so c K blocks go at a time (as many as fit in PARTIAL_BYTES) into an fp32 accumulator.
  """
  (M, K), N = aq_MxK.shape, bq_NxK.shape[0]
  Kb = K // block
  c = k_chunk(Kb, M * N * 4)
  a_MxKbxB, b_NxKbxB = aq_MxK.reshape(M, Kb, block), bq_NxK.reshape(N, Kb, block)

  def chunk_sum(i):
    sl = lambda t: jax.lax.dynamic_slice_in_dim(t, i * c, c, axis=1)  # noqa: E731
    p_CxMxN = mm_f32("mcb,ncb->cmn", sl(a_MxKbxB), sl(b_NxKbxB))
    return jnp.sum(p_CxMxN * sl(as_MxKb).T[:, :, None] * sl(bs_NxKb).T[:, None, :], axis=0)

  if c == Kb:
    acc_MxN = chunk_sum(0)
  else:
    acc_MxN = jax.lax.fori_loop(0, Kb // c, lambda i, acc: acc + chunk_sum(i), jnp.zeros((M, N), jnp.float32))
  return acc_MxN.astype(out_dtype)

