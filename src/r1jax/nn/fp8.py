"""FP8 GEMMs with DeepSeek-V3's fine-grained scaling (V3 report §3.3, Figure 6/7): e4m3 values; scales
per token per `block` channels for activations (1 x 128 tiles) and per `block` x `block` tile for weights;
fp32 accumulation promoted every `block`-deep K step; dgrad and wgrad as the same fp8 GEMM (custom_vjp).

x ~= q * scale: quantising divides by the scale, dequantising multiplies. Every GEMM here is one
primitive, a @ b^T with per-row per-K-block scales on both operands (weight block scales are repeated
over their block's rows): `scaled_matmul_nt_xla` (reference, any backend) or a Pallas kernel: Mosaic GPU
(Hopper wgmma, fp8_mosaic_gpu), Triton (any CUDA GPU, fp8_triton) or Mosaic TPU (fp8_mosaic_tpu)."""

from __future__ import annotations

import functools
import itertools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from jax.ad_checkpoint import checkpoint_name

from r1jax.nn import fp8_mosaic_gpu, fp8_mosaic_tpu, fp8_quantize_triton, fp8_triton, kernel_util

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4  # DeepSeek's floor, so an all-zero tile gets a finite scale (inference/kernel.py)
PARTIAL_BYTES = 1 << 30  # the XLA path's fp32 partial products [c, M, N] for c K blocks at a time
Impl = Literal["auto", "xla", "mosaic_gpu", "triton", "mosaic_tpu"]
KERNELS = {"mosaic_gpu": fp8_mosaic_gpu, "triton": fp8_triton, "mosaic_tpu": fp8_mosaic_tpu}
_KERNEL_BACKEND = {"mosaic_gpu": "gpu", "triton": "gpu", "mosaic_tpu": "tpu"}
# Remat names: a kernel's output is no dot_general, so jax.checkpoint's dots policies would recompute every
# FP8 GEMM (and its quantisation) in the backward; the "dots" remat policy (nn/block.py) saves these names
# as it saves bf16 dots without batch dims. The per-expert (vmapped) GEMMs get their own, unsaved, names,
# as the bf16 expert einsums have a batch dim and are recomputed.
SAVED_NAMES = ("fp8_dot", "fp8_dot_residuals")
BATCHED_NAMES = ("fp8_batched_dot", "fp8_batched_dot_residuals")
WEIGHT_NAME = "fp8_weight"  # a GEMM's e4m3 weight kept for its backward; no remat policy saves it

__all__ = ["E4M3", "KERNELS", "SAVED_NAMES", "WeightTiles", "batched_dot", "batched_dots", "batched_swiglu_mlp",
           "dequantize_act", "dequantize_weight", "dot", "dots", "exact_operands", "gemm_nt", "joins_columns", "k_chunk",
           "mm_f32", "quantize_act", "quantize_input", "quantize_swiglu", "quantize_weight", "resolve_impl",
           "scaled_matmul_nt_xla", "swiglu", "swiglu_grad", "swiglu_mlp", "weight_nt", "weight_tiles"]


def _scale(amax, pow2: bool):
  """max(amax, 1e-4) / 448 (as a product, see _cast); with pow2 rounded up to a power of two (exactly, via
  frexp), so re-quantising along another tiling loses less (V3 report §3.3.3: "integral power of 2")."""
  s = jnp.maximum(amax, AMAX_FLOOR) * jnp.float32(1.0 / E4M3_MAX)  # see _cast for why not / 448
  if not pow2:
    return s
  m, e = jnp.frexp(s)  # s = m * 2**e with m in [0.5, 1): a power of two exactly when m == 0.5
  return jnp.ldexp(jnp.ones_like(s), jnp.where(m == 0.5, e - 1, e))


def _cast(x, scale):
  """e4m3(x * (1 / scale)), with scale = amax * fl(1/448). XLA rewrites divisions (x / s into x * (1/s),
  1 / (a / 448) into 448 / a) differently per fusion, so eager and jit disagreed by an fp32 ulp; these
  products it leaves alone, so every compilation and a numpy reference agree bitwise. Exact with pow2."""
  return (x * (1.0 / scale)).astype(E4M3)


