"""Weights' FP8 tiles computed ahead of the GEMMs that read them (`w_tiles=`): a layer scan quantises each
stacked weight once per step instead of in every layer's forward and again in its rematerialisation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from r1jax.nn.fp8.gemm import Impl, resolve_impl
from r1jax.nn.fp8.operands import fused_quantizer, weight_nt_tiles
from r1jax.nn.fp8.quantize import E4M3


class WeightTiles(NamedTuple):
  """Master weights' FP8 forms as a GEMM reads them, computed ahead (weight_tiles) and passed as `w_tiles`: the
  e4m3 weight [..., K, N] (dgrad's, K-major), its block scales [..., K/block, N/block] and the same e4m3 values
  N-major [..., N, K] (the forward's); several weights joined along N as `dots` joins them."""
  q_KxN: jax.Array
  s_KbxNb: jax.Array
  q_NxK: jax.Array


def weight_tiles(ws_KxN, block: int = 128, impl: Impl = "xla", pow2: bool = False,
                 interpret: bool = False) -> WeightTiles:
  """The WeightTiles of weights [..., K, N_i] joined along N, without a gradient, exactly as `dots(x, ws)`
  quantises them for the same impl (the Triton quantiser next to a GPU kernel), over any leading axes (layers,
  experts) in one pass: a layer scan quantises each stacked weight once per step instead of in every layer's
  forward and again in its rematerialisation. Every width must be whole blocks."""
  impl = resolve_impl(impl, interpret, block)
  ws_KxN = tuple(jax.lax.stop_gradient(w) for w in ws_KxN)
  *lead, K, _ = ws_KxN[0].shape
  if (K % block or any(w.shape[:-1] != ws_KxN[0].shape[:-1] or w.shape[-1] % block for w in ws_KxN)
      or len({w.dtype for w in ws_KxN}) > 1):
    raise ValueError(f"fp8.weight_tiles: weights {[(w.shape, str(w.dtype)) for w in ws_KxN]} need one dtype, one "
                     f"[..., K] and K and every width multiples of block {block}")
  fused = fused_quantizer(impl, block, interpret)
  one = lambda *ws: WeightTiles(*weight_nt_tiles(ws, block, pow2, fused=fused, interpret=interpret))  # noqa: E731
  for _ in lead:
    one = jax.vmap(one)
  return one(*ws_KxN)


def check_tiles(w_tiles: WeightTiles, K: int, N: int, block: int, where: str):
  q, s, qt = w_tiles
  if (q.shape != (K, N) or qt.shape != (N, K) or s.shape != (K // block, N // block)
      or {q.dtype, qt.dtype} != {jnp.dtype(E4M3)}):
    raise ValueError(f"{where}: w_tiles {[(a.shape, str(a.dtype)) for a in w_tiles]} must be the e4m3 [{K}, {N}], "
                     f"scales [{K // block}, {N // block}] and e4m3 [{N}, {K}] of its weights (fp8.weight_tiles)")

