"""The block-scaled FP8 GEMM for Hopper as a Pallas Mosaic GPU kernel: e4m3 wgmma (QGMMA) over each
`block`-deep K step into a register accumulator, then "promoted" into an fp32 main accumulator with both
scales applied on the CUDA cores (V3 report §3.3.2, N_C = 128; DeepGEMM's structure). Two compute
warpgroups take the two halves of each output tile; a third feeds both with TMA copies several K steps ahead;
the grid is persistent (one CTA per SM). What makes it fast (Tiles): each warpgroup promotes one K block while
the tensor cores run the next (k_pair); a weight's block scales are one scalar per tile and K block, so
promotion is one FMA per element (b_blocked); a CTA's next tile is fetched while it finishes the last (chain)."""

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

from r1jax.nn.fp8.kernels.util import manual_type, pad_rows, same_varying, varying_like

BLOCKS = (32, 64, 128)  # e4m3 K rows of 32, 64 or 128 bytes: the shared-memory swizzle widths
WG_COMPUTE = 2  # compute warpgroups per CTA; a third one issues the TMA copies


class Tiles(NamedTuple):
  """Per-warpgroup output tile (tile_m x tile_n; the CTA tile is 2 x tile_m by tile_n), pipeline depth
  (`stages` pipeline steps in flight) and `swizzle_width` tiles visited together along M (L2 reuse of b).
  tile_m x tile_n fp32 is held twice per thread (main accumulator and wgmma result): 64 x 128 uses 128 of
  the 255 registers.

  `k_pair`: each pipeline step takes two K blocks, and a warpgroup promotes the first block's product while
  the tensor cores compute the second's (three accumulators: tile_n <= 128; an even number of K blocks).
  `chain`: the persistent loop's per-tile pipelines run as one (PipelinePipeline states), so the copies for a
  CTA's next tile start while it finishes this one; taken where the steps per tile divide by `stages` (Pallas's
  condition). Unset, `default_tiles` picks them per shape."""

  tile_m: int = 64
  tile_n: int = 128
  stages: int = 4
  swizzle_width: int = 8
  k_pair: bool = False
  chain: bool = False


