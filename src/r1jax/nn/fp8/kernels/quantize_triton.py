"""DeepSeek-V3's fine-grained FP8 quantisation (V3 report §3.3, fp8.quantize_act / quantize_weight) as one
memory-bound Pallas (Triton) kernel: each tile is read once and every layout the GEMMs need (row-scaled q,
column-scaled q already transposed for wgrad, the weight in both majors) is written from registers. Joined
GEMMs' weights are read in place (parts), and the SwiGLU's h is quantised from the [gate | up] GEMM output.

Bitwise equal to quantize.py, by the same formula: scale = max(amax, 1e-4) * fl(1/448), q = e4m3(x * (1 / scale)).
- 1 / scale: Triton lowers fp32 `/` to the approximate div.full.f32, so the compiled kernel emits PTX's
  IEEE reciprocal rcp.rn.f32 (correctly rounded, as XLA's 1 / s); the interpreter (XLA on CPU) divides
  exactly, so interpret=True keeps plain `1 / s` (inline PTX has no interpreter rule).
- pow2: frexp/ldexp do not lower to Triton, so the power-of-two ceiling is an integer bit trick, used on
  both paths: bits + 0x7FFFFF carries into the exponent unless the mantissa is zero (scales are always
  positive normal floats, >= 1e-4 / 448).
- Rows M that do not fill the last row tile (rows-only mode) are masked loads and stores.
Non-finite inputs are outside the contract: Triton's max drops NaN where XLA's keeps it."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

# The GEMM kernel's guarded import of Pallas's Triton backend: absent or renamed, both kernels are unavailable.
from r1jax.nn.fp8.kernels.triton import COMPILER_PARAMS, IMPORT_ERROR, pl, plgpu
from r1jax.nn.fp8.kernels.util import same_varying
from r1jax.nn.fp8.quantize import AMAX_FLOOR, E4M3, E4M3_MAX, swiglu

TILE_ROWS = 32  # rows per program in rows-only mode: a [32, 128] bf16 tile is 8 KiB (32-128 measured alike)
_IN_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _recip(s, interpret: bool):
  """1 / s correctly rounded (see the module docstring)."""
  if interpret:
    return 1.0 / s
  return plgpu.elementwise_inline_asm("rcp.rn.f32 $0, $1;", args=[s], constraints="=f,f", pack=1,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(s.shape, s.dtype)])[0]


def _pow2_ceil(s):
  """The least power of two >= s, for positive normal fp32 s: adding 0x7FFFFF to the bits carries into
  the exponent unless the mantissa is zero (quantize.tile_scale's frexp/ldexp have no Triton lowering)."""
  bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
  return jax.lax.bitcast_convert_type((bits + jnp.uint32(0x7FFFFF)) & jnp.uint32(0xFF800000), jnp.float32)


def _scale(amax, pow2: bool):
  """quantize.tile_scale (scales are >= 1e-4 / 448, so always normal)."""
  s = jnp.maximum(amax, AMAX_FLOOR) * jnp.float32(1.0 / E4M3_MAX)
  return _pow2_ceil(s) if pow2 else s


def _row_mask(ref, valid):
  """valid [tm] broadcast over ref's tile; None (an unmasked access) when the tile is whole."""
  return None if valid is None else jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (ref.ndim - 1)), ref.shape)


