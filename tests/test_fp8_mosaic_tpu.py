"""The Pallas Mosaic TPU FP8 GEMM: in Pallas's TPU interpreter against the XLA formulation
(xla.scaled_matmul_nt) on the same quantised operands, and compiled for real TPU chips ahead of time
on this CPU-only machine (libtpu's Mosaic compiler, no TPU attached)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from r1jax.nn import fp8
from r1jax.nn.fp8.kernels import mosaic_tpu, xla
from r1jax.nn.fp8.kernels.mosaic_tpu import Tiles

# The TPU-semantics interpreter: uninitialised VMEM reads NaN and out-of-bounds reads raise, so a missing
# accumulator reset or a wrong block index fails loudly instead of reading zeros.
INTERPRET = pltpu.InterpretParams()
V3_SHAPES = [(4096, 7168, 2048), (8, 1536, 7168)]  # (M, K, N): a dense GEMM and an 8-token decode step


def operands(M, K, N, seed=0):
  """Quantised x [M, K] and w^T [N, K] with per-row block scales (gemm.weight_nt's layout). Rows and K
  blocks span 1e-3..1e3 so that a scale applied to the wrong row or K block cannot go unnoticed."""
  rng = np.random.default_rng(seed)
  per_block_K = np.repeat(10.0 ** rng.uniform(-3, 3, K // 128), 128)
  x = rng.standard_normal((M, K)) * 10.0 ** rng.uniform(-3, 3, (M, 1)) * per_block_K
  w = rng.standard_normal((K, N)) * 10.0 ** rng.uniform(-3, 3, (1, N)) / np.sqrt(K)
  aq, as_MxKb = fp8.quantize_act(jnp.asarray(x, jnp.float32))
  wq, ws_KbxNb = fp8.quantize_weight(jnp.asarray(w, jnp.float32))
  return aq, as_MxKb, wq.T, jnp.repeat(ws_KbxNb.T, 128, axis=0)


def kernel(tiles, out_dtype):
  return jax.jit(lambda *ops: mosaic_tpu.scaled_matmul_nt(*ops, block=128, out_dtype=out_dtype, tiles=tiles,
                                                       interpret=INTERPRET))


def assert_close(y, ref):
  """Same e4m3 products (exact in fp32) and scales, another fp32 summation order: |diff| <= n 2^-24
  sum|terms| at worst, 1e-5 of max|y| here (~80 ulps). A bf16 output rounds fp32 values that close to
  the same bf16 value or to neighbours: at most one bf16 ulp, 2^-7 relative."""
  rtol = 2.0**-7 if y.dtype == jnp.bfloat16 else 1e-5
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  np.testing.assert_allclose(y, ref, rtol=rtol, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("M,K,N,tiles", [(200, 512, 256, Tiles(bm=64, bn=128, bk=256)),  # 2 blocks per K step
                                         (40, 384, 384, Tiles(bm=32, bn=128, bk=128))])  # 3 K steps of 1
def test_interpreted_kernel_equals_xla(M, K, N, tiles, out_dtype):
  """M = 200 and 40 are no multiple of bm: rows are padded to the tile and cropped after."""
  ops = operands(M, K, N)
  y = kernel(tiles, out_dtype)(*ops)
  ref = xla.scaled_matmul_nt(*ops, block=128, out_dtype=out_dtype)
  assert y.shape == (M, N) and y.dtype == out_dtype
  assert_close(y, ref)


def test_default_tiles_shrink_to_small_operands():
  """8 rows and 128 columns take one (32, 128) tile rather than padding to 512 x 512."""
  ops = operands(8, 256, 128, seed=1)
  assert_close(kernel(None, jnp.float32)(*ops), xla.scaled_matmul_nt(*ops, block=128, out_dtype=jnp.float32))


def test_inside_shard_map_with_a_replicated_weight():
  """Rows split over 2 devices, the weight replicated: the kernel casts it to vary like the rows. (The
  generic interpreter, interpret=True, fails inside shard_map on JAX 0.10.2's varying-axes checks.)"""
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
  aq, as_, bq, bs = operands(96, 256, 128, seed=2)
  local = lambda *ops: mosaic_tpu.scaled_matmul_nt(*ops, block=128, out_dtype=jnp.float32,  # noqa: E731
                                                tiles=Tiles(bm=32, bn=128, bk=128), interpret=INTERPRET)
  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()), out_specs=P("data")))
  y = f(aq, as_, bq, bs)
  assert y.sharding.spec == P("data")
  assert_close(y, xla.scaled_matmul_nt(aq, as_, bq, bs, block=128, out_dtype=jnp.float32))


def test_bad_tiles_raise():
  ops = operands(8, 256, 128)
  with pytest.raises(ValueError, match="bm 48"):
    mosaic_tpu.scaled_matmul_nt(*ops, block=128, out_dtype=jnp.float32, tiles=Tiles(bm=48))
  with pytest.raises(ValueError, match="block 64"):
    mosaic_tpu.scaled_matmul_nt(*ops, block=64, out_dtype=jnp.float32)


def abstract_operands(M, K, N, sharding=None):
  sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
  return sd((M, K), fp8.E4M3), sd((M, K // 128), jnp.float32), sd((N, K), fp8.E4M3), sd((N, K // 128), jnp.float32)


@pytest.mark.parametrize("M,K,N", V3_SHAPES)
def test_lowers_to_mosaic_tpu(M, K, N):
  """Pallas -> Mosaic lowering for TPU, which runs anywhere: block shapes pass the (8, 128) rule and every
  op in the kernel has a Mosaic lowering. Mosaic's own layout passes run only in libtpu (next test)."""
  f = jax.jit(lambda *ops: mosaic_tpu.scaled_matmul_nt(*ops, block=128, out_dtype=jnp.bfloat16))
  assert "tpu_custom_call" in f.trace(*abstract_operands(M, K, N)).lower(lowering_platforms=("tpu",)).as_text()


def has_libtpu() -> bool:
  """libtpu.so at TPU_LIBRARY_PATH or an installed libtpu package (jax[tpu] 0.10.2 pins libtpu==0.0.42.*)."""
  return os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")) or importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not has_libtpu(), reason="compiling for a TPU topology without a TPU needs libtpu: "
                    "pip install 'libtpu==0.0.42.*' or set TPU_LIBRARY_PATH to its libtpu.so")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2", "tpu7x:2x2x1"])
@pytest.mark.parametrize("M,K,N", V3_SHAPES)
def test_compiles_for_tpu_ahead_of_time(topology, M, K, N):
  """The whole compile, Mosaic included, for one chip of a TPU topology (MaxText's AOT trick): catches
  what the lowering cannot, e.g. a dynamic lane offset Mosaic cannot prove 128-aligned, or VMEM overflow."""
  from jax.experimental import topologies

  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata to ask on this machine
  device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
  f = jax.jit(lambda *ops: mosaic_tpu.scaled_matmul_nt(*ops, block=128, out_dtype=jnp.bfloat16))
  compiled = f.trace(*abstract_operands(M, K, N, jax.sharding.SingleDeviceSharding(device))).lower().compile()
  assert compiled.memory_analysis().output_size_in_bytes == M * N * 2
