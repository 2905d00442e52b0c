"""The Mosaic GPU (Hopper wgmma) FP8 kernel. On CPU: its Pallas body traces and lowers to Mosaic GPU for CUDA
at the shapes the model and its backward give it (JAX 0.10's Mosaic GPU interpreter cannot emulate the
transposed wgmma operand 8-bit wgmma needs, so values are checked on a GPU). On a Hopper GPU
(`R1JAX_TEST_PLATFORMS=cuda pytest -m gpu`): equal to the XLA formulation, forward and both gradients."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.batch import Batch
from r1jax.nn import fp8
from r1jax.nn.fp8.kernels import mosaic_gpu
from r1jax.nn.fp8.kernels.mosaic_gpu import Tiles

ON_HOPPER = jax.default_backend() == "gpu" and fp8.gemm._hopper()


def _operands(M, K, N, seed=0):
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kx, (M, K), jnp.bfloat16), (jax.random.normal(kw, (K, N)) / K**0.5).astype(jnp.bfloat16),
          jax.random.normal(kg, (M, N), jnp.bfloat16))


def _fwd_bwd(impl, block=128, tiles=None):
  f = functools.partial(fp8.dot, block=block, impl=impl, tiles=tiles)

  def run(x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))

  return run


@pytest.mark.skipif(mosaic_gpu.IMPORT_ERROR is not None, reason="no jax.experimental.pallas.mosaic_gpu")
@pytest.mark.parametrize("M,K,N,tiles", [(4096, 7168, 1536, Tiles()), (200, 256, 384, Tiles()),
                                         (256, 512, 384, Tiles(64, 192, 4, 4)),
                                         (2048, 1024, 2048, Tiles(k_pair=True, chain=True, stages=2))])
def test_kernel_lowers_for_cuda(M, K, N, tiles, monkeypatch):
  """The forward GEMM and the fp8.dot backward (dgrad over N, wgrad over tokens: M = 200 pads to a block)
  trace and lower for CUDA; compilation to SASS and values need a GPU (the gpu-marked test below)."""
  mm = functools.partial(mosaic_gpu.scaled_matmul_nt, block=128, out_dtype=jnp.bfloat16, tiles=tiles,
                         num_sms=132)
  ops = (jax.ShapeDtypeStruct((M, K), fp8.E4M3), jax.ShapeDtypeStruct((M, K // 128), jnp.float32),
         jax.ShapeDtypeStruct((N, K), fp8.E4M3), jax.ShapeDtypeStruct((N, K // 128), jnp.float32))
  text = jax.jit(mm).trace(*ops).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  x, w, dy = (jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in ((M, K), (K, N), (M, N)))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # lowering for a Hopper GPU from a CPU-only machine
  monkeypatch.setattr(fp8.gemm, "_hopper", lambda: True)
  lowered = jax.jit(_fwd_bwd("mosaic_gpu")).trace(x, w, dy).lower(lowering_platforms=("cuda",)).as_text()
  assert lowered.count("mosaic_gpu") >= 3  # y, dx and dw each one kernel


def test_refusals(monkeypatch):
  """A non-Hopper GPU, and the interpreter (which cannot emulate the transposed 8-bit wgmma operand), are
  one-line errors, not a failure deep in Mosaic's compiler."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(fp8.gemm, "_hopper", lambda: False)
  with pytest.raises(ValueError, match="compute capability 9"):
    fp8.resolve_impl("mosaic_gpu")
  q = jnp.zeros((128, 128), fp8.E4M3)
  with pytest.raises(ValueError, match="no interpreter"):
    mosaic_gpu.scaled_matmul_nt(q, jnp.ones((128, 1)), q, jnp.ones((128, 1)), block=128, out_dtype=jnp.float32,
                                    interpret=True)


def test_block_must_be_a_swizzle_width():
  q = jnp.zeros((128, 48), fp8.E4M3)
  with pytest.raises(ValueError, match="block 48"):
    mosaic_gpu.scaled_matmul_nt(q, jnp.ones((128, 1)), q, jnp.ones((128, 1)), block=48, out_dtype=jnp.float32)


