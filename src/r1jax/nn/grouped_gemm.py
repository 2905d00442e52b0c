"""Dropless routed experts as one grouped GEMM over rows sorted by expert (MegaBlocks, arXiv 2211.15841; the
V3 report's "no token-dropping"). `layout` sorts a shard's (token, slot) pairs by expert into R rows where every
expert's group starts at a multiple of the row tile `bm`, so no row tile spans two experts. R is a static bound,
T*K + E*(bm - 1) rounded up to bm, against E*T rows for capacity-padded buffers that cannot drop: the rows past
the used tiles are never computed. `swiglu` runs the expert SwiGLU on that layout with three grouped GEMMs,
either the Pallas Triton kernels (grouped_gemm_triton.py, GPU) or XLA's ragged_dot (any backend: the reference).

Shape key: T tokens, K experts per token, E experts, D model dim, F expert width, R sorted rows, G = R/bm row
tiles."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.nn import grouped_gemm_triton as triton
from r1jax.nn.fp8.kernels.util import sum_to

IMPLS = ("triton", "xla")


class Layout(NamedTuple):
  """Where each (token, slot) pair's row lies among the R sorted rows, and which expert each row tile is."""

  row_TK: jax.Array  # [T*K] row of each pair; R for a pair that takes none (a padding token)
  token_R: jax.Array  # [R] token feeding each row; T (a zero row) for the rows that pad a group or the bound
  tile_group_G: jax.Array  # [G] expert of each row tile (the last expert for tiles past the used ones)
  tile_start_E: jax.Array  # [E] first row tile of each expert
  tiles_E: jax.Array  # [E] row tiles of each expert
  used: jax.Array  # int32: row tiles in use, sum(tiles_E)

  @property
  def bm(self) -> int:
    """Rows per tile (static: from the shapes)."""
    return self.token_R.shape[0] // self.tile_group_G.shape[0]