def quantize_act(x_MxK, block: int = 128, pow2: bool = False):
  """(e4m3 q[..., M, K], fp32 scale[..., M, K/block]): one scale per row per `block` channels."""
  K = x_MxK.shape[-1]
  if K % block:
    raise ValueError(f"activation shape {x_MxK.shape}: last dim {K} must be a multiple of block {block}")
  x_blk = x_MxK.astype(jnp.float32).reshape(*x_MxK.shape[:-1], K // block, block)
  scale_MxKb = _scale(jnp.max(jnp.abs(x_blk), axis=-1), pow2)
  return _cast(x_blk, scale_MxKb[..., None]).reshape(x_MxK.shape), scale_MxKb


def quantize_weight(w_KxN, block: int = 128, pow2: bool = False):
  """(e4m3 q[..., K, N], fp32 scale[..., K/block, N/block]): one scale per `block` x `block` tile."""
  *lead, K, N = w_KxN.shape
  if K % block or N % block:
    raise ValueError(f"weight shape {w_KxN.shape}: both matrix dims must be multiples of block {block}")
  w_blk = w_KxN.astype(jnp.float32).reshape(*lead, K // block, block, N // block, block)
  scale_KbxNb = _scale(jnp.max(jnp.abs(w_blk), axis=(-3, -1)), pow2)
  return _cast(w_blk, scale_KbxNb[..., :, None, :, None]).reshape(w_KxN.shape), scale_KbxNb


def dequantize_act(q_MxK, scale_MxKb):
  """fp32 q * scale, the block inferred from the shapes."""
  Kb = scale_MxKb.shape[-1]
  q_blk = q_MxK.astype(jnp.float32).reshape(*q_MxK.shape[:-1], Kb, q_MxK.shape[-1] // Kb)
  return (q_blk * scale_MxKb[..., None]).reshape(q_MxK.shape)


def dequantize_weight(q_KxN, scale_KbxNb):
  """fp32 q * scale, each scale over its block x block tile (block = K / Kb); a last partial block of columns
  takes its tile's scale (DeepSeek's checkpoints round those scales up: V3's 576-wide kv_a has 5 blocks)."""
  *lead, K, N = q_KxN.shape
  Kb, Nb = scale_KbxNb.shape[-2:]
  block = K // Kb
  q = jnp.pad(q_KxN.astype(jnp.float32), [(0, 0)] * (len(lead) + 1) + [(0, Nb * block - N)])
  q_blk = q.reshape(*lead, Kb, block, Nb, block)
  return (q_blk * scale_KbxNb[..., :, None, :, None]).reshape(*lead, K, Nb * block)[..., :N]


def exact_operands(*qs):
  """e4m3 operands as the backend's dot takes them: as they are on GPU (XLA's fp8 GEMM); elsewhere as bf16,
  which is exact (e4m3's 3 mantissa and 4 exponent bits fit in bf16's 7 and 8) and native on TPU. On GPU
  behind a barrier: where XLA upcasts an fp8 dot it cannot hand to cuBLAS, its GPU compiler (excess precision
  allowed) may drop the f32 -> e4m3 -> wider convert pair, i.e. skip the quantisation; it did so to the wgrad
  requantisation on an H200 (_quantize_rows_cols)."""
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


def scaled_matmul_nt_xla(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, *, block: int, out_dtype):
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


def _gspmd_partitioned() -> bool:
  """Under a multi-device mesh outside shard_map GSPMD partitions the GEMM, and a pallas_call has no
  partitioning rule: it would be replicated (every device running the whole GEMM)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.size > 1 and not mesh.manual_axes


def joins_columns(*N: int, block: int) -> bool:
  """Whether GEMMs of one input by weights N[i] wide may run as one GEMM over the concatenated columns (one
  quantisation of the input, one wider launch, dgrad as one K = sum(N) product): the same block-scaled
  products when every weight but the last ends on a block boundary, and cheap where the weights are whole
  on the device; under GSPMD partitioning a concatenation of sharded columns would reshard them."""
  return all(n % block == 0 for n in N[:-1]) and not _gspmd_partitioned()


def _hopper() -> bool:
  """Compute capability 9.x: wgmma, which the Mosaic GPU kernel is written for."""
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def resolve_impl(impl: Impl, interpret: bool = False, block: int = 128) -> str:
  """'auto' is a kernel where operands are per device (one device, or inside the expert shard_map) on GPU:
  Mosaic GPU on Hopper (measured fastest), Triton on other GPUs; the XLA formulation elsewhere (the same
  recipe; GSPMD partitions it; the Mosaic TPU kernel is compiled but not yet measured, so it is opt-in).
  Mosaic GPU takes blocks of 32, 64 or 128 (a swizzle width) when asked; auto picks it at 128, the block
  real models use and the bench measures (its GPU tests also pass at 32); others go to Triton.
  A kernel where it cannot run is an error, never a silent fallback."""
  if impl == "auto":
    if jax.default_backend() != "gpu" or _gspmd_partitioned():
      return "xla"
    if _hopper() and fp8_mosaic_gpu.IMPORT_ERROR is None and block == 128:
      return "mosaic_gpu"
    return "triton" if fp8_triton.IMPORT_ERROR is None else "xla"
  if impl == "xla":
    return impl
  if impl not in KERNELS:
    raise ValueError(f"fp8 impl must be 'auto', 'xla', {', '.join(map(repr, KERNELS))}, got {impl!r}")
  if _gspmd_partitioned() and not interpret:
    raise ValueError(f"fp8 impl {impl!r} under a multi-device mesh outside shard_map would run replicated "
                     "(pallas_call has no partitioning rule): use impl='auto' or 'xla'")
  if KERNELS[impl].IMPORT_ERROR is not None:
    raise ValueError(f"fp8 impl {impl!r} is unavailable in this jax: {KERNELS[impl].IMPORT_ERROR}")
  if not interpret and jax.default_backend() != _KERNEL_BACKEND[impl]:
    raise ValueError(f"fp8 impl {impl!r} is a {_KERNEL_BACKEND[impl].upper()} kernel; backend is "
                     f"{jax.default_backend()!r}: use impl='xla' or 'auto', or interpret=True to emulate it")
  if impl == "mosaic_gpu" and jax.default_backend() == "gpu" and not _hopper():
    raise ValueError(f"fp8 impl 'mosaic_gpu' uses wgmma (compute capability 9.x); this GPU is "
                     f"{getattr(jax.devices()[0], 'compute_capability', '?')}: use impl='triton' or 'auto'")
  return impl


def gemm_nt(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, *, block: int, out_dtype, impl: str = "xla", tiles=None,
            interpret: bool = False, b_blocked: bool = False):
  """The one GEMM primitive, a @ b^T with per-row per-K-block scales, by a resolved impl; `tiles` is that
  kernel's own Tiles (None: its defaults). `b_blocked` says b's scales are a weight's block scales (constant
  over each aligned `block` of rows), which the Mosaic GPU kernel uses to promote with one scale per tile."""
  (M, K), (N, K2) = aq_MxK.shape, bq_NxK.shape
  if K != K2 or K % block or as_MxKb.shape != (M, K // block) or bs_NxKb.shape != (N, K // block):
    raise ValueError(f"fp8.gemm_nt: a {aq_MxK.shape} scales {as_MxKb.shape}, b {bq_NxK.shape} scales {bs_NxKb.shape} "
                     f"need a [M, K], b [N, K] and [rows, K/{block}] scales with K a multiple of block {block}")
  if impl == "xla":
    return scaled_matmul_nt_xla(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, block=block, out_dtype=out_dtype)
  blocked = {"b_blocked": b_blocked} if impl == "mosaic_gpu" else {}
  return KERNELS[impl].scaled_matmul_nt(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, block=block, out_dtype=out_dtype,
                                        tiles=tiles, interpret=interpret, **blocked)


def _rows(scale_XbxYb, block: int):
  """Block scales repeated over each block's rows: per-row scales for the primitive."""
  return jnp.repeat(scale_XbxYb, block, axis=0)


def weight_nt(wq_KxN, ws_KbxNb, block: int):
  """A quantised weight as gemm_nt's b operand: (e4m3 [N, K], per-row scales [N, K/block])."""
  return wq_KxN.T, _rows(ws_KbxNb.T, block)


def _fused_quantizer(impl: str, block: int, interpret: bool) -> bool:
  """With a GPU GEMM kernel the quantisations run as fp8_quantize_triton's one-pass kernel (each operand read
  once for every layout it is needed in), elsewhere as the XLA functions here. Compiled, only at block 128:
  that is where an H200 showed it equal to them (bitwise up to XLA's own GPU rounding of x * 1/s in ~1e-5
  of the elements); other blocks are checked in the interpreter only."""
  return (impl in ("mosaic_gpu", "triton") and fp8_quantize_triton.IMPORT_ERROR is None
          and (interpret or block == 128))


def _quantize_rows_cols(x_MxK, block, pow2, *, rows, cols, in_scale_MxKb=None, fused=False, interpret=False):
  """(q_MxK, s_MxKb) in 1 x block tiles if rows, then (qt_KxM, st_KxMb), x^T in 1 x block tiles (x's block x 1
  tiles, for wgrad), if cols; x is e4m3 dequantised by in_scale_MxKb when given."""
  if fused:
    return fp8_quantize_triton.quantize_act(x_MxK, block, pow2, rows=rows, cols=cols, in_scale_MxKb=in_scale_MxKb,
                                            interpret=interpret)
  if in_scale_MxKb is not None:
    # The barrier keeps the e4m3 rounding: with forward and backward in one program, XLA's GPU compiler (excess
    # precision allowed) drops the f32 -> e4m3 -> f32 convert pair and would requantise the unrounded x (an
    # H200 run: 35% of wgrad scales off, dw 3.6% from float64 instead of the recipe's 4.1%).
    x_MxK, in_scale_MxKb = jax.lax.optimization_barrier((x_MxK, in_scale_MxKb))
  x = x_MxK if in_scale_MxKb is None else dequantize_act(x_MxK, in_scale_MxKb)
  return (quantize_act(x, block, pow2) if rows else ()) + (quantize_act(x.astype(jnp.float32).T, block, pow2)
                                                           if cols else ())


def _quantize_weight_nt(ws_KxN, block, pow2, *, fused=False, interpret=False):
  """(q_KxN, s_KbxNb, q_NxK): the tiles of the weights ws joined along their columns, in both majors (the
  forward GEMM reads them N-major, dgrad K-major). The fused kernel reads each weight where it lies: a joined
  GEMM costs no concatenated copy of the master weights."""
  if fused:
    return fp8_quantize_triton.quantize_weight(ws_KxN, block, pow2, transpose=True, interpret=interpret)
  wq_KxN, ws_KbxNb = quantize_weight(jnp.concatenate(ws_KxN, axis=-1) if len(ws_KxN) > 1 else ws_KxN[0], block, pow2)
  return wq_KxN, ws_KbxNb, wq_KxN.T


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
  fused = _fused_quantizer(impl, block, interpret)
  one = lambda *ws: WeightTiles(*_quantize_weight_nt(ws, block, pow2, fused=fused, interpret=interpret))  # noqa: E731
  for _ in lead:
    one = jax.vmap(one)
  return one(*ws_KxN)


def _check_tiles(w_tiles: WeightTiles, K: int, N: int, block: int, where: str):
  q, s, qt = w_tiles
  if (q.shape != (K, N) or qt.shape != (N, K) or s.shape != (K // block, N // block)
      or {q.dtype, qt.dtype} != {jnp.dtype(E4M3)}):
    raise ValueError(f"{where}: w_tiles {[(a.shape, str(a.dtype)) for a in w_tiles]} must be the e4m3 [{K}, {N}], "
                     f"scales [{K // block}, {N // block}] and e4m3 [{N}, {K}] of its weights (fp8.weight_tiles)")


class _Static(NamedTuple):
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
def _dot(x_MxK, ws_KxN, x_quantized, w_tiles, st: _Static):
  return _dot_fwd(x_MxK, ws_KxN, x_quantized, w_tiles, st)[0]


def _forward(x_quantized, ws_KxN, st: _Static, out_dtype, w_tiles=None):
  """The forward GEMM from x's e4m3 tiles and the weights' (w_tiles, else quantised here); (y, residuals: x's
  tiles and the e4m3 weight K-major for dgrad, written by the same pass as the forward's N-major one)."""
  xq_MxK, xs_MxKb = x_quantized
  fused = _fused_quantizer(st.impl, st.block, st.interpret)
  if w_tiles is None:
    w_tiles = _quantize_weight_nt(ws_KxN, st.block, st.pow2, fused=fused, interpret=st.interpret)
  wq_KxN, ws_KbxNb, wq_NxK = w_tiles
  y_MxN = gemm_nt(xq_MxK, xs_MxKb, wq_NxK, _rows(ws_KbxNb.T, st.block), block=st.block, out_dtype=out_dtype,
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


def _backward(st: _Static, res, dy_quantized, M: int, dx_dtype):
  """V3 report Figure 6: dgrad with dy in 1 x block tiles along N against w's same block x block tiles;
  wgrad contracts over tokens, so x and dy go in block x 1 tiles (per channel per `block` tokens).
  `dy_quantized`: dy's (rows q, s, transposed q, s), its rows zero-padded to whole blocks (they change no amax
  and add nothing). Returns dx and the weights' gradients."""
  xq_MxK, xs_MxKb, wq_KxN, ws_KbxNb = res
  dyq_MxN, dys_MxNb, dytq_NxM, dyts_NxMb = dy_quantized
  block, kernel = st.block, dict(impl=st.impl, tiles=st.tiles, interpret=st.interpret)
  dx_MxK = gemm_nt(dyq_MxN[:M], dys_MxNb[:M], wq_KxN, _rows(ws_KbxNb, block), block=block, out_dtype=dx_dtype,
                   b_blocked=True, **kernel)
  # The cached 1 x 128 fp8 x is dequantised, transposed and requantised in 128 x 1 tiles, DeepSeek's own
  # workflow (V3 report §3.5.2).
  xtq_KxM, xts_KxMb = _quantize_rows_cols(kernel_util.pad_rows(xq_MxK, block), block, st.pow2, rows=False,
                                          cols=True, in_scale_MxKb=kernel_util.pad_rows(xs_MxKb, block),
                                          fused=_fused_quantizer(st.impl, block, st.interpret),
                                          interpret=st.interpret)
  dw_KxN = gemm_nt(xtq_KxM, xts_KxMb, dytq_NxM, dyts_NxMb, block=block, out_dtype=st.w_dtype, **kernel)
  dws = jnp.split(dw_KxN, list(itertools.accumulate(st.n_splits[:-1])), axis=-1) if len(st.n_splits) > 1 else [dw_KxN]
  return kernel_util.sum_to(dx_MxK, xq_MxK), tuple(kernel_util.sum_to(dw, wq_KxN) for dw in dws)


def _quantize_x(x_MxK, st: _Static):
  return _quantize_rows_cols(x_MxK, st.block, st.pow2, rows=True, cols=False,
                             fused=_fused_quantizer(st.impl, st.block, st.interpret), interpret=st.interpret)


def _quantize_dy(dy_MxN, st: _Static):
  return _quantize_rows_cols(kernel_util.pad_rows(dy_MxN, st.block), st.block, st.pow2, rows=True, cols=True,
                             fused=_fused_quantizer(st.impl, st.block, st.interpret), interpret=st.interpret)


def _dot_fwd(x_MxK, ws_KxN, x_quantized, w_tiles, st: _Static):
  y_MxN, res = _forward(_quantize_x(x_MxK, st) if x_quantized is None else x_quantized, ws_KxN, st, x_MxK.dtype,
                        w_tiles)
  return checkpoint_name(y_MxN, st.names[0]), res


def _dot_bwd(st: _Static, res, dy_MxN):
  dx, dws = _backward(st, res, _quantize_dy(dy_MxN, st), dy_MxN.shape[0], dy_MxN.dtype)
  return dx, dws, None, None  # given quantisations of x and w are constants of the forward (stop_gradient upstream)


_dot.defvjp(_dot_fwd, _dot_bwd)


def quantize_input(x_MxK, block: int = 128, impl: Impl = "xla", pow2: bool = False, interpret: bool = False):
  """x's 1 x block tiles exactly as `dot(x, ..., impl=impl)` computes them (the Triton kernel next to a GPU
  kernel), outside the GEMM and without a gradient: per-row tiles commute with any gathering of rows, so an MoE
  layer quantises its tokens once and dispatches e4m3 bytes (V3 report §3.3.3) to `dot(..., x_quantized=)`."""
  impl = resolve_impl(impl, interpret, block)
  K = x_MxK.shape[-1]
  if K % block:
    raise ValueError(f"fp8.quantize_input: x shape {x_MxK.shape}: last dim must be a multiple of block {block}")
  q, s = _quantize_rows_cols(jax.lax.stop_gradient(x_MxK).reshape(-1, K), block, pow2, rows=True, cols=False,
                             fused=_fused_quantizer(impl, block, interpret), interpret=interpret)
  return q.reshape(x_MxK.shape), s.reshape(*x_MxK.shape[:-1], K // block)


def swiglu(gate, up, dtype):
  """silu(gate) * up in fp32, rounded once to `dtype`: the values quantize_swiglu quantises."""
  g = gate.astype(jnp.float32)
  return (g / (1.0 + jnp.exp(-g)) * up.astype(jnp.float32)).astype(dtype)


def swiglu_grad(gate, up, dh):
  """fp32 (d gate, d up) of swiglu for cotangent dh: silu'(g) = sig(g) (1 + g (1 - sig(g)))."""
  g, u, dh = gate.astype(jnp.float32), up.astype(jnp.float32), dh.astype(jnp.float32)
  sig = 1.0 / (1.0 + jnp.exp(-g))
  return dh * (u * (sig * (1.0 + g * (1.0 - sig)))), dh * (g * sig)


def quantize_swiglu(gate_up_Mx2F, block: int = 128, impl: Impl = "xla", pow2: bool = False, interpret: bool = False):
  """The 1 x block tiles of h = swiglu(gate, up) from the joined [gate | up] GEMM output [..., 2F], without a
  gradient: with a GPU kernel one pass reads gate and up and writes e4m3 h (the SwiGLU fused into the
  quantisation, as DeepSeek's kernels do), so h is neither written nor re-read in bf16 (swiglu_mlp)."""
  impl = resolve_impl(impl, interpret, block)
  *lead, F2 = gate_up_Mx2F.shape
  if F2 % (2 * block):
    raise ValueError(f"fp8.quantize_swiglu: [gate | up] shape {gate_up_Mx2F.shape}: the last dim must be 2F with "
                     f"F a multiple of block {block}")
  q, s = _quantize_swiglu(jax.lax.stop_gradient(gate_up_Mx2F).reshape(-1, F2), block, pow2,
                          fused=_fused_quantizer(impl, block, interpret), interpret=interpret)
  return q.reshape(*lead, F2 // 2), s.reshape(*lead, F2 // (2 * block))


def _quantize_swiglu(gu_Mx2F, block, pow2, *, fused, interpret):
  if fused:
    return fp8_quantize_triton.quantize_swiglu(gu_Mx2F, block, pow2, interpret=interpret)
  F = gu_Mx2F.shape[-1] // 2
  return quantize_act(swiglu(gu_Mx2F[:, :F], gu_Mx2F[:, F:], gu_Mx2F.dtype), block, pow2)


def _quantize_swiglu_grad(gu_Mx2F, dh_MxF, block, pow2, *, fused, interpret):
  """dy of the [gate | up] GEMM, d[gate | up] = swiglu_grad(gate, up, dh) in the activations' dtype (one XLA
  fusion), in 1 x block and (transposed) block x 1 tiles. A Triton kernel fusing the SwiGLU backward into the
  quantisation, two tiles per program, ran slower on an H200 than this pair (0.54 against 0.44 ms per
  bench-config expert layer), so it is not used."""
  F = dh_MxF.shape[-1]
  d_Mx2F = jnp.concatenate(swiglu_grad(gu_Mx2F[:, :F], gu_Mx2F[:, F:], dh_MxF), axis=-1).astype(gu_Mx2F.dtype)
  return _quantize_rows_cols(d_Mx2F, block, pow2, rows=True, cols=True, fused=fused, interpret=interpret)


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
  st = _Static(block, impl, pow2, tiles, interpret, tuple(names), last.dtype, tuple(w.shape[1] for w in padded))
  if w_tiles is not None:
    _check_tiles(w_tiles, K, sum(st.n_splits), block, "fp8.dots")
  xq = None if x_quantized is None else (x_quantized[0].reshape(-1, K), x_quantized[1].reshape(-1, K // block))
  y = _dot(x_MxK.reshape(-1, K), padded, xq, w_tiles, st)[:, :sum(widths)].reshape(*x_MxK.shape[:-1], sum(widths))
  return jnp.split(y, list(itertools.accumulate(widths[:-1])), axis=-1) if len(widths) > 1 else [y]


def dot(x_MxK, w_KxN, block: int = 128, impl: Impl = "xla", pow2: bool = False, tiles=None,
        interpret: bool = False, names: tuple[str, str] = SAVED_NAMES, x_quantized=None):
  """x[..., K] @ w[K, N] as the block-scaled fp8 GEMM (`dots` with one weight)."""
  return dots(x_MxK, [w_KxN], block, impl, pow2, tiles, interpret, names, x_quantized)[0]


class _MLPStatic(NamedTuple):
  up: _Static  # the [gate | up] GEMM
  down: _Static


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _swiglu_mlp(x_MxD, w_gate_DxF, w_up_DxF, w_down_FxD, x_quantized, w_tiles, st: _MLPStatic):
  return _swiglu_mlp_fwd(x_MxD, w_gate_DxF, w_up_DxF, w_down_FxD, x_quantized, w_tiles, st)[0]


def _swiglu_mlp_fwd(x_MxD, w_gate_DxF, w_up_DxF, w_down_FxD, x_quantized, w_tiles, st: _MLPStatic):
  up = st.up
  tiles_up, tiles_down = (None, None) if w_tiles is None else w_tiles
  gu_Mx2F, res_up = _forward(_quantize_x(x_MxD, up) if x_quantized is None else x_quantized, (w_gate_DxF, w_up_DxF),
                             up, x_MxD.dtype, tiles_up)
  gu_Mx2F = checkpoint_name(gu_Mx2F, up.names[0])  # kept where `dot` would keep the [gate | up] output
  h_quantized = _quantize_swiglu(gu_Mx2F, up.block, up.pow2, fused=_fused_quantizer(up.impl, up.block, up.interpret),
                                 interpret=up.interpret)
  y_MxD, res_down = _forward(h_quantized, (w_down_FxD,), st.down, x_MxD.dtype, tiles_down)
  return checkpoint_name(y_MxD, st.down.names[0]), (res_up, gu_Mx2F, res_down)


def _swiglu_mlp_bwd(st: _MLPStatic, res, dy_MxD):
  res_up, gu_Mx2F, res_down = res
  up, M = st.up, dy_MxD.shape[0]
  dh_MxF, (dw_down,) = _backward(st.down, res_down, _quantize_dy(dy_MxD, st.down), M, dy_MxD.dtype)
  d_gu = _quantize_swiglu_grad(kernel_util.pad_rows(gu_Mx2F, up.block), kernel_util.pad_rows(dh_MxF, up.block),
                               up.block, up.pow2, fused=_fused_quantizer(up.impl, up.block, up.interpret),
                               interpret=up.interpret)
  dx_MxD, (dw_gate, dw_up) = _backward(up, res_up, d_gu, M, dy_MxD.dtype)
  return dx_MxD, dw_gate, dw_up, dw_down, None, None


_swiglu_mlp.defvjp(_swiglu_mlp_fwd, _swiglu_mlp_bwd)


def swiglu_mlp(x_MxD, w_gate_DxF, w_up_DxF, w_down_FxD, block: int = 128, impl: Impl = "xla", pow2: bool = False,
               tiles=None, interpret: bool = False, names: tuple[str, str] = SAVED_NAMES, x_quantized=None,
               w_tiles: tuple[WeightTiles, WeightTiles] | None = None):
  """down(silu(x W_gate) * (x W_up)) as three block-scaled fp8 GEMMs in two launches, with the SwiGLU fused into
  the down GEMM's input quantisation (DeepSeek's kernels fuse it likewise): h = swiglu(gate, up) is quantised
  straight from the [gate | up] GEMM output (quantize_swiglu), rounded once and never written in bf16 (the
  composition of `dot`s rounds bf16 silu(gate) and h on the way). The backward is the composition's: dh,
  d[gate | up] by one XLA fusion (_quantize_swiglu_grad says why), their quantisation and the GEMMs. F must be
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
  st = _MLPStatic(*(_Static(block, impl, pow2, tiles, interpret, tuple(names), w_down_FxD.dtype, n)
                    for n in ((F, F), (D,))))
  if w_tiles is not None:
    _check_tiles(w_tiles[0], D, 2 * F, block, "fp8.swiglu_mlp [gate | up]")
    _check_tiles(w_tiles[1], F, D, block, "fp8.swiglu_mlp down")
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
