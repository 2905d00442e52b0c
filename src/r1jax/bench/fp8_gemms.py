"""FP8 GEMM benchmarks at the DeepSeek-V3 671B projection shapes (4096 tokens): bf16 `jnp.dot` against
the block-scaled fp8 GEMM (XLA formulation, Pallas kernels), forward and forward+backward, with errors
against an fp32 product of the original operands. Plain functions returning JSON-able dicts."""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.bench.timing import median_seconds
from r1jax.nn import fp8
from r1jax.nn.fp8.kernels import mosaic_gpu, triton, xla

# (M tokens, K, N): expert gate/up, expert down, MLA q down-projection, dense-layer up (V3 671B preset)
V3_SHAPES = ((4096, 7168, 2048), (4096, 2048, 7168), (4096, 7168, 1536), (4096, 7168, 18432))
GPU_IMPLS = ("xla", "triton", "mosaic_gpu")
CALLS = 20  # back-to-back launches per timing sample (bench.median_seconds): kernels here take 0.1-2 ms
_T, _M = triton.Tiles, mosaic_gpu.Tiles
TUNE_CANDIDATES = {
    "triton": (_T(64, 128, 4, 4), _T(64, 256, 8, 3), _T(128, 128, 8, 4), _T(128, 128, 4, 3), _T(128, 256, 8, 3),
               _T(64, 128, 4, 4, group_m=1)),
    "mosaic_gpu": (_M(64, 128, 4, 8), _M(64, 128, 4, 8, chain=True), _M(64, 128, 5, 8), _M(64, 192, 4, 8),
                   _M(64, 192, 4, 8, chain=True), _M(64, 128, 2, 8, k_pair=True),
                   _M(64, 128, 2, 8, k_pair=True, chain=True)),
}


def _operands(shape, dtype, seed: int = 0):
  """x ~ N(0, 1), w ~ N(0, 1/K) (unit-variance outputs), dy ~ N(0, 1): the GEMM's operands and cotangent."""
  M, K, N = shape
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kx, (M, K), dtype), (jax.random.normal(kw, (K, N), jnp.float32) / K**0.5).astype(dtype),
          jax.random.normal(kg, (M, N), dtype))


def _rel_err(y, ref) -> float:
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def _fp32_products(x, w, dy, reference: str):
  """y = x @ w, dx = dy @ w^T, dw = x^T @ dy of the original (bf16-valued) operands in fp32 or better:
  numpy float64 on the host, or the device's full-precision fp32 (HIGHEST) for speed."""
  if reference == "numpy":
    x64, w64, dy64 = (np.asarray(t, np.float64) for t in (x, w, dy))
    return x64 @ w64, dy64 @ w64.T, x64.T @ dy64
  mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  x32, w32, dy32 = (t.astype(jnp.float32) for t in (x, w, dy))
  return mm(x32, w32), mm(dy32, w32.T), mm(x32.T, dy32)


def _fns(impl: str, tiles=None):
  """(forward, forward+backward) jitted for one implementation; fwd+bwd returns y, dx and dw."""
  if impl == "bf16":
    f = lambda x, w: jnp.dot(x, w)  # noqa: E731
  else:
    f = functools.partial(fp8.dot, impl=impl, tiles=tiles)

  def fwd_bwd(x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))

  return jax.jit(f), jax.jit(fwd_bwd)


def bench_gemms(shapes=V3_SHAPES, impls=GPU_IMPLS, repeats: int = 10, dtype=jnp.bfloat16, tiles: dict | None = None,
                backward: bool = True,
                reference: Literal["device", "numpy"] = "device") -> dict:
  """Per shape: bf16 and each fp8 impl's forward (and fwd+bwd) median ms, TFLOP/s (2MKN forward, 6MKN
  fwd+bwd), speed relative to bf16 in the same call, and relative Frobenius errors of y (and dx, dw)."""
  rows = []
  for shape in shapes:
    M, K, N = shape
    x, w, dy = _operands(shape, dtype)
    ref_y, ref_dx, ref_dw = _fp32_products(x, w, dy, reference)
    base = {}
    for impl in ("bf16", *[i for i in impls if i != "bf16"]):
      row = {"shape": list(shape), "impl": impl}
      try:
        fwd, fwd_bwd = _fns(impl, (tiles or {}).get(impl))
        t = median_seconds(fwd, x, w, repeats=repeats, calls=CALLS)
        row.update(fwd_ms=1e3 * t, fwd_tflops=2 * M * K * N / t / 1e12, rel_err=_rel_err(fwd(x, w), ref_y))
        if backward:
          tb = median_seconds(fwd_bwd, x, w, dy, repeats=repeats, calls=CALLS)
          _, dx, dw = fwd_bwd(x, w, dy)
          row.update(fwdbwd_ms=1e3 * tb, fwdbwd_tflops=6 * M * K * N / tb / 1e12,
                     dx_rel_err=_rel_err(dx, ref_dx), dw_rel_err=_rel_err(dw, ref_dw))
      except Exception as e:  # noqa: BLE001 - a failing impl is reported, the others still run
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
      if impl == "bf16":
        base = row
      for key in ("fwd_ms", "fwdbwd_ms"):
        if key in row and key in base:
          row[key.replace("_ms", "_speedup_vs_bf16")] = base[key] / row[key]
      rows.append(row)
  return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
          "jax": jax.__version__, "dtype": jnp.dtype(dtype).name, "repeats": repeats,
          "tiles": {i: (t._asdict() if t else "default" if i == "mosaic_gpu" else fp8.KERNELS[i].Tiles()._asdict())
                    # mosaic_gpu's default: default_tiles(K, block)
                    for i in impls if i in fp8.KERNELS for t in [(tiles or {}).get(i)]},
          "reference": reference, "results": rows}


