"""The block-scaled FP8 GEMM as a Pallas Mosaic TPU kernel: an fp32 VMEM accumulator per output tile, one
`block`-deep MXU product per scaling block of K, scaled and added in fp32 (the V3 report §3.3.2
"promotion" every N_C = 128 elements); the grid's last axis walks K and writes the output at its end."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

try:  # Pallas and its Mosaic TPU backend are experimental: absent or renamed, the kernel is unavailable.
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  IMPORT_ERROR = None
except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the installed jax
  pl = pltpu = None
  IMPORT_ERROR = e

from r1jax.nn.fp8.kernels.util import manual_type, pad_rows, same_varying

SUBLANES_8BIT, LANES = 32, 128  # Mosaic's native tile of an 8-bit array is (32, 128); fp32's is (8, 128)


class Tiles(NamedTuple):
  """Output tile (bm x bn) and the most K (bk, a multiple of the scaling block) one grid step covers:
  several 128-deep products per step amortise the ~0.35 us fixed cost of a grid step. Defaults follow
  the Pallas TPU matmul guide's bf16 findings (512-wide tiles); not yet measured for this kernel."""

  bm: int = 512
  bn: int = 512
  bk: int = 512


def _kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, acc_ref, *, block: int, per_step: int):
  """acc += sum_s (a[:, s] @ b[:, s]^T) * as[rows, k_s] * bs[k_s, cols] over this step's `per_step`
  scaling blocks s; o = acc at the last K step.

  a_ref [bm, bk] and b_ref [bn, bk] e4m3; as_ref [bm, Kb] and bs_ref [Kb, bn] fp32 hold all K blocks'
  scales of this tile's rows and columns (fetched once per tile: their block index ignores k).
  """
  g, n_g = pl.program_id(2), pl.num_programs(2)

  @pl.when(g == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_BMxBN = acc_ref[...]
  for s in range(per_step):  # static: lane-aligned static slices of the VMEM tiles
    cols = slice(s * block, (s + 1) * block)
    # v5e/v6e MXUs have no fp8: e4m3 -> bf16 in VMEM is exact (3 of 7 mantissa, 4 of 8 exponent bits).
    # TPU v7-class MXUs multiply fp8 natively: there these two astype calls go and the e4m3 tiles feed the
    # dot directly (nothing else changes; libtpu 0.0.42 also compiles e4m3 operands for v5e, converting them).
    a_BMxB, b_BNxB = a_ref[:, cols].astype(jnp.bfloat16), b_ref[:, cols].astype(jnp.bfloat16)
    # Explicit DEFAULT (one bf16 pass, exact here): under jax_default_matmul_precision="highest" Mosaic
    # gets a bf16 matmul with fp32 contract precision and rejects it ("Bad lhs type").
    part_BMxBN = jax.lax.dot_general(a_BMxB, b_BNxB, (((1,), (1,)), ((), ())),
                                     precision=jax.lax.Precision.DEFAULT, preferred_element_type=jnp.float32)
    k = g * per_step + s
    acc_BMxBN = acc_BMxBN + part_BMxBN * _column(as_ref[...], k) * bs_ref[pl.ds(k, 1), :]
  acc_ref[...] = acc_BMxBN

  @pl.when(g == n_g - 1)
  def _():
    o_ref[...] = acc_BMxBN.astype(o_ref.dtype)


def _column(s_BMxKb, k):
  """Column k as [bm, 1] by a masked lane sum (exact: one nonzero term). Mosaic loads take dynamic
  sublane offsets (the row of bs above) but not lane offsets: it cannot prove them 128-aligned."""
  iota = jax.lax.broadcasted_iota(jnp.int32, s_BMxKb.shape, 1)
  return jnp.sum(jnp.where(iota == k, s_BMxKb, 0.0), axis=1, keepdims=True)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _k_step(K: int, block: int, bk: int) -> int:
  """The deepest multiple of `block` that divides K and is at most max(bk, block)."""
  Kb = K // block
  return block * max(d for d in range(1, Kb + 1) if Kb % d == 0 and d * block <= max(bk, block))


def scaled_matmul_nt(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, *, block: int, out_dtype, tiles: Tiles | None = None,
                     interpret=False):
  """a @ b^T with per-row, per-K-block scales on both operands, out_dtype result (the XLA reference is
  kernels/xla.py's scaled_matmul_nt). `interpret`: True or pltpu.InterpretParams() runs Pallas's interpreter (only
  the latter inside shard_map: the generic one trips JAX 0.10.2's varying-axes checks there)."""
  if IMPORT_ERROR is not None:
    raise RuntimeError(f"the Pallas TPU FP8 kernel needs jax.experimental.pallas.tpu: {IMPORT_ERROR}")
  (M, K), N = aq_MxK.shape, bq_NxK.shape[0]
  tiles = tiles or Tiles()
  if block % LANES or K % block or tiles.bm % SUBLANES_8BIT or tiles.bn % LANES:
    raise ValueError(f"Mosaic TPU tiles: block {block} must divide K {K} and be a multiple of {LANES}, "
                     f"bm {tiles.bm} of {SUBLANES_8BIT} (8-bit sublane tile), bn {tiles.bn} of {LANES}")
  # Small operands (decode, a few experts' rows) get a tile no larger than themselves, padded to Mosaic's.
  bm, bn = min(tiles.bm, _round_up(M, SUBLANES_8BIT)), min(tiles.bn, _round_up(N, LANES))
  bk = _k_step(K, block, tiles.bk)
  a, as_MxKb, b, bs_KbxN = pad_rows(aq_MxK, bm), pad_rows(as_MxKb, bm), pad_rows(bq_NxK, bn), pad_rows(bs_NxKb, bn).T
  a, as_MxKb, b, bs_KbxN = same_varying(a, as_MxKb, b, bs_KbxN)
  Kb = K // block
  out = pl.pallas_call(
      functools.partial(_kernel, block=block, per_step=bk // block),
      grid=(a.shape[0] // bm, b.shape[0] // bn, K // bk),
      # Scale blocks span all Kb (equal to the full dim, which Mosaic's (8, 128) rule accepts for any Kb).
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, g: (i, g)), pl.BlockSpec((bm, Kb), lambda i, j, g: (i, 0)),
                pl.BlockSpec((bn, bk), lambda i, j, g: (j, g)), pl.BlockSpec((Kb, bn), lambda i, j, g: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, g: (i, j)),
      out_shape=jax.ShapeDtypeStruct((a.shape[0], b.shape[0]), out_dtype, **manual_type(a)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name=f"fp8_block{block}_gemm_tpu",
  )(a, as_MxKb, b, bs_KbxN)
  return out[:M, :N]
