"""The block-scaled FP8 GEMM as a Pallas (Triton) GPU kernel: one fp32 accumulator per output tile, one
`block`-deep e4m3 tensor-core product per K step, scaled and added in fp32 (the V3 report §3.3.2
"promotion" to CUDA cores every N_C = 128 elements, as in DeepSeek's inference/kernel.py fp8_gemm)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from r1jax.nn.fp8.kernels.util import grouped_tile, manual_type, pad_rows, same_varying

try:  # Pallas and its Triton backend are experimental: absent or renamed, the kernel is unavailable.
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
  COMPILER_PARAMS = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams  # older name
  IMPORT_ERROR = None
except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the installed jax
  pl = plgpu = COMPILER_PARAMS = None
  IMPORT_ERROR = e


class Tiles(NamedTuple):
  """Output tile (bm x bn), Triton launch knobs, and `group_m` row tiles visited together so that their
  column panels of b stay in L2 (Triton's grouped ordering); BK is the scaling block. Defaults: the best
  of r1jax.bench.fp8_gemms.tune at the V3 shapes on one H200 (JAX 0.11.2, Triton via Pallas)."""

  bm: int = 64
  bn: int = 128
  num_warps: int = 4
  num_stages: int = 4
  group_m: int = 8


def _kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, *, block: int, n_k: int):
  """o = sum_k (a[:, k] @ b[:, k]^T) * as[k, rows] * bs[k, cols], k over `block`-deep slices of K.

  a_ref [bm, K] e4m3, b_ref [bn, K] e4m3 (K-major, the layout Hopper's fp8 wgmma wants for both
  operands), as_ref [Kb, bm] and bs_ref [Kb, bn] fp32 (scales stored K-block-major: one contiguous load
  per step). e4m3 dots also run in interpret mode on CPU, so there is no upcast path. Pallas emits the
  Triton dot without max_num_imprecise_acc, so Triton itself adds every 32-deep fp8 wgmma into fp32: 1.5e-7
  from float64 on an H200, but 1.5-1.9x slower than the 128-deep tensor-core chain DeepSeek uses.
  """
  bm, bn = o_ref.shape

  def step(k, acc_BMxBN):
    cols = pl.ds(pl.multiple_of(k * block, block), block)
    part = jax.lax.dot_general(a_ref[:, cols], b_ref[:, cols], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
    return acc_BMxBN + part * as_ref[k, :][:, None] * bs_ref[k, :][None, :]

  acc = jax.lax.fori_loop(0, n_k, step, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def scaled_matmul_nt(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, *, block: int, out_dtype, tiles: Tiles | None = None,
                     interpret: bool = False):
  """a @ b^T with per-row, per-K-block scales on both operands, out_dtype result (the XLA reference is
  kernels/xla.py's scaled_matmul_nt). Rows of a and b are zero-padded to the tile sizes and cropped after."""
  if IMPORT_ERROR is not None:
    raise RuntimeError(f"the Pallas Triton FP8 kernel needs jax.experimental.pallas.triton: {IMPORT_ERROR}")
  M, K = aq_MxK.shape
  N = bq_NxK.shape[0]
  Kb = K // block
  tiles = tiles or Tiles()
  bm, bn = tiles.bm, tiles.bn
  if any(v < 16 or v & (v - 1) for v in (block, bm, bn)):
    raise ValueError(f"Triton tiles must be powers of two >= 16: block {block}, bm {bm}, bn {bn}")
  a, b = pad_rows(aq_MxK, bm), pad_rows(bq_NxK, bn)
  as_KbxM, bs_KbxN = pad_rows(as_MxKb, bm).T, pad_rows(bs_NxKb, bn).T
  a, as_KbxM, b, bs_KbxN = same_varying(a, as_KbxM, b, bs_KbxN)
  n_m, n_n = a.shape[0] // bm, b.shape[0] // bn
  ij = functools.partial(grouped_tile, n_m=n_m, n_n=n_n, group_m=max(1, tiles.group_m))
  out = pl.pallas_call(
      functools.partial(_kernel, block=block, n_k=Kb),
      grid=(n_m * n_n,),
      in_specs=[pl.BlockSpec((bm, K), lambda p: (ij(p)[0], 0)), pl.BlockSpec((Kb, bm), lambda p: (0, ij(p)[0])),
                pl.BlockSpec((bn, K), lambda p: (ij(p)[1], 0)), pl.BlockSpec((Kb, bn), lambda p: (0, ij(p)[1]))],
      out_specs=pl.BlockSpec((bm, bn), lambda p: ij(p)),
      out_shape=jax.ShapeDtypeStruct((n_m * bm, n_n * bn), out_dtype, **manual_type(a)),
      compiler_params=COMPILER_PARAMS(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
      interpret=interpret,
      name=f"fp8_block{block}_gemm",
  )(a, as_KbxM, b, bs_KbxN)
  return out[:M, :N]