def _act_kernel(*refs, rows: bool, cols: bool, dequant: bool, pow2: bool, n_rows: int, interpret: bool):
  """One [tm, block] tile of x (e4m3 times its row scales if dequant): per-row scales and q, and/or
  per-column scales and q transposed ([block, tm] into the [K, M] output)."""
  x_ref, *refs = refs
  tm = x_ref.shape[0]
  valid = None
  if n_rows % tm:  # the last row tile overhangs M
    valid = pl.program_id(0) * tm + jax.lax.broadcasted_iota(jnp.int32, (tm,), 0) < n_rows
  # Rows past M are not read (they hold anything) and never stored; only rows-only mode masks, where no
  # value crosses rows.
  x_TxB = plgpu.load(x_ref, mask=_row_mask(x_ref, valid)).astype(jnp.float32)
  if dequant:  # fp8.dequantize_act: fp32 q * scale
    in_s_ref, *refs = refs
    x_TxB = x_TxB * plgpu.load(in_s_ref, mask=_row_mask(in_s_ref, valid))[:, None]
  abs_TxB = jnp.abs(x_TxB)
  if rows:
    q_ref, s_ref, *refs = refs
    s_T = _scale(jnp.max(abs_TxB, axis=1), pow2)
    plgpu.store(q_ref, (x_TxB * _recip(s_T, interpret)[:, None]).astype(E4M3), mask=_row_mask(q_ref, valid))
    plgpu.store(s_ref, s_T, mask=_row_mask(s_ref, valid))
  if cols:
    qt_ref, st_ref = refs
    s_B = _scale(jnp.max(abs_TxB, axis=0), pow2)
    qt_ref[...] = (x_TxB * _recip(s_B, interpret)[None, :]).astype(E4M3).T
    st_ref[...] = s_B


def _weight_kernel(*refs, n_parts: int, starts: tuple[int, ...], pow2: bool, interpret: bool):
  """One [block, block] tile of the weights joined along their columns: its scale ([1, 1], reduced one axis at
  a time), q and, if asked, q^T. With several weights, the one owning this column block is read (the others'
  loads are masked off, so they fetch nothing) and `starts` are the parts' first column blocks."""
  w_refs, (q_ref, s_ref, *qt_ref) = refs[:n_parts], refs[n_parts:]
  if n_parts == 1:
    w_BxB = w_refs[0][...].astype(jnp.float32)
  else:
    j, ends = pl.program_id(1), starts[1:] + (None,)
    w_BxB = jnp.zeros(w_refs[0].shape, jnp.float32)
    for ref, lo, hi in zip(w_refs, starts, ends):
      mine = (j >= lo) if hi is None else (j >= lo) & (j < hi)
      w_BxB += plgpu.load(ref, mask=jnp.broadcast_to(mine, ref.shape), other=0).astype(jnp.float32)
  s_1x1 = _scale(jnp.max(jnp.max(jnp.abs(w_BxB), axis=1, keepdims=True), axis=0, keepdims=True), pow2)
  q_BxB = (w_BxB * _recip(s_1x1, interpret)).astype(E4M3)
  q_ref[...] = q_BxB
  s_ref[...] = s_1x1
  if qt_ref:
    qt_ref[0][...] = q_BxB.T


def _swiglu_kernel(g_ref, u_ref, q_ref, s_ref, *, pow2: bool, n_rows: int, dtype, interpret: bool):
  """One [tm, block] tile of h = silu(gate) * up (fp8.swiglu: fp32, rounded to `dtype`) in 1 x block tiles,
  from the tiles of gate and up; h itself is never written."""
  tm = g_ref.shape[0]
  valid = None
  if n_rows % tm:
    valid = pl.program_id(0) * tm + jax.lax.broadcasted_iota(jnp.int32, (tm,), 0) < n_rows
  g = plgpu.load(g_ref, mask=_row_mask(g_ref, valid)).astype(jnp.float32)
  u = plgpu.load(u_ref, mask=_row_mask(u_ref, valid)).astype(jnp.float32)
  h = swiglu(g, u, dtype).astype(jnp.float32)
  s_T = _scale(jnp.max(jnp.abs(h), axis=1), pow2)
  plgpu.store(q_ref, (h * _recip(s_T, interpret)[:, None]).astype(E4M3), mask=_row_mask(q_ref, valid))
  plgpu.store(s_ref, s_T, mask=_row_mask(s_ref, valid))


