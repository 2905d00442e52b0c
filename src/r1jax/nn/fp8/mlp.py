"""A SwiGLU MLP as three block-scaled FP8 GEMMs in two launches, the SwiGLU fused into the down GEMM's input
quantisation (DeepSeek's kernels fuse it likewise), as one custom_vjp; per expert by vmap."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name

from r1jax.nn.fp8.dot import BATCHED_NAMES, SAVED_NAMES, Static, backward, forward, quantize_dy, quantize_x
from r1jax.nn.fp8.gemm import Impl, resolve_impl
from r1jax.nn.fp8.kernels import util
from r1jax.nn.fp8.operands import fused_quantizer, swiglu_grad_tiles, swiglu_tiles
from r1jax.nn.fp8.tiles import WeightTiles, check_tiles


class _MLPStatic(NamedTuple):
  up: Static  # the [gate | up] GEMM
  down: Static


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _swiglu_mlp(x_MxD, w_gate_DxF, w_up_DxF, w_down_FxD, x_quantized, w_tiles, st: _MLPStatic):
  return _swiglu_mlp_fwd(x_MxD, w_gate_DxF, w_up_DxF, w_down_FxD, x_quantized, w_tiles, st)[0]


def _swiglu_mlp_fwd(x_MxD, w_gate_DxF, w_up_DxF, w_down_FxD, x_quantized, w_tiles, st: _MLPStatic):
  up = st.up
  tiles_up, tiles_down = (None, None) if w_tiles is None else w_tiles
  gu_Mx2F, res_up = forward(quantize_x(x_MxD, up) if x_quantized is None else x_quantized, (w_gate_DxF, w_up_DxF),
                             up, x_MxD.dtype, tiles_up)
  gu_Mx2F = checkpoint_name(gu_Mx2F, up.names[0])  # kept where `dot` would keep the [gate | up] output
  h_quantized = swiglu_tiles(gu_Mx2F, up.block, up.pow2, fused=fused_quantizer(up.impl, up.block, up.interpret),
                                 interpret=up.interpret)
  y_MxD, res_down = forward(h_quantized, (w_down_FxD,), st.down, x_MxD.dtype, tiles_down)
  return checkpoint_name(y_MxD, st.down.names[0]), (res_up, gu_Mx2F, res_down)


def _swiglu_mlp_bwd(st: _MLPStatic, res, dy_MxD):
  res_up, gu_Mx2F, res_down = res
  up, M = st.up, dy_MxD.shape[0]
  dh_MxF, (dw_down,) = backward(st.down, res_down, quantize_dy(dy_MxD, st.down), M, dy_MxD.dtype)
  d_gu = swiglu_grad_tiles(util.pad_rows(gu_Mx2F, up.block), util.pad_rows(dh_MxF, up.block),
                               up.block, up.pow2, fused=fused_quantizer(up.impl, up.block, up.interpret),
                               interpret=up.interpret)
  dx_MxD, (dw_gate, dw_up) = backward(up, res_up, d_gu, M, dy_MxD.dtype)
  return dx_MxD, dw_gate, dw_up, dw_down, None, None


_swiglu_mlp.defvjp(_swiglu_mlp_fwd, _swiglu_mlp_bwd)


def swiglu_mlp(x_MxD, w_gate_DxF, w_up_DxF, w_down_FxD, block: int = 128, impl: Impl = "xla", pow2: bool = False,
               tiles=None, interpret: bool = False, names: tuple[str, str] = SAVED_NAMES, x_quantized=None,
               w_tiles: tuple[WeightTiles, WeightTiles] | None = None):
  """down(silu(x W_gate) * (x W_up)) as three block-scaled fp8 GEMMs in two launches, with the SwiGLU fused into
  the down GEMM's input quantisation (DeepSeek's kernels fuse it likewise): h = swiglu(gate, up) is quantised
  straight from the [gate | up] GEMM output (quantize_swiglu), rounded once and never written in bf16 (the
  composition of `dot`s rounds bf16 silu(gate) and h on the way). The backward is the composition's: dh,
  d[gate | up] by one XLA fusion (swiglu_grad_tiles says why), their quantisation and the GEMMs. F must be
  whole blocks (the [gate | up] join); arguments as `dot`'s, `w_tiles` the weight_tiles of [gate, up] and of
  [down]."""
  impl = resolve_impl(impl, interpret, block)
  D, F = w_gate_DxF.shape
  if (x_MxD.shape[-1] != D or w_up_DxF.shape != (D, F) or w_down_FxD.shape != (F, D) or D % block or F % block
      or len({w.dtype for w in (w_gate_DxF, w_up_DxF, w_down_FxD)}) > 1):
    raise ValueError(f"fp8.swiglu_mlp: x {x_MxD.shape}, w_gate {w_gate_DxF.shape}, w_up {w_up_DxF.shape}, w_down "
                     f"{w_down_FxD.shape} need [..., D], [D, F], [D, F], [F, D] of one dtype, D and F multiples of "
                     f"block {block}")
  if x_quantized is not None and (x_quantized[0].shape != x_MxD.shape
                                  or x_quantized[1].shape != (*x_MxD.shape[:-1], D // block)):
    raise ValueError(f"fp8.swiglu_mlp: x_quantized {[a.shape for a in x_quantized]} must be x {x_MxD.shape}'s e4m3 "
                     f"values and [..., D/{block}] scales")
  st = _MLPStatic(*(Static(block, impl, pow2, tiles, interpret, tuple(names), w_down_FxD.dtype, n)
                    for n in ((F, F), (D,))))
  if w_tiles is not None:
    check_tiles(w_tiles[0], D, 2 * F, block, "fp8.swiglu_mlp [gate | up]")
    check_tiles(w_tiles[1], F, D, block, "fp8.swiglu_mlp down")
  xq = None if x_quantized is None else (x_quantized[0].reshape(-1, D), x_quantized[1].reshape(-1, D // block))
  y = _swiglu_mlp(x_MxD.reshape(-1, D), w_gate_DxF, w_up_DxF, w_down_FxD, xq, w_tiles, st)
  return y.reshape(x_MxD.shape)


def batched_swiglu_mlp(x_ExMxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, block: int = 128, impl: Impl = "xla",
                       pow2: bool = False, tiles=None, interpret: bool = False, x_quantized=None, w_tiles=None):
  """Per-expert `swiglu_mlp` over capacity-padded rows (x [E, C, D]), vmapped (w_tiles with a leading E too)."""
  one = functools.partial(swiglu_mlp, block=block, impl=impl, pow2=pow2, tiles=tiles, interpret=interpret,
                          names=BATCHED_NAMES)
  return jax.vmap(lambda x, wg, wu, wd, xq, wt: one(x, wg, wu, wd, x_quantized=xq, w_tiles=wt))(
      x_ExMxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, x_quantized, w_tiles)

