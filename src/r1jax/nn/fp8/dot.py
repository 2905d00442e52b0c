"""FP8 GEMMs with DeepSeek-V3's fine-grained scaling (V3 report §3.3, Figure 6/7) as a custom_vjp: x in
1 x block tiles, weights in block x block tiles, fp32 accumulation promoted every block-deep K step; dgrad and
wgrad as the same fp8 GEMM. Several weights of one input join into one GEMM over their columns (`dots`)."""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from r1jax.nn.fp8.gemm import Impl, gemm_nt, resolve_impl, rows
from r1jax.nn.fp8.kernels import util
from r1jax.nn.fp8.operands import act_tiles, fused_quantizer, weight_nt_tiles
from r1jax.nn.fp8.tiles import WeightTiles, check_tiles

# Remat names: a kernel's output is no dot_general, so jax.checkpoint's dots policies would recompute every
# FP8 GEMM (and its quantisation) in the backward; the "dots" remat policy (nn/block.py) saves these names
# as it saves bf16 dots without batch dims. The per-expert (vmapped) GEMMs get their own, unsaved, names,
# as the bf16 expert einsums have a batch dim and are recomputed.
SAVED_NAMES = ("fp8_dot", "fp8_dot_residuals")
BATCHED_NAMES = ("fp8_batched_dot", "fp8_batched_dot_residuals")
WEIGHT_NAME = "fp8_weight"  # a GEMM's e4m3 weight kept for its backward; no remat policy saves it


class Static(NamedTuple):
  """The custom_vjp's static arguments (see `dots`)."""
  block: int
  impl: str
  pow2: bool
  tiles: Any
  interpret: bool
  names: tuple[str, str]
  w_dtype: Any
  n_splits: tuple[int, ...]  # the joined weights' widths (the last padded to whole blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dot(x_MxK, ws_KxN, x_quantized, w_tiles, st: Static):
  return _dot_fwd(x_MxK, ws_KxN, x_quantized, w_tiles, st)[0]


def forward(x_quantized, ws_KxN, st: Static, out_dtype, w_tiles=None):
  """The forward GEMM from x's e4m3 tiles and the weights' (w_tiles, else quantised here); (y, residuals: x's
  tiles and the e4m3 weight K-major for dgrad, written by the same pass as the forward's N-major one)."""
  xq_MxK, xs_MxKb = x_quantized
  fused = fused_quantizer(st.impl, st.block, st.interpret)
  if w_tiles is None:
    w_tiles = weight_nt_tiles(ws_KxN, st.block, st.pow2, fused=fused, interpret=st.interpret)
  wq_KxN, ws_KbxNb, wq_NxK = w_tiles
  y_MxN = gemm_nt(xq_MxK, xs_MxKb, wq_NxK, rows(ws_KbxNb.T, st.block), block=st.block, out_dtype=out_dtype,
                  impl=st.impl, tiles=st.tiles, interpret=st.interpret, b_blocked=True)
  if st.impl != "xla":
    # A kernel's output that remat saves into a scan's stacked residuals would otherwise be computed twice: XLA
    # GPU's dynamic-slice fusion reruns the custom call to write straight into the slice, next to the original
    # for the other users (an H200 bench step: 5 GEMMs per MoE layer twice). The barrier costs one slice copy.
    y_MxN = jax.lax.optimization_barrier(y_MxN)
  # The e4m3 x and its scales are kept as DeepSeek caches fp8 activations (V3 report §3.3.3). Under remat the
  # weight is re-quantised with the rematerialised forward (WEIGHT_NAME is saved by no policy), so the backward
  # quantises nothing it already had; without remat it stays alive through the forward, 1 byte per parameter.
  # Given w_tiles (the routed experts, quantised before the layer scan) nothing is re-quantised at all.
  # (Saving the weights instead, both majors, measured slower on an H200: the scan copies each custom call's
  # output into its stacked residuals. Residuals are named after their last forward use: jax.checkpoint rounds
  # a saved value the forward still reads with reduce_precision(exponent_bits=4, mantissa_bits=3), IEEE
  # semantics that turn e4m3fn's finite 256..448 into NaN, JAX 0.10.)
  _, res_name = st.names
  return y_MxN, (checkpoint_name(xq_MxK, res_name), checkpoint_name(xs_MxKb, res_name),
                 checkpoint_name(wq_KxN, WEIGHT_NAME), checkpoint_name(ws_KbxNb, WEIGHT_NAME))