@pytest.mark.skipif(mosaic_gpu.IMPORT_ERROR is not None, reason="no jax.experimental.pallas.mosaic_gpu")
def test_k_pair_needs_paired_blocks_and_narrow_tiles():
  """k_pair takes K blocks two at a time into three tile_m x tile_n accumulators: an odd number of K blocks, or
  tile_n 192 (288 fp32 registers a thread), is a one-line error; the default pairs only where K allows it."""
  a3, a2 = jnp.zeros((128, 384), fp8.E4M3), jnp.zeros((192, 256), fp8.E4M3)
  mm = functools.partial(mosaic_gpu.scaled_matmul_nt, block=128, out_dtype=jnp.float32)
  with pytest.raises(ValueError, match="3 blocks of 128"):
    mm(a3, jnp.ones((128, 3)), a3, jnp.ones((128, 3)), tiles=Tiles(k_pair=True, stages=2))
  with pytest.raises(ValueError, match="tile_n 192"):
    mm(a2, jnp.ones((192, 2)), a2, jnp.ones((192, 2)), tiles=Tiles(tile_n=192, k_pair=True, stages=2))
  assert mosaic_gpu.default_tiles(7168, 128).k_pair and not mosaic_gpu.default_tiles(640, 128).k_pair


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma)")
@pytest.mark.parametrize("M,K,N,block,tiles", [
    (4096, 7168, 2048, 128, None), (200, 256, 384, 128, None), (200, 256, 384, 32, None),
    # 256 CTA tiles on 132 SMs: chained pipelines over CTAs of one and of two tiles; k_pair's block pairs
    (2048, 1024, 2048, 128, Tiles(chain=True)), (2048, 1024, 2048, 128, Tiles(k_pair=True, stages=2)),
    (2048, 1024, 2048, 128, Tiles(k_pair=True, chain=True, stages=2)),
    (2048, 1024, 1536, 128, Tiles(64, 192, 4, 8, chain=True))])
def test_kernel_equals_xla_on_hopper(M, K, N, block, tiles):
  """Same e4m3 products and fp32 scales, different summation order: at block 128, 1e-5 of the largest value
  (bf16 outputs are compared after rounding: a sum near a rounding boundary flips by one bf16 ulp, up to 2^-7
  relative). Block 32 (the tiny model's, a 32-byte swizzle) promotes after every single wgmma, whose adder
  keeps about 14 bits (V3 report §3.3.2) and differs from cuBLAS's in rounding: an H200 showed 0.05% of y off
  by up to 4e-5 of the largest value. There the bar is relative Frobenius error 2e-3, against the O(1) of a
  wrong tile, scale or swizzle. Forward and dgrad take a weight's block scales one per tile (b_blocked),
  wgrad per row; the tile variants (Tiles' k_pair, chain) must give the same values."""
  x, w, dy = _operands(M, K, N, seed=3)
  for name, got, want in zip(("y", "dx", "dw"), jax.jit(_fwd_bwd("mosaic_gpu", block, tiles))(x, w, dy),
                             jax.jit(_fwd_bwd("xla", block))(x, w, dy)):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if block == 128:
      np.testing.assert_allclose(got, want, rtol=2.0**-7, atol=1e-5 * np.abs(want).max(), err_msg=name)
    else:
      assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-3, name


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma)")
def test_kept_fp8_weight_equals_xla_on_hopper():
  """A checkpoint's e4m3 weight (keep_fp8) with 576 outputs, V3's kv_a width: 4.5 blocks, padded to 5. The
  kernel takes its block scales one per tile (b_blocked); the same bar as the block-128 case above."""

  x, w, _ = _operands(1024, 1024, 576, seed=4)
  q, s = fp8.quantize_weight(jnp.pad(w, ((0, 0), (0, 64))), 128)
  qw = fp8.weights.QuantizedWeight(q[:, :576], s)
  got, want = (np.asarray(jax.jit(functools.partial(fp8.weights.dot, block=128, impl=impl))(x, qw), np.float64)
               for impl in ("mosaic_gpu", "xla"))
  np.testing.assert_allclose(got, want, rtol=2.0**-7, atol=1e-5 * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma)")
def test_saved_kernel_output_runs_once_in_a_scanned_remat_layer():
  """Layers as the model runs them (scan, remat saving the FP8 output by name): the compiled step has one
  kernel call per GEMM, forward 1 and backward 2 (dgrad, wgrad). XLA GPU's dynamic-slice fusion used to
  duplicate the forward call to write the saved output straight into the stacked residual."""
  from r1jax.nn.block import _REMAT_POLICIES

  def layer(x_MxK, w_KxK):
    return jax.nn.silu(fp8.dot(x_MxK, w_KxK, block=128, impl="mosaic_gpu")) + x_MxK, None  # silu' needs y

  body = jax.checkpoint(layer, policy=_REMAT_POLICIES["dots"])
  loss = lambda x, ws: jnp.sum(jax.lax.scan(body, x, ws)[0].astype(jnp.float32))  # noqa: E731
  x, ws = jnp.ones((1024, 512), jnp.bfloat16), jnp.ones((3, 512, 512), jnp.bfloat16) / 512
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws).compile().as_text()
  calls = re.findall(r'custom_call_target="mosaic_gpu', hlo)
  assert len(calls) == 3, f"{len(calls)} kernel calls for 3 GEMMs"


