"""The one FP8 GEMM primitive, a @ b^T with per-row per-K-block scales on both operands (weight block scales
repeated over their block's rows), and which implementation runs it: the XLA formulation (kernels/xla.py) or a
Pallas kernel: Mosaic GPU (Hopper wgmma), Triton (any CUDA GPU) or Mosaic TPU."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from r1jax.nn.fp8.kernels import mosaic_gpu, mosaic_tpu, triton, xla

Impl = Literal["auto", "xla", "mosaic_gpu", "triton", "mosaic_tpu"]
KERNELS = {"mosaic_gpu": mosaic_gpu, "triton": triton, "mosaic_tpu": mosaic_tpu}
_KERNEL_BACKEND = {"mosaic_gpu": "gpu", "triton": "gpu", "mosaic_tpu": "tpu"}


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
    if _hopper() and mosaic_gpu.IMPORT_ERROR is None and block == 128:
      return "mosaic_gpu"
    return "triton" if triton.IMPORT_ERROR is None else "xla"
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
    return xla.scaled_matmul_nt(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, block=block, out_dtype=out_dtype)
  blocked = {"b_blocked": b_blocked} if impl == "mosaic_gpu" else {}
  return KERNELS[impl].scaled_matmul_nt(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, block=block, out_dtype=out_dtype,
                                        tiles=tiles, interpret=interpret, **blocked)


def rows(scale_XbxYb, block: int):
  """Block scales repeated over each block's rows: per-row scales for the primitive."""
  return jnp.repeat(scale_XbxYb, block, axis=0)


def weight_nt(wq_KxN, ws_KbxNb, block: int):
  """A quantised weight as gemm_nt's b operand: (e4m3 [N, K], per-row scales [N, K/block])."""
  return wq_KxN.T, rows(ws_KbxNb.T, block)