def _call(kernel, args, in_specs, outs, grid, name, interpret, num_warps: int):
  """pallas_call with outs = [(shape, dtype, BlockSpec)]; operands typed alike for shard_map."""
  args = same_varying(*args)
  # Inside shard_map every output declares its manual-axis type (util.manual_type), even where it
  # varies over no axis: a replicated weight's quantisation.
  mat = getattr(jax.typeof(args[0]), "mat", None)
  mat = {"manual_axis_type": mat} if mat is not None and jax.sharding.get_abstract_mesh().manual_axes else {}
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=[spec for *_, spec in outs],
      out_shape=[jax.ShapeDtypeStruct(shape, dtype, **mat) for shape, dtype, _ in outs],
      compiler_params=COMPILER_PARAMS(num_warps=num_warps, num_stages=1),
      interpret=interpret, name=name)(*args)


def _check(block: int):
  if IMPORT_ERROR is not None:
    raise RuntimeError(f"the Pallas Triton FP8 quantiser needs jax.experimental.pallas.triton: {IMPORT_ERROR}")
  if block < 1 or block & (block - 1):
    raise ValueError(f"Triton tiles must be powers of two: block {block}")


def quantize_act(x_MxK, block: int = 128, pow2: bool = False, *, rows: bool = True, cols: bool = False,
                 in_scale_MxKb=None, interpret: bool = False):
  """(q_MxK, s_MxKb) if rows (= fp8.quantize_act(x)), then (qt_KxM, st_KxMb) if cols (= fp8.quantize_act(x.T),
  block x 1 tiles, for wgrad; M must be a multiple of block). With in_scale_MxKb, x is e4m3 and first
  dequantised by those 1 x block scales (V3 report §3.5.2: cached fp8 activations requantised for wgrad)."""
  _check(block)
  shape, dtype = x_MxK.shape, jnp.dtype(x_MxK.dtype)
  if len(shape) != 2 or shape[1] % block or not (rows or cols) or (cols and shape[0] % block):
    raise ValueError(f"quantize_triton.quantize_act: x shape {shape} needs [M, K] (jax.vmap for leading "
                     f"axes), K a multiple of block {block}, M too with cols (pad the rows), rows or cols set")
  (M, K), Kb = shape, shape[1] // block
  if in_scale_MxKb is not None and (dtype != E4M3 or in_scale_MxKb.shape != (M, Kb)):
    raise ValueError(f"quantize_triton.quantize_act: in_scale needs e4m3 x and [M, K/{block}] scales; "
                     f"got x {shape} {dtype}, scales {in_scale_MxKb.shape}")
  if in_scale_MxKb is None and dtype not in _IN_DTYPES:
    raise ValueError(f"quantize_triton.quantize_act: x dtype {dtype} must be bf16, f16 or f32 "
                     "(e4m3 needs in_scale_MxKb)")
  tm = block if cols else min(TILE_ROWS, pl.next_power_of_2(M))
  args, in_specs = [x_MxK], [pl.BlockSpec((tm, block), lambda i, j: (i, j))]
  if in_scale_MxKb is not None:
    args.append(in_scale_MxKb.astype(jnp.float32))
    in_specs.append(pl.BlockSpec((tm, pl.squeezed), lambda i, j: (i, j)))
  outs = []
  if rows:
    outs += [((M, K), E4M3, pl.BlockSpec((tm, block), lambda i, j: (i, j))),
             ((M, Kb), jnp.float32, pl.BlockSpec((tm, pl.squeezed), lambda i, j: (i, j)))]
  if cols:
    outs += [((K, M), E4M3, pl.BlockSpec((block, tm), lambda i, j: (j, i))),
             ((K, M // block), jnp.float32, pl.BlockSpec((block, pl.squeezed), lambda i, j: (j, i)))]
  kernel = functools.partial(_act_kernel, rows=rows, cols=cols, dequant=in_scale_MxKb is not None, pow2=pow2,
                             n_rows=M, interpret=interpret)
  # 4 warps: on an H200 at [81920, 2048] the transposing modes ran 6% (rows + cols) and 18% (requantise) faster
  # than with 8, rows alone the same with 4-16 warps and 32-128 rows (bench/results/h200_fp8_quantize_warps.json).
  return tuple(_call(kernel, args, in_specs, outs, (pl.cdiv(M, tm), Kb), f"fp8_quantize_act_block{block}",
                     interpret, num_warps=4))


def quantize_weight(w_KxN, block: int = 128, pow2: bool = False, *, transpose: bool = True,
                    interpret: bool = False):
  """(q_KxN, s_KbxNb) = fp8.quantize_weight(w), then q_NxK = q_KxN.T (same scales) if transpose: the
  forward GEMM's N-major and the backward's K-major weight from one read. w may be a list of weights [K, N_i]:
  then they are quantised as their concatenation along N, each read in place (no concatenated copy)."""
  _check(block)
  parts = list(w_KxN) if isinstance(w_KxN, (list, tuple)) else [w_KxN]
  b = block
  for w in parts:
    shape, dtype = w.shape, jnp.dtype(w.dtype)
    if len(shape) != 2 or shape[0] % b or shape[1] % b or dtype not in _IN_DTYPES or shape[0] != parts[0].shape[0]:
      raise ValueError(f"quantize_triton.quantize_weight: w shape {shape} {dtype} needs [K, N] bf16, f16 or "
                       f"f32 (jax.vmap for leading axes), both dims multiples of block {block}, one K for all parts")
  K, N = parts[0].shape[0], sum(w.shape[1] for w in parts)
  starts = tuple(itertools.accumulate([0] + [w.shape[1] // b for w in parts[:-1]]))
  # Each part's block index clamped into its own range: the program reading another part's columns masks it off.
  in_specs = [pl.BlockSpec((b, b), lambda i, j, lo=lo, n=w.shape[1] // b: (i, jnp.clip(j - lo, 0, n - 1)))
              for w, lo in zip(parts, starts)]
  outs = [((K, N), E4M3, pl.BlockSpec((b, b), lambda i, j: (i, j))),
          ((K // b, N // b), jnp.float32, pl.BlockSpec((1, 1), lambda i, j: (i, j)))]
  if transpose:
    outs.append(((N, K), E4M3, pl.BlockSpec((b, b), lambda i, j: (j, i))))
  kernel = functools.partial(_weight_kernel, n_parts=len(parts), starts=starts, pow2=pow2, interpret=interpret)
  return tuple(_call(kernel, parts, in_specs, outs, (K // b, N // b), f"fp8_quantize_weight_block{block}", interpret,
                     num_warps=8 if b >= 128 else 4))  # untuned


def quantize_swiglu(gate_up_Mx2F, block: int = 128, pow2: bool = False, *, interpret: bool = False):
  """fp8.quantize_swiglu: (q_MxF, s_MxFb) of silu(gate) * up from the joined [gate | up] GEMM output, each
  program reading its gate and up tiles in place (the same array twice, F columns apart)."""
  _check(block)
  shape, dtype = gate_up_Mx2F.shape, jnp.dtype(gate_up_Mx2F.dtype)
  if len(shape) != 2 or shape[1] % (2 * block) or dtype not in _IN_DTYPES:
    raise ValueError(f"quantize_triton.quantize_swiglu: [gate | up] shape {shape} {dtype} needs [M, 2F] bf16, "
                     f"f16 or f32 with F a multiple of block {block}")
  M, Fb = shape[0], shape[1] // (2 * block)
  tm = min(TILE_ROWS, pl.next_power_of_2(M))
  in_specs = [pl.BlockSpec((tm, block), lambda i, j: (i, j)), pl.BlockSpec((tm, block), lambda i, j: (i, j + Fb))]
  outs = [((M, Fb * block), E4M3, pl.BlockSpec((tm, block), lambda i, j: (i, j))),
          ((M, Fb), jnp.float32, pl.BlockSpec((tm, pl.squeezed), lambda i, j: (i, j)))]
  kernel = functools.partial(_swiglu_kernel, pow2=pow2, n_rows=M, dtype=dtype, interpret=interpret)
  return tuple(_call(kernel, [gate_up_Mx2F, gate_up_Mx2F], in_specs, outs, (pl.cdiv(M, tm), Fb),
                     f"fp8_quantize_swiglu_block{block}", interpret, num_warps=4))
