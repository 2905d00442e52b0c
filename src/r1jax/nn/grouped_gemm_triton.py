"""The routed experts' grouped GEMMs as Pallas (Triton) GPU kernels. Rows come sorted by expert with every
expert's group starting at a multiple of the row tile (grouped_gemm.layout), so a row tile belongs to one expert,
which the kernel reads from `tile_group_G` (G row tiles) before it reads that expert's weights: the idea of
megablox, without scalar prefetch. Tiles past `used` (the row bound is static, the groups are not) are written as
zeros without a product. Three kernels make the forward and both backward GEMMs:

  gmm   out_RxN = x_RxK @ w[g]_KxN per row tile (transpose_w: x_RxN @ w[g]^T, the input gradient)
  tgmm  dw_ExKxN = x_g^T @ dy_g over each expert's row tiles (the weight gradient; empty experts get zeros)

Shape key: R sorted rows (a multiple of the tile), E experts (groups), G = R / bm row tiles; K and N are the
GEMM's own contraction and output dims (model.py's key does not apply here)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from r1jax.nn.fp8.kernels.util import grouped_tile, manual_type, same_varying

try:  # Pallas and its Triton backend are experimental: absent or renamed, the kernels are unavailable.
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
  COMPILER_PARAMS = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams  # older name
  IMPORT_ERROR = None
except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the installed jax
  pl = plgpu = COMPILER_PARAMS = None
  IMPORT_ERROR = e


class Tiles(NamedTuple):
  """bn output columns per program and bk-deep K steps (the row tile bm is the layout's), Triton's launch
  knobs, and `group_m` row tiles visited together so that their expert's column panel stays in L2."""

  bn: int = 128
  bk: int = 64
  num_warps: int = 4
  num_stages: int = 3
  group_m: int = 8


SHARED_MEMORY = 227 * 1024  # bytes a Hopper thread block may use


def _check(R: int, K: int, N: int, bm: int, bk: int, bn: int, step_elements: int, stages: int):
  """Tile sizes the kernels can take; a K step's operand tiles (`step_elements` of 2 bytes) are buffered `stages`
  deep in shared memory (Triton's software pipeline)."""
  if stages * step_elements * 2 > SHARED_MEMORY:
    raise ValueError(f"grouped GEMM tiles (bm {bm}, bk {bk}, bn {bn}) need {stages * step_elements * 2} bytes of "
                     f"shared memory in {stages} stages, more than {SHARED_MEMORY}")
  if IMPORT_ERROR is not None:
    raise RuntimeError(f"the Pallas Triton grouped GEMM needs jax.experimental.pallas.triton: {IMPORT_ERROR}")
  if any(v < 16 or v & (v - 1) for v in (bm, bk, bn)):
    raise ValueError(f"grouped GEMM tiles must be powers of two >= 16: bm {bm}, bk {bk}, bn {bn}")
  if R % bm or K % bk or N % bn:
    raise ValueError(f"grouped GEMM shapes must divide into tiles: R {R} / {bm}, K {K} / {bk}, N {N} / {bn}")


def _gmm_kernel(tg_ref, used_ref, x_ref, w_ref, o_ref, *, n_m, n_n, group_m, bk, n_k, transpose_w):
  i, j = grouped_tile(pl.program_id(0), n_m, n_n, group_m)
  bm, bn = o_ref.shape
  active = i < used_ref[0]

  @pl.when(active)
  def _():
    g = tg_ref[i]

    def step(k, acc):
      cols = pl.ds(pl.multiple_of(k * bk, bk), bk)
      out_cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
      if transpose_w:  # w[g] is [N_out, K_in] here: contract x's columns with w's
        part = jax.lax.dot_general(x_ref[:, cols], w_ref[g, out_cols, cols], (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
      else:
        part = jnp.dot(x_ref[:, cols], w_ref[g, cols, out_cols], preferred_element_type=jnp.float32)
      return acc + part

    o_ref[...] = jax.lax.fori_loop(0, n_k, step, jnp.zeros((bm, bn), jnp.float32)).astype(o_ref.dtype)

  @pl.when(jnp.logical_not(active))
  def _():
    o_ref[...] = jnp.zeros((bm, bn), o_ref.dtype)


def gmm(x_RxK, w_ExKxN, tile_group_G, used, *, bm: int, transpose_w: bool = False, tiles: Tiles | None = None,
        interpret: bool = False):
  """Each row tile of x times its expert's weight (transpose_w: times its transpose, w read as [E, N, K]),
  x's dtype out, fp32 accumulation."""
  tiles = tiles or Tiles()
  R, K = x_RxK.shape
  N = w_ExKxN.shape[1] if transpose_w else w_ExKxN.shape[2]
  _check(R, K, N, bm, tiles.bk, tiles.bn, (bm + tiles.bn) * tiles.bk, tiles.num_stages)
  n_m, n_n = R // bm, N // tiles.bn
  x_RxK, w_ExKxN = same_varying(x_RxK, w_ExKxN)
  ij = functools.partial(grouped_tile, n_m=n_m, n_n=n_n, group_m=max(1, tiles.group_m))
  kernel = functools.partial(_gmm_kernel, n_m=n_m, n_n=n_n, group_m=max(1, tiles.group_m), bk=tiles.bk,
                             n_k=K // tiles.bk, transpose_w=transpose_w)
  return pl.pallas_call(
      kernel,
      grid=(n_m * n_n,),
      in_specs=[pl.BlockSpec(tile_group_G.shape, lambda p: (0,)), pl.BlockSpec((1,), lambda p: (0,)),
                pl.BlockSpec((bm, K), lambda p: (ij(p)[0], 0)), pl.BlockSpec(w_ExKxN.shape, lambda p: (0, 0, 0))],
      out_specs=pl.BlockSpec((bm, tiles.bn), ij),
      out_shape=jax.ShapeDtypeStruct((R, N), x_RxK.dtype, **manual_type(x_RxK)),
      compiler_params=COMPILER_PARAMS(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
      interpret=interpret,
      name="grouped_gemm_t" if transpose_w else "grouped_gemm",
  )(tile_group_G, jnp.reshape(used, (1,)).astype(jnp.int32), x_RxK, w_ExKxN)


def _tgmm_kernel(start_ref, count_ref, x_ref, dy_ref, o_ref, *, n_k, n_n, bm):
  p = pl.program_id(0)
  e, kn = p // (n_k * n_n), p % (n_k * n_n)
  bk, bn = o_ref.shape
  rows_k = pl.ds(pl.multiple_of((kn // n_n) * bk, bk), bk)
  cols_n = pl.ds(pl.multiple_of((kn % n_n) * bn, bn), bn)
  first = start_ref[e]

  def step(t, acc):
    rows = pl.ds(pl.multiple_of((first + t) * bm, bm), bm)
    return acc + jax.lax.dot_general(x_ref[rows, rows_k], dy_ref[rows, cols_n], (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  o_ref[...] = jax.lax.fori_loop(0, count_ref[e], step, jnp.zeros((bk, bn), jnp.float32)).astype(o_ref.dtype)


def tgmm(x_RxK, dy_RxN, tile_start_E, tiles_E, *, bm: int, out_dtype, tiles: Tiles | None = None,
         interpret: bool = False):
  """dw[e] = x[rows of e]^T @ dy[rows of e] for every expert e, its rows being the row tiles
  [tile_start_E[e], tile_start_E[e] + tiles_E[e]); fp32 accumulation over all of them, `out_dtype` out."""
  tiles = tiles or Tiles()
  R, K = x_RxK.shape
  N = dy_RxN.shape[1]
  E = tiles_E.shape[0]
  # Square output tiles of at most 128: each step buffers bm rows of x and of dy, so a 256-wide tile would take
  # 3 x 128 x 512 bf16 (384 KiB, over the H100's shared memory; a review compiled it with Triton 3.6).
  bk = bn = min(tiles.bn, 128)
  stages = max(1, min(tiles.num_stages, SHARED_MEMORY // (2 * bm * (bk + bn))))  # as deep as fits (3 at 128)
  _check(R, K, N, bm, bk, bn, bm * (bk + bn), stages)
  n_k, n_n = K // bk, N // bn
  x_RxK, dy_RxN = same_varying(x_RxK, dy_RxN)
  kernel = functools.partial(_tgmm_kernel, n_k=n_k, n_n=n_n, bm=bm)
  return pl.pallas_call(
      kernel,
      grid=(E * n_k * n_n,),
      in_specs=[pl.BlockSpec((E,), lambda p: (0,)), pl.BlockSpec((E,), lambda p: (0,)),
                pl.BlockSpec((R, K), lambda p: (0, 0)), pl.BlockSpec((R, N), lambda p: (0, 0))],
      out_specs=pl.BlockSpec((pl.squeezed, bk, bn), lambda p: (p // (n_k * n_n), (p % (n_k * n_n)) // n_n,
                                                               p % n_n)),
      out_shape=jax.ShapeDtypeStruct((E, K, N), out_dtype, **manual_type(x_RxK)),
      compiler_params=COMPILER_PARAMS(num_warps=tiles.num_warps, num_stages=stages),
      interpret=interpret,
      name="grouped_gemm_dw",
  )(tile_start_E.astype(jnp.int32), tiles_E.astype(jnp.int32), x_RxK, dy_RxN)