def row_tile(n_pairs: int, n_experts: int) -> int:
  """Rows per tile: 128, or less where the pairs per expert are few (a decode step's dozens), a power of two
  >= 16, so a group's padding stays below the row count a balanced load gives it."""
  balanced = max(1, n_pairs // n_experts)
  return int(min(128, max(16, 2 ** math.ceil(math.log2(balanced)))))


def layout(experts_TxK, valid_T, n_experts: int, bm: int) -> Layout:
  """Stable sort of the T*K pairs by expert (first come first served within an expert, as expert_parallel.plan),
  each expert's rows starting at a multiple of bm. Pairs of invalid tokens take no row."""
  T, K = experts_TxK.shape
  flat = experts_TxK.reshape(T * K)
  if valid_T is not None:
    flat = jnp.where(jnp.repeat(valid_T, K), flat, n_experts)
  R = -(-(T * K + n_experts * (bm - 1)) // bm) * bm
  counts_E = jnp.bincount(flat, length=n_experts + 1)[:n_experts].astype(jnp.int32)
  tiles_E = -(-counts_E // bm)
  tile_end_E = jnp.cumsum(tiles_E)
  tile_start_E = tile_end_E - tiles_E
  order = jnp.argsort(flat, stable=True)
  pair_start_E = jnp.cumsum(counts_E) - counts_E
  flat_sorted = flat[order]
  inside = flat_sorted < n_experts
  e_sorted = jnp.minimum(flat_sorted, n_experts - 1)
  row_sorted = tile_start_E[e_sorted] * bm + jnp.arange(T * K, dtype=jnp.int32) - pair_start_E[e_sorted]
  row_TK = jnp.zeros(T * K, jnp.int32).at[order].set(jnp.where(inside, row_sorted, R))
  token_R = jnp.full(R + 1, T, jnp.int32).at[row_TK].set(jnp.arange(T * K, dtype=jnp.int32) // K)[:R]
  tile_group_G = jnp.minimum(jnp.searchsorted(tile_end_E, jnp.arange(R // bm), side="right"), n_experts - 1)
  return Layout(row_TK, token_R, tile_group_G.astype(jnp.int32), tile_start_E, tiles_E, tile_end_E[-1])


def gather_rows(x_TxD, lay: Layout):
  """x's rows in the sorted layout (zeros where no pair is)."""
  x_pad = jnp.concatenate([x_TxD, jnp.zeros((1, x_TxD.shape[1]), x_TxD.dtype)])
  return jnp.take(x_pad, lay.token_R, axis=0)


def pair_rows(y_RxD, lay: Layout):
  """Each pair's row of y [T*K, D] (zeros for the pairs that took none)."""
  y_pad = jnp.concatenate([y_RxD, jnp.zeros((1, y_RxD.shape[1]), y_RxD.dtype)])
  return jnp.take(y_pad, lay.row_TK, axis=0)


def _tiles(K: int, N: int, base: triton.Tiles | None) -> triton.Tiles:
  """The kernel's tiles (default: triton.Tiles()), shrunk where K and N (a weight's dims: the GEMMs of both
  passes run along both) are small (tests, tiny models); a dim no power of two >= 16 divides is named by the
  kernel."""
  base, both = base or triton.Tiles(), math.gcd(K, N)
  fit = lambda t: math.gcd(both, t) if math.gcd(both, t) >= 16 else t  # noqa: E731
  return base._replace(bk=fit(base.bk), bn=fit(base.bn))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_triton(x_RxK, w_ExKxN, lay: Layout, interpret: bool, tiles: triton.Tiles | None):
  return triton.gmm(x_RxK, w_ExKxN, lay.tile_group_G, lay.used, bm=lay.bm, tiles=_tiles(*w_ExKxN.shape[1:], tiles),
                    interpret=interpret)


def _gmm_fwd(x_RxK, w_ExKxN, lay, interpret, tiles):
  return _gmm_triton(x_RxK, w_ExKxN, lay, interpret, tiles), (x_RxK, w_ExKxN, lay)


def _gmm_bwd(interpret, tiles, res, dy_RxN):
  x_RxK, w_ExKxN, lay = res
  tiles, dy_RxN = _tiles(*w_ExKxN.shape[1:], tiles), dy_RxN.astype(x_RxK.dtype)
  dx = triton.gmm(dy_RxN, w_ExKxN, lay.tile_group_G, lay.used, bm=lay.bm, transpose_w=True, tiles=tiles,
                  interpret=interpret)
  dw = triton.tgmm(x_RxK, dy_RxN, lay.tile_start_E, lay.tiles_E, bm=lay.bm, out_dtype=w_ExKxN.dtype, tiles=tiles,
                   interpret=interpret)
  no_grad = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), lay)  # integer positions
  return sum_to(dx, x_RxK), sum_to(dw, w_ExKxN), no_grad


_gmm_triton.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(x_RxK, w_ExKxN, lay: Layout, impl: str, interpret: bool = False, tiles: triton.Tiles | None = None):
  """Each row tile times its expert's weight, in x's dtype (fp32 accumulation); differentiable. `tiles` and
  `interpret` (CPU tests) are the Triton kernels'."""
  w_ExKxN = w_ExKxN.astype(x_RxK.dtype)
  if impl == "triton":
    return _gmm_triton(x_RxK, w_ExKxN, lay, interpret, tiles)
  if impl == "xla":  # the padded groups as ragged_dot's groups: rows past the used tiles belong to none (zeros)
    return jax.lax.ragged_dot(x_RxK, w_ExKxN, lay.tiles_E * lay.bm)
  raise ValueError(f"grouped GEMM implementation {impl!r}: one of {IMPLS}")


def swiglu(experts: dict, x_RxD, lay: Layout, impl: str, interpret: bool = False,
           tiles: triton.Tiles | None = None):
  """The routed experts' SwiGLU, each row by its tile's expert: silu(x W_gate) * (x W_up) W_down."""
  gate = gmm(x_RxD, experts["w_gate"], lay, impl, interpret, tiles)
  up = gmm(x_RxD, experts["w_up"], lay, impl, interpret, tiles)
  return gmm(jax.nn.silu(gate) * up, experts["w_down"], lay, impl, interpret, tiles)