def default_tiles(K: int, block: int) -> Tiles:
  """64 x 128 tiles with chained pipelines; K blocks in pairs (2 stages of 2) where K has an even number of
  them, else 4 single-block stages. In an H200 sweep of 7 candidates (bench/results/h200_fp8_tune_kpair.json,
  forward GEMMs, 20 back-to-back launches per sample) this was the fastest at all four V3 shapes: 940, 964, 946
  and 1051 TFLOP/s at 7168->2048, 2048->7168, 7168->1536 and 7168->18432 (4096 tokens), against 905, 851, 924 and
  1020 with single blocks and 769, 757, 725 and 846 without b_blocked's per-tile scales. tile_n 192 (the
  previous default where it divides N) was slower everywhere but the smallest shape (2560 x 1024 -> 2048)."""
  return Tiles(k_pair=True, chain=True, stages=2) if (K // block) % 2 == 0 else Tiles(chain=True)


def _kernel(a_gmem, b_gmem, as_gmem, bs_gmem, out_gmem, *, block: int, tiles: Tiles, b_blocked: bool):
  """out[m, n] = sum_k (a[m, k] . b[n, k]) * as[k, m] * bs[k, n] over `block`-deep k; a [M, K], b [N, K]
  e4m3 (K-major: the only layout 8-bit wgmma takes for both operands), scales [Kb, M] and [Kb, N] fp32.
  b_blocked: bs is constant over each aligned `block` of n (a weight's block scales), so with tile_n dividing
  block one scalar per K step serves the tile: promotion is one FMA per element instead of FMUL + FMA."""
  M, K = a_gmem.shape
  N = b_gmem.shape[0]
  tm, tn = tiles.tile_m, tiles.tile_n
  cta_m = WG_COMPUTE * tm
  kp = 2 if tiles.k_pair else 1  # K blocks per pipeline step
  m_iters, n_iters, k_iters = M // cta_m, N // tn, K // (kp * block)
  scalar_bs = b_blocked and block % tn == 0
  chain = tiles.chain and k_iters % tiles.stages == 0
  swizzle = plgpu.find_swizzle(block * 8)  # bits of one K row of e4m3
  in_transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
  out_swizzle = plgpu.find_swizzle(tn * jnp.dtype(out_gmem.dtype).itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_gmem.dtype).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))

  def pipeline(body, compute_context, state=None):
    # One spec per K block of a step for each operand (each its own swizzled buffer), the step's kp rows of
    # both scales in one.
    operand_specs = [plgpu.BlockSpec((rows, block), functools.partial(lambda j, k: (0, kp * k + j), j),
                                     transforms=in_transforms) for rows in (cta_m, tn) for j in range(kp)]
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[*operand_specs, plgpu.BlockSpec((kp, cta_m), lambda k: (k, 0)),
                  plgpu.BlockSpec((kp, tn), lambda k: (k, 0))],
        wg_axis="wg",
        num_compute_wgs=WG_COMPUTE,
        max_concurrent_steps=tiles.stages,
        compute_context=compute_context,
        pipeline_state=state,
    )

  ignore = lambda *_, **__: None  # noqa: E731  (allocations do not depend on the bodies)
  operands = (a_gmem,) * kp + (b_gmem,) * kp + (as_gmem, bs_gmem)

  @functools.partial(
      pl.run_scoped,
      allocs=pipeline(ignore, ignore).get_allocations(*operands),
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

      def scale(as_smem, bs_smem, j):
        """The tm x tn fp32 factor of K block j of this step (layouts inferred: rows / columns of WGMMA)."""
        sa = as_smem[j, wg_rows]
        if scalar_bs:
          return jax.lax.broadcast_in_dim(sa * bs_smem[j, 0], (tm, tn), [0])
        return jax.lax.broadcast_in_dim(sa, (tm, tn), [0]) * jax.lax.broadcast_in_dim(bs_smem[j, :], (tm, tn), [1])

      def step(_, *refs):
        a_smem, b_smem, (as_smem, bs_smem, acc_TMxTN) = refs[:kp], refs[kp:2 * kp], refs[2 * kp:]

        def products(*part_refs):
          for j, part_ref in enumerate(part_refs):  # issued back to back: wgmma groups run in order
            plgpu.wgmma(part_ref, a_smem[j].at[wg_rows], b_smem[j].transpose((1, 0)))
          acc = acc_TMxTN
          for j, part_ref in enumerate(part_refs):  # block j promoted while blocks after it still run
            part = plgpu.wgmma_accumulator_load(part_ref, wait_n=kp - 1 - j)
            acc = acc + part * scale(as_smem, bs_smem, j)
          return acc

        return pl.run_scoped(products, *[plgpu.ACC((tm, tn), jnp.float32)] * kp)

      def compute(run):
        acc = run(jnp.zeros((tm, tn), jnp.float32))  # Warpgroup semantics infers the WGMMA layout
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store has left out_smem
        out_smem[wg] = acc.astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[cta_rows, cols].at[wg_rows])

      state = None
      # A CTA's first tile fills the pipeline and its last drains it. A lone tile only fills it: the drain awaits
      # the consumed barriers for their next use, and there is none (on an H200 CTAs of one and of two tiles
      # pass the GPU test).
      if chain:
        last = info.local_index == info.num_local_steps - 1
        state = jnp.where(info.local_index == 0, int(plgpu.PipelinePipeline.START),
                          jnp.where(last, int(plgpu.PipelinePipeline.STOP), int(plgpu.PipelinePipeline.STEADY)))
      slices = (a_gmem.at[cta_rows],) * kp + (b_gmem.at[cols],) * kp + (as_gmem.at[:, cta_rows], bs_gmem.at[:, cols])
      pipeline(step, compute, state)(*slices, allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _num_sms() -> int:
  return getattr(jax.devices()[0], "core_count", None) or 132


def scaled_matmul_nt(aq_MxK, as_MxKb, bq_NxK, bs_NxKb, *, block: int, out_dtype, tiles: Tiles | None = None,
                     interpret=False, num_sms: int | None = None, b_blocked: bool = False):
  """a @ b^T with per-row, per-K-block scales on both operands (kernels/xla.py's scaled_matmul_nt contract); rows
  of a and b zero-padded to the CTA tile and cropped after. `b_blocked` promises that bs is constant over each
  aligned `block` of b's rows (a weight's block scales), which lets the kernel read one scale per tile.
  No CPU emulation: JAX 0.10's Mosaic GPU interpreter has no transposed wgmma operand, which 8-bit wgmma needs
  (tests lower it for CUDA instead)."""
  if IMPORT_ERROR is not None:
    raise RuntimeError(f"the Mosaic GPU FP8 kernel needs jax.experimental.pallas.mosaic_gpu: {IMPORT_ERROR}")
  M, K = aq_MxK.shape
  N = bq_NxK.shape[0]
  tiles = tiles or default_tiles(K, block)
  if block not in BLOCKS:
    raise ValueError(f"Mosaic GPU FP8 kernel: block {block} must be 32, 64 or 128 (a swizzle width in bytes)")
  if tiles.k_pair and (tiles.tile_n > 128 or (K // block) % 2):
    raise ValueError(f"Mosaic GPU FP8 kernel: k_pair holds three {tiles.tile_m} x {tiles.tile_n} fp32 accumulators "
                     f"(tile_n <= 128) and takes K blocks in pairs; got tile_n {tiles.tile_n}, K {K} = "
                     f"{K // block} blocks of {block}")
  a, b = pad_rows(aq_MxK, WG_COMPUTE * tiles.tile_m), pad_rows(bq_NxK, tiles.tile_n)
  as_KbxM, bs_KbxN = pad_rows(as_MxKb, WG_COMPUTE * tiles.tile_m).T, pad_rows(bs_NxKb, tiles.tile_n).T
  a, b, as_KbxM, bs_KbxN = same_varying(a, b, as_KbxM, bs_KbxN)
  if interpret:
    raise ValueError("the Mosaic GPU FP8 kernel has no interpreter path; check values on a Hopper GPU")
  grid = min(num_sms or _num_sms(), (a.shape[0] // (WG_COMPUTE * tiles.tile_m)) * (b.shape[0] // tiles.tile_n))
  call = plgpu.kernel(
      functools.partial(_kernel, block=block, tiles=tiles, b_blocked=b_blocked),
      out_type=jax.ShapeDtypeStruct((a.shape[0], b.shape[0]), out_dtype, **manual_type(a)),
      grid=(grid,),
      grid_names=("sm",),
      num_threads=WG_COMPUTE + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )
  return varying_like(call(a, b, as_KbxM, bs_KbxN), a)[:M, :N]