@pytest.mark.skipif(mosaic_gpu.IMPORT_ERROR is not None, reason="no jax.experimental.pallas.mosaic_gpu")
def test_kernel_inside_shard_map_lowers_with_per_device_types(monkeypatch):
  """As in the expert shard_map: rows split over 8 devices, the weight replicated. The custom_vjp's dx must
  vary like x although plgpu.kernel drops its output's manual-axis type (kernels/util.varying_like)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((8,), ("e",))
  f = jax.shard_map(lambda x, w: fp8.dot(x, w, block=128, impl="mosaic_gpu"), mesh=mesh,
                    in_specs=(P("e"), P()), out_specs=P("e"))
  grads = jax.grad(lambda x, w: f(x, w).astype(jnp.float32).sum(), argnums=(0, 1))
  x = jax.ShapeDtypeStruct((8 * 256, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("e")))
  w = jax.ShapeDtypeStruct((512, 384), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(fp8.gemm, "_hopper", lambda: True)
  text = jax.jit(grads).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma)")
def test_vmapped_expert_gemm_equals_xla_on_hopper():
  """The padded expert form vmaps fp8.dot over experts (Pallas's batching rule adds a grid axis to the
  kernel): each expert's product and gradients equal the XLA formulation's. fp32 operands and outputs, so no
  bf16 output rounding to allow for; but both sides' 128-deep e4m3 tensor-core products (the kernel's wgmma,
  XLA's cuBLAS GEMM) accumulate with Hopper's ~14-bit fp8 adder (V3 report §3.3.2), differently: y measured
  1.3e-4 of the norm and 3.5e-4 of the largest entry on an H200; bars 1e-3 and 5e-3, far below FP8's own ~4%
  and the O(1) of a wrong expert, tile or scale."""
  E, M, K, N = 4, 200, 256, 384
  ks = jax.random.split(jax.random.key(5), 3)
  x, w, dy = (jax.random.normal(k, s, jnp.float32) for k, s in zip(ks, [(E, M, K), (E, K, N), (E, M, N)]))

  def run(impl):
    y, vjp = jax.vjp(functools.partial(fp8.batched_dot, block=128, impl=impl), x, w)
    return (y, *vjp(dy))

  for name, got, want in zip("y dx dw".split(), jax.jit(lambda: run("mosaic_gpu"))(), jax.jit(lambda: run("xla"))()):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    rel, worst = np.linalg.norm(got - want) / np.linalg.norm(want), np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-3 and worst < 5e-3, (name, rel, worst)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma)")
def test_model_gradients_as_close_to_fp32_as_xla_on_hopper(tiny):
  """The tiny model (fp32 compute, every FP8 matmul on at block 32) through the kernel, as training calls it
  (padded rows, vmapped experts, kv_a's partial output block). Kernel and XLA differ in summation order and
  in the wgmma adder's rounding; an e4m3 rounding flipped by that in one layer's quantisation moves the next
  layers' gradients, so the two FP8 runs are two samples of FP8 noise (an H200: 3-19% apart per leaf), not
  one value. So each is measured against the same model without FP8: the kernel's gradient error (relative
  Frobenius, relative to at least 1e-3 of the whole gradient's norm for near-zero leaves) must stay within
  2x XLA's + 0.02, where a wrong tile, scale or expert gives O(1); losses agree within 1e-3."""
  import dataclasses

  from r1jax import train
  from r1jax.bench.batches import progressions
  from r1jax.config import FP8Config

  B, L = 8, 64
  tokens = progressions(np.random.default_rng(0), B, L + 1, tiny.model.vocab_size)
  batch = Batch(tokens[:, :-1], tokens[:, 1:], np.ones((B, L), np.int32))

  def grads(impl, enabled=True):
    cfg = dataclasses.replace(tiny, compute=dataclasses.replace(
        tiny.compute, fp8=FP8Config(enabled=enabled, block=32, impl=impl))).validate()
    state = train.init_state(cfg, jax.random.key(0), None)
    loss_fn = functools.partial(train.loss_fn, cfg=cfg.model, compute=cfg.compute)
    (loss, _), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, batch)
    return float(loss), g

  (loss, g), (loss_x, g_x), (_, g_ref) = grads("mosaic_gpu"), grads("xla"), grads("xla", enabled=False)
  np.testing.assert_allclose(loss, loss_x, rtol=1e-3)
  floor = 1e-3 * float(jnp.sqrt(sum(jnp.sum(b * b) for b in jax.tree.leaves(g_ref))))
  err = lambda g: jax.tree.map(  # noqa: E731
      lambda a, b: float(jnp.linalg.norm(a - b) / max(float(jnp.linalg.norm(b)), floor)), g, g_ref)
  err_k, err_x = err(g), err(g_x)
  bad = {jax.tree_util.keystr(p): (round(k, 4), round(x, 4)) for (p, k), x in
         zip(jax.tree_util.tree_leaves_with_path(err_k), jax.tree.leaves(err_x)) if k > 2 * x + 0.02}
  print("FP8 gradient error vs no FP8, worst leaf: kernel", max(jax.tree.leaves(err_k)),
        "XLA", max(jax.tree.leaves(err_x)))
  assert not bad, bad
