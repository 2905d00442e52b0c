"""The block-scaled FP8 GEMM for Hopper as a Pallas Mosaic GPU kernel: e4m3 wgmma (QGMMA) over each
`block`-deep K step into a register accumulator, then "promoted" into an fp32 main accumulator with both
scales applied on the CUDA cores (V3 report §3.3.2, N_C = 128; DeepGEMM's structure). Two compute
warpgroups take alternate halves of each output tile, so one's promotion overlaps the other's wgmma; a
third warpgroup feeds both with TMA copies several K steps ahead; the grid is persistent (one CTA per SM)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

try:  # Mosaic GPU is experimental: absent or renamed, the kernel is unavailable.
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  IMPORT_ERROR = None
except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the installed jax
  pl = plgpu = None
  IMPORT_ERROR = e

from r1jax.nn.kernel_util import manual_type, pad_rows, same_varying, varying_like

BLOCKS = (32, 64, 128)  # e4m3 K rows of 32, 64 or 128 bytes: the shared-memory swizzle widths
WG_COMPUTE = 2  # compute warpgroups per CTA; a third one issues the TMA copies


class Tiles(NamedTuple):
  """Per-warpgroup output tile (tile_m x tile_n; the CTA tile is 2 x tile_m by tile_n), pipeline depth
  (`stages` K steps in flight) and `swizzle_width` tiles visited together along M (L2 reuse of b).
  tile_m x tile_n fp32 is held twice per thread (main accumulator and wgmma result): 64 x 128 uses 128 of
  the 255 registers. Unset, `default_tiles` picks them per shape."""

  tile_m: int = 64
  tile_n: int = 128
  stages: int = 4
  swizzle_width: int = 8


def default_tiles(N: int) -> Tiles:
  """tile_n 192 where it divides N (no padded columns), else 128; 4 stages. In an H200 sweep
  (bench/results/h200_fp8_mosaic_gpu.json, 20 back-to-back launches per sample) this was the fastest of 7
  candidates at each V3 shape: 192 at 7168->1536 (869 TFLOP/s vs 756 at 128) and 7168->18432 (905 vs 850);
  128 at 7168->2048 and 2048->7168, which 192 does not divide (806 vs 686; 723 vs 565)."""
  return Tiles(tile_n=192) if N % 192 == 0 else Tiles()


def _kernel(a_gmem, b_gmem, as_gmem, bs_gmem, out_gmem, *, block: int, tiles: Tiles):
  """out[m, n] = sum_k (a[m, k] . b[n, k]) * as[k, m] * bs[k, n] over `block`-deep k; a [M, K], b [N, K]
  e4m3 (K-major: the only layout 8-bit wgmma takes for both operands), scales [Kb, M] and [Kb, N] fp32."""
  M, K = a_gmem.shape
  N = b_gmem.shape[0]
  tm, tn = tiles.tile_m, tiles.tile_n
  cta_m = WG_COMPUTE * tm
  m_iters, n_iters, k_iters = M // cta_m, N // tn, K // block
  swizzle = plgpu.find_swizzle(block * 8)  # bits of one K row of e4m3
  in_transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
  out_swizzle = plgpu.find_swizzle(tn * jnp.dtype(out_gmem.dtype).itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_gmem.dtype).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))

  def pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_m, block), lambda k: (0, k), transforms=in_transforms),
            plgpu.BlockSpec((tn, block), lambda k: (0, k), transforms=in_transforms),
            plgpu.BlockSpec((1, cta_m), lambda k: (k, 0)),
            plgpu.BlockSpec((1, tn), lambda k: (k, 0)),
        ],
        wg_axis="wg",
        num_compute_wgs=WG_COMPUTE,
        max_concurrent_steps=tiles.stages,
        compute_context=compute_context,
    )

  ignore = lambda *_, **__: None  # noqa: E731  (allocations do not depend on the bodies)

  @functools.partial(
      pl.run_scoped,
      allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, as_gmem, bs_gmem),
      out_smem=plgpu.SMEM((WG_COMPUTE, tm, tn), out_gmem.dtype, transforms=out_transforms),
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = jax.lax.axis_index("wg")
    wg_rows = pl.ds(wg * tm, tm)

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tile_loop(info):
      (lin,) = info.index
      m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), 0, tiles.swizzle_width)
      cta_rows, cols = pl.ds(m_idx * cta_m, cta_m), pl.ds(n_idx * tn, tn)

      def step(_, a_smem, b_smem, as_smem, bs_smem, acc_TMxTN):
        def product(part_ref):
          plgpu.wgmma(part_ref, a_smem.at[wg_rows], plgpu.transpose_ref(b_smem, (1, 0)))
          return part_ref[...]  # waits for this warpgroup's wgmma

        part = pl.run_scoped(product, plgpu.ACC((tm, tn), jnp.float32))
        sa, sb = as_smem[0, wg_rows], bs_smem[0, :]  # layouts inferred: rows / columns of WGMMA
        scale = jax.lax.broadcast_in_dim(sa, (tm, tn), [0]) * jax.lax.broadcast_in_dim(sb, (tm, tn), [1])
        return acc_TMxTN + part * scale

      def compute(run):
        acc = run(jnp.zeros((tm, tn), jnp.float32))  # Warpgroup semantics infers the WGMMA layout
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store has left out_smem
        out_smem[wg] = acc.astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[cta_rows, cols].at[wg_rows])

      pipeline(step, compute)(a_gmem.at[cta_rows], b_gmem.at[cols], as_gmem.at[:, cta_rows],
                              bs_gmem.at[:, cols], allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _num_sms() -> int:
  return getattr(jax.devices()[0], "core_count", None) or 132


def scaled_matmul_nt(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, *, block: int, out_dtype, tiles: Tiles | None = None,
                     interpret=False, num_sms: int | None = None):
  """a @ b^T with per-row, per-K-block scales on both operands (fp8.scaled_matmul_nt_xla's contract); rows
  of a and b zero-padded to the CTA tile and cropped after. No CPU emulation: JAX 0.10's Mosaic GPU
  interpreter has no transposed wgmma operand, which 8-bit wgmma needs (tests lower it for CUDA instead)."""
  if IMPORT_ERROR is not None:
    raise RuntimeError(f"the Mosaic GPU FP8 kernel needs jax.experimental.pallas.mosaic_gpu: {IMPORT_ERROR}")
  M, K = aq_MxK.shape
  N = bq_NxK.shape[0]
  tiles = tiles or default_tiles(N)
  if block not in BLOCKS:
    raise ValueError(f"Mosaic GPU FP8 kernel: block {block} must be 32, 64 or 128 (a swizzle width in bytes)")
  a, b = pad_rows(aq_MxK, WG_COMPUTE * tiles.tile_m), pad_rows(bq_NxK, tiles.tile_n)
  as_KbxM, bs_KbxN = pad_rows(as_MxKb, WG_COMPUTE * tiles.tile_m).T, pad_rows(bs_NxKb, tiles.tile_n).T
  a, b, as_KbxM, bs_KbxN = same_varying(a, b, as_KbxM, bs_KbxN)
  if interpret:
    raise ValueError("the Mosaic GPU FP8 kernel has no interpreter path; check values on a Hopper GPU")
  grid = min(num_sms or _num_sms(), (a.shape[0] // (WG_COMPUTE * tiles.tile_m)) * (b.shape[0] // tiles.tile_n))
  call = plgpu.kernel(
      functools.partial(_kernel, block=block, tiles=tiles),
      out_type=jax.ShapeDtypeStruct((a.shape[0], b.shape[0]), out_dtype, **manual_type(a)),
      grid=(grid,),
      grid_names=("sm",),
      num_threads=WG_COMPUTE + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )
  return varying_like(call(a, b, as_KbxM, bs_KbxN), a)[:M, :N]
