"""Timing helpers of the benchmarks: medians of blocking calls, and the device's own measured limits (memory
bandwidth, bf16 matmul peak) that results are compared with."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def median_seconds(fn, *args, repeats: int, warmup: int = 1, calls: int = 1) -> float:
  """Median wall time of one fn(*args) over `repeats` samples after `warmup` (which includes compilation).
  A sample times `calls` back-to-back launches and one final sync, divided by `calls`: for sub-millisecond
  kernels this hides the host's dispatch and sync round trip (tens of microseconds) behind device work."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls - 1):
      fn(*args)
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times)


def memory_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 10) -> float:
  """Device memory bandwidth from a large device-to-device copy (bytes read + bytes written)."""
  return 2 * n_bytes / median_seconds(jax.jit(lambda a: a + 1.0), jnp.ones(n_bytes // 4, jnp.float32),
                                      repeats=repeats) / 1e9


def matmul_peak_tflops(n: int = 8192, repeats: int = 20) -> float:
  """The bf16 matmul throughput this device reaches on an n x n x n product (the MFU denominator)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  return 2 * n**3 / median_seconds(jax.jit(lambda x: x @ x), a, repeats=repeats, calls=10) / 1e12

