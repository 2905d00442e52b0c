"""The GEMMs' operands in the tiles each product reads: activations in 1 x block tiles (and transposed, block
x 1, for wgrad), weights in block x block tiles in both majors, SwiGLU's h and its gradient quantised from the
[gate | up] output. Next to a GPU kernel by the one-pass Triton quantiser, elsewhere by quantize.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.nn.fp8.gemm import Impl, resolve_impl
from r1jax.nn.fp8.kernels import quantize_triton
from r1jax.nn.fp8.quantize import dequantize_act, quantize_act, quantize_weight, swiglu, swiglu_grad


def fused_quantizer(impl: str, block: int, interpret: bool) -> bool:
  """With a GPU GEMM kernel the quantisations run as quantize_triton's one-pass kernel (each operand read
  once for every layout it is needed in), elsewhere as the XLA functions here. Compiled, only at block 128:
  that is where an H200 showed it equal to them (bitwise up to XLA's own GPU rounding of x * 1/s in ~1e-5
  of the elements); other blocks are checked in the interpreter only."""
  return (impl in ("mosaic_gpu", "triton") and quantize_triton.IMPORT_ERROR is None
          and (interpret or block == 128))


def act_tiles(x_MxK, block, pow2, *, rows, cols, in_scale_MxKb=None, fused=False, interpret=False):
  """(q_MxK, s_MxKb) in 1 x block tiles if rows, then (qt_KxM, st_KxMb), x^T in 1 x block tiles (x's block x 1
  tiles, for wgrad), if cols; x is e4m3 dequantised by in_scale_MxKb when given."""
  if fused:
    return quantize_triton.quantize_act(x_MxK, block, pow2, rows=rows, cols=cols, in_scale_MxKb=in_scale_MxKb,
                                            interpret=interpret)
  if in_scale_MxKb is not None:
    # The barrier keeps the e4m3 rounding: with forward and backward in one program, XLA's GPU compiler (excess
    # precision allowed) drops the f32 -> e4m3 -> f32 convert pair and would requantise the unrounded x (an
    # H200 run: 35% of wgrad scales off, dw 3.6% from float64 instead of the recipe's 4.1%).
    x_MxK, in_scale_MxKb = jax.lax.optimization_barrier((x_MxK, in_scale_MxKb))
  x = x_MxK if in_scale_MxKb is None else dequantize_act(x_MxK, in_scale_MxKb)
  return (quantize_act(x, block, pow2) if rows else ()) + (quantize_act(x.astype(jnp.float32).T, block, pow2)
                                                           if cols else ())


def weight_nt_tiles(ws_KxN, block, pow2, *, fused=False, interpret=False):
  """(q_KxN, s_KbxNb, q_NxK): the tiles of the weights ws joined along their columns, in both majors (the
  forward GEMM reads them N-major, dgrad K-major). The fused kernel reads each weight where it lies: a joined
  GEMM costs no concatenated copy of the master weights."""
  if fused:
    return quantize_triton.quantize_weight(ws_KxN, block, pow2, transpose=True, interpret=interpret)
  wq_KxN, ws_KbxNb = quantize_weight(jnp.concatenate(ws_KxN, axis=-1) if len(ws_KxN) > 1 else ws_KxN[0], block, pow2)
  return wq_KxN, ws_KbxNb, wq_KxN.T


def quantize_input(x_MxK, block: int = 128, impl: Impl = "xla", pow2: bool = False, interpret: bool = False):
  """x's 1 x block tiles exactly as `dot(x, ..., impl=impl)` computes them (the Triton kernel next to a GPU
  kernel), outside the GEMM and without a gradient: per-row tiles commute with any gathering of rows, so an MoE
  layer quantises its tokens once and dispatches e4m3 bytes (V3 report §3.3.3) to `dot(..., x_quantized=)`."""
  impl = resolve_impl(impl, interpret, block)
  K = x_MxK.shape[-1]
  if K % block:
    raise ValueError(f"fp8.quantize_input: x shape {x_MxK.shape}: last dim must be a multiple of block {block}")
  q, s = act_tiles(jax.lax.stop_gradient(x_MxK).reshape(-1, K), block, pow2, rows=True, cols=False,
                             fused=fused_quantizer(impl, block, interpret), interpret=interpret)
  return q.reshape(x_MxK.shape), s.reshape(*x_MxK.shape[:-1], K // block)


def quantize_swiglu(gate_up_Mx2F, block: int = 128, impl: Impl = "xla", pow2: bool = False, interpret: bool = False):
  """The 1 x block tiles of h = swiglu(gate, up) from the joined [gate | up] GEMM output [..., 2F], without a
  gradient: with a GPU kernel one pass reads gate and up and writes e4m3 h (the SwiGLU fused into the
  quantisation, as DeepSeek's kernels do), so h is neither written nor re-read in bf16 (swiglu_mlp)."""
  impl = resolve_impl(impl, interpret, block)
  *lead, F2 = gate_up_Mx2F.shape
  if F2 % (2 * block):
    raise ValueError(f"fp8.quantize_swiglu: [gate | up] shape {gate_up_Mx2F.shape}: the last dim must be 2F with "
                     f"F a multiple of block {block}")
  q, s = swiglu_tiles(jax.lax.stop_gradient(gate_up_Mx2F).reshape(-1, F2), block, pow2,
                          fused=fused_quantizer(impl, block, interpret), interpret=interpret)
  return q.reshape(*lead, F2 // 2), s.reshape(*lead, F2 // (2 * block))


def swiglu_tiles(gu_Mx2F, block, pow2, *, fused, interpret):
  if fused:
    return quantize_triton.quantize_swiglu(gu_Mx2F, block, pow2, interpret=interpret)
  F = gu_Mx2F.shape[-1] // 2
  return quantize_act(swiglu(gu_Mx2F[:, :F], gu_Mx2F[:, F:], gu_Mx2F.dtype), block, pow2)


def swiglu_grad_tiles(gu_Mx2F, dh_MxF, block, pow2, *, fused, interpret):
  """dy of the [gate | up] GEMM, d[gate | up] = swiglu_grad(gate, up, dh) in the activations' dtype (one XLA
  fusion), in 1 x block and (transposed) block x 1 tiles. A Triton kernel fusing the SwiGLU backward into the
  quantisation, two tiles per program, ran slower on an H200 than this pair (0.54 against 0.44 ms per
  bench-config expert layer), so it is not used."""
  F = dh_MxF.shape[-1]
  d_Mx2F = jnp.concatenate(swiglu_grad(gu_Mx2F[:, :F], gu_Mx2F[:, F:], dh_MxF), axis=-1).astype(gu_Mx2F.dtype)
  return act_tiles(d_Mx2F, block, pow2, rows=True, cols=True, fused=fused, interpret=interpret)