def backward(st: Static, res, dy_quantized, M: int, dx_dtype):
  """V3 report Figure 6: dgrad with dy in 1 x block tiles along N against w's same block x block tiles;
  wgrad contracts over tokens, so x and dy go in block x 1 tiles (per channel per `block` tokens).
  `dy_quantized`: dy's (rows q, s, transposed q, s), its rows zero-padded to whole blocks (they change no amax
  and add nothing). Returns dx and the weights' gradients."""
  xq_MxK, xs_MxKb, wq_KxN, ws_KbxNb = res
  dyq_MxN, dys_MxNb, dytq_NxM, dyts_NxMb = dy_quantized
  block, kernel = st.block, dict(impl=st.impl, tiles=st.tiles, interpret=st.interpret)
  dx_MxK = gemm_nt(dyq_MxN[:M], dys_MxNb[:M], wq_KxN, rows(ws_KbxNb, block), block=block, out_dtype=dx_dtype,
                   b_blocked=True, **kernel)
  # The cached 1 x 128 fp8 x is dequantised, transposed and requantised in 128 x 1 tiles, DeepSeek's own
  # workflow (V3 report §3.5.2).
  xtq_KxM, xts_KxMb = act_tiles(util.pad_rows(xq_MxK, block), block, st.pow2, rows=False,
                                          cols=True, in_scale_MxKb=util.pad_rows(xs_MxKb, block),
                                          fused=fused_quantizer(st.impl, block, st.interpret),
                                          interpret=st.interpret)
  dw_KxN = gemm_nt(xtq_KxM, xts_KxMb, dytq_NxM, dyts_NxMb, block=block, out_dtype=st.w_dtype, **kernel)
  dws = jnp.split(dw_KxN, list(itertools.accumulate(st.n_splits[:-1])), axis=-1) if len(st.n_splits) > 1 else [dw_KxN]
  return util.sum_to(dx_MxK, xq_MxK), tuple(util.sum_to(dw, wq_KxN) for dw in dws)


def quantize_x(x_MxK, st: Static):
  return act_tiles(x_MxK, st.block, st.pow2, rows=True, cols=False,
                             fused=fused_quantizer(st.impl, st.block, st.interpret), interpret=st.interpret)


def quantize_dy(dy_MxN, st: Static):
  return act_tiles(util.pad_rows(dy_MxN, st.block), st.block, st.pow2, rows=True, cols=True,
                             fused=fused_quantizer(st.impl, st.block, st.interpret), interpret=st.interpret)


def _dot_fwd(x_MxK, ws_KxN, x_quantized, w_tiles, st: Static):
  y_MxN, res = forward(quantize_x(x_MxK, st) if x_quantized is None else x_quantized, ws_KxN, st, x_MxK.dtype,
                        w_tiles)
  return checkpoint_name(y_MxN, st.names[0]), res


def _dot_bwd(st: Static, res, dy_MxN):
  dx, dws = backward(st, res, quantize_dy(dy_MxN, st), dy_MxN.shape[0], dy_MxN.dtype)
  return dx, dws, None, None  # given quantisations of x and w are constants of the forward (stop_gradient upstream)


_dot.defvjp(_dot_fwd, _dot_bwd)