def tune(impl: str = "mosaic_gpu", shape=V3_SHAPES[0], candidates=None, repeats: int = 10,
         block: int = 128, b_blocked: bool = True) -> list[dict]:
  """One kernel alone (operands quantised beforehand: the forward GEMM, whose b is a weight, so the Mosaic GPU
  kernel may take its scales per tile unless b_blocked is False) per tile config, fastest first; a config that
  fails to compile (e.g. shared memory) is listed with its error."""
  M, K, N = shape
  x, w, _ = _operands(shape, jnp.bfloat16)
  xq, xs = fp8.quantize_act(x, block)
  wq, ws = fp8.quantize_weight(w, block)
  wtq, wts = fp8.weight_nt(wq, ws, block)
  ref = xla.scaled_matmul_nt(xq, xs, wtq, wts, block=block, out_dtype=jnp.float32)
  rows = []
  for tiles in candidates or TUNE_CANDIDATES[impl]:
    row = dict(tiles._asdict())
    try:
      f = jax.jit(functools.partial(fp8.gemm_nt, block=block, out_dtype=jnp.bfloat16, impl=impl, tiles=tiles,
                                    b_blocked=b_blocked))
      t = median_seconds(f, xq, xs, wtq, wts, repeats=repeats, calls=CALLS)
      row.update(ms=1e3 * t, tflops=2 * M * K * N / t / 1e12, rel_diff_vs_xla=_rel_err(f(xq, xs, wtq, wts), ref))
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
  return sorted(rows, key=lambda r: r.get("ms", float("inf")))


# (M tokens, K): a routed expert's gate/up input in the bench config (32 experts x 2560 capacity rows, dim
# 2048) and the V3 671B dense-up input at 4096 tokens; weights: bench-config gate/up, V3 dense up.
QUANT_ACTS = ((81920, 2048), (4096, 7168))
QUANT_WEIGHTS = ((2048, 2048), (7168, 18432))


def bench_quantize(acts=QUANT_ACTS, weights=QUANT_WEIGHTS, repeats: int = 10, block: int = 128) -> list[dict]:
  """The quantisations one FP8 GEMM's forward and backward need, by XLA (nn/fp8/quantize.py's functions, as many fusions
  as XLA makes) and by the one-pass Triton kernel (kernels/quantize_triton.py): x in 1 x 128 tiles; dy in 1 x 128
  and transposed 128 x 1 tiles; the cached e4m3 x dequantised and requantised transposed (wgrad); a weight in
  128 x 128 tiles, both majors. ms, GB/s of the bytes the op must move (read once, write each output once),
  and whether the kernel's bytes equal XLA's."""
  from r1jax.nn.fp8.kernels import quantize_triton as fq

  def xla_rows_cols(x):
    return (*fp8.quantize_act(x, block), *fp8.quantize_act(x.astype(jnp.float32).T, block))

  def xla_requant(q, s):
    return fp8.quantize_act(fp8.dequantize_act(q, s).T, block)

  def xla_weight(w):
    q, s = fp8.quantize_weight(w, block)
    return q, s, q.T

  cases = []
  for M, K in acts:
    x = jax.random.normal(jax.random.key(0), (M, K), jnp.bfloat16)
    q, s = jax.jit(lambda x: fp8.quantize_act(x, block))(x)
    moved = 2 * M * K  # bf16 in
    cases += [("act_rows", (M, K), (x,), lambda x: fp8.quantize_act(x, block),
               lambda x: fq.quantize_act(x, block), moved + M * K),
              ("act_rows_cols", (M, K), (x,), xla_rows_cols, lambda x: fq.quantize_act(x, block, cols=True),
               moved + 2 * M * K),
              ("requant_cols", (M, K), (q, s), xla_requant,
               lambda q, s: fq.quantize_act(q, block, rows=False, cols=True, in_scale_MxKb=s), 2 * M * K)]
  for K, N in weights:
    w = jax.random.normal(jax.random.key(1), (K, N), jnp.bfloat16)
    cases.append(("weight_nt", (K, N), (w,), xla_weight, lambda w: fq.quantize_weight(w, block), 4 * K * N))
  rows = []
  for name, shape, args, xla_fn, kernel_fn, nbytes in cases:
    row = {"op": name, "shape": list(shape), "bytes": nbytes}
    for impl, fn in (("xla", xla_fn), ("triton", kernel_fn)):
      try:
        f = jax.jit(fn)
        t = median_seconds(f, *args, repeats=repeats, calls=CALLS)
        row.update({f"{impl}_ms": 1e3 * t, f"{impl}_GBps": nbytes / t / 1e9})
      except Exception as e:  # noqa: BLE001 - reported beside the other measurements
        row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if "xla_ms" in row and "triton_ms" in row:
      got, want = jax.jit(kernel_fn)(*args), jax.jit(xla_fn)(*args)
      row["speedup"] = row["xla_ms"] / row["triton_ms"]
      row["bitwise_equal"] = all(
          bool(jnp.array_equal(jax.lax.bitcast_convert_type(a, jnp.uint8) if a.dtype == fp8.E4M3 else a,
                               jax.lax.bitcast_convert_type(b, jnp.uint8) if b.dtype == fp8.E4M3 else b))
          for a, b in zip(got, want))
    rows.append(row)
  return rows