def dots(x_MxK, ws_KxN, block: int = 128, impl: Impl = "xla", pow2: bool = False, tiles=None,
         interpret: bool = False, names: tuple[str, str] = SAVED_NAMES, x_quantized=None,
         w_tiles: WeightTiles | None = None) -> list:
  """[x[..., K] @ w[K, N] for w in ws] as ONE block-scaled fp8 GEMM over the weights' joined columns (x
  quantised once, one launch; the quantiser reads each weight in place), in x's dtype; fp8 dgrad/wgrad in the
  backward. Every weight but the last must end on a block boundary (joins_columns); one weight is `dot`.

  `tiles` sets the kernel's tiles (its module's Tiles); `interpret` runs it in Pallas's interpreter (tests);
  `names` are the remat names of the output and of the residuals (SAVED_NAMES). `x_quantized`: x's own
  quantisation (quantize_input, possibly gathered like x), used in place of quantising x; x then only carries
  the gradient (its value is unused, and XLA drops what computed it). `w_tiles`: the weights' own WeightTiles
  (weight_tiles), used in place of quantising them; the weights then only carry their gradients.
  """
  impl = resolve_impl(impl, interpret, block)
  ws_KxN = tuple(ws_KxN)
  K = x_MxK.shape[-1]
  if not ws_KxN or any(w.ndim != 2 or w.shape[0] != K for w in ws_KxN):
    raise ValueError(f"fp8.dot: x {x_MxK.shape} @ w {[w.shape for w in ws_KxN]} needs w [K, N] with K = x's last dim")
  if K % block:
    raise ValueError(f"fp8.dot: weight shape {ws_KxN[0].shape}: its input dim {K} must be a multiple of block {block} "
                     "(the activations' 1 x block tiles)")
  widths = [w.shape[1] for w in ws_KxN]
  if any(n % block for n in widths[:-1]) or len({w.dtype for w in ws_KxN}) > 1:
    raise ValueError(f"fp8.dots: weights {[(w.shape, str(w.dtype)) for w in ws_KxN]} join only with one dtype and "
                     f"every width but the last a multiple of block {block}")
  if x_quantized is not None and (x_quantized[0].shape != x_MxK.shape
                                  or x_quantized[1].shape != (*x_MxK.shape[:-1], K // block)):
    raise ValueError(f"fp8.dot: x_quantized {[a.shape for a in x_quantized]} must be x {x_MxK.shape}'s e4m3 "
                     f"values and [..., K/{block}] scales")
  # A partial last block of output columns (V3's kv_a projection is 512 + 64 wide) becomes a whole one padded
  # with zero columns, as DeepSeek's checkpoints round those scales up (576 -> 5 blocks): zeros change no
  # amax, the extra outputs are cropped, and their zero cotangents add nothing to dx or dw.
  last = ws_KxN[-1]
  padded = ws_KxN[:-1] + (jnp.pad(last, ((0, 0), (0, -last.shape[1] % block))),)
  st = Static(block, impl, pow2, tiles, interpret, tuple(names), last.dtype, tuple(w.shape[1] for w in padded))
  if w_tiles is not None:
    check_tiles(w_tiles, K, sum(st.n_splits), block, "fp8.dots")
  xq = None if x_quantized is None else (x_quantized[0].reshape(-1, K), x_quantized[1].reshape(-1, K // block))
  y = _dot(x_MxK.reshape(-1, K), padded, xq, w_tiles, st)[:, :sum(widths)].reshape(*x_MxK.shape[:-1], sum(widths))
  return jnp.split(y, list(itertools.accumulate(widths[:-1])), axis=-1) if len(widths) > 1 else [y]


def dot(x_MxK, w_KxN, block: int = 128, impl: Impl = "xla", pow2: bool = False, tiles=None,
        interpret: bool = False, names: tuple[str, str] = SAVED_NAMES, x_quantized=None):
  """x[..., K] @ w[K, N] as the block-scaled fp8 GEMM (`dots` with one weight)."""
  return dots(x_MxK, [w_KxN], block, impl, pow2, tiles, interpret, names, x_quantized)[0]


def batched_dots(x_ExMxK, ws_ExKxN, block: int = 128, impl: Impl = "xla", pow2: bool = False, tiles=None,
                 interpret: bool = False, x_quantized=None) -> list:
  """Per-expert `dots` over capacity-padded rows (x [E, C, D] @ each w [E, D, F]), vmapped."""
  ws_ExKxN = list(ws_ExKxN)
  if x_ExMxK.ndim != 3 or any(w.ndim != 3 or w.shape[0] != x_ExMxK.shape[0] for w in ws_ExKxN):
    raise ValueError(f"fp8.batched_dot: x {x_ExMxK.shape} and w {[w.shape for w in ws_ExKxN]} need [E, M, K] and "
                     "[E, K, N]")
  one = functools.partial(dots, block=block, impl=impl, pow2=pow2, tiles=tiles, interpret=interpret,
                          names=BATCHED_NAMES)
  return jax.vmap(lambda x, ws, xq: one(x, ws, x_quantized=xq))(x_ExMxK, ws_ExKxN, x_quantized)


def batched_dot(x_ExMxK, w_ExKxN, block: int = 128, impl: Impl = "xla", pow2: bool = False, tiles=None,
                interpret: bool = False, x_quantized=None):
  """Per-expert `dot` over capacity-padded rows (x [E, C, D] @ w [E, D, F]), vmapped."""
  return batched_dots(x_ExMxK, [w_ExKxN], block, impl, pow2, tiles, interpret, x_quantized)[0]

