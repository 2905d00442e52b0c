"""The routed experts' SwiGLU over the rows expert parallelism hands them (expert_parallel.dispatch_combine
takes it as an ExpertFFN): batched einsums over capacity-padded rows, ragged_dot over the valid rows only (TPU),
in the compute dtype or as DeepSeek's FP8 GEMMs (nn/fp8/experts.py); or, dropless, one grouped GEMM over rows
sorted by expert (nn/grouped_gemm.py), which on one expert shard needs no capacity buffers at all."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from r1jax.config import ComputeConfig, ConfigError
from r1jax.nn import fp8, grouped_gemm


class ExpertFFN(NamedTuple):
  """`apply(experts, x_ExNxD, sent, valid_ExN) -> y_ExNxD` over this device's experts' received rows (valid_ExN
  marks real ones); `send(x_Tp1xD)`: rows [T + 1, ...] (a tuple of arrays) that each token and the empty-slot
  row send besides x, arriving as `sent` [E, N, ...] (FP8 dispatch sends e4m3 words and scales).
  `sorted(experts, x_RxD, layout) -> y_RxD`, where given, runs on rows sorted by expert (grouped_gemm.layout):
  what a shard holding every expert uses instead of capacity buffers."""

  apply: Callable
  send: Callable = lambda x_Tp1xD: ()
  sorted: Callable | None = None


def gemm_impl(compute: ComputeConfig) -> str:
  """The expert-GEMM choice (compute.expert_gemm). auto: ragged_dot on TPU, the padded einsum elsewhere (on one
  H100 XLA's ragged_dot ran at 7 TFLOP/s against 647 for the padded einsum, JAX 0.11.2). The dropless grouped
  GEMM is asked for by name until its Triton kernels have been measured on a GPU (docs/perf.md, issue 30)."""
  if compute.expert_gemm != "auto":
    return compute.expert_gemm
  return "ragged_dot" if jax.default_backend() == "tpu" else "einsum"


def grouped_kernel(compute: ComputeConfig) -> str:
  """The grouped GEMM's kernel (compute.grouped_kernel): Pallas Triton on a GPU, XLA's ragged_dot elsewhere; an
  explicit triton off a GPU is a one-line error, not another computation."""
  if compute.grouped_kernel == "auto":
    return "triton" if jax.default_backend() == "gpu" else "xla"
  if compute.grouped_kernel == "triton" and jax.default_backend() != "gpu":
    raise ConfigError(f"compute.grouped_kernel=triton runs on a GPU only (backend: {jax.default_backend()}): "
                      "set compute.grouped_kernel=xla or auto")
  return compute.grouped_kernel


def grouped(experts: dict, x_NxD, group_sizes_E):
  """SwiGLU of each expert over its contiguous rows of x (rows sorted by expert), via ragged_dot."""
  dt = x_NxD.dtype
  gate = jax.lax.ragged_dot(x_NxD, experts["w_gate"].astype(dt), group_sizes_E)
  up = jax.lax.ragged_dot(x_NxD, experts["w_up"].astype(dt), group_sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, experts["w_down"].astype(dt), group_sizes_E)


def padded(experts: dict, x_ExNxD):
  """SwiGLU of each expert over its capacity-padded rows as batched einsums."""
  dt = x_ExNxD.dtype
  gate = jnp.einsum("end,edf->enf", x_ExNxD, experts["w_gate"].astype(dt))
  up = jnp.einsum("end,edf->enf", x_ExNxD, experts["w_up"].astype(dt))
  return jnp.einsum("enf,efd->end", jax.nn.silu(gate) * up, experts["w_down"].astype(dt))


def compact(grouped_fn, x_ExNxD, valid_ExN):
  """The padded rows' SwiGLU computed on valid rows only: pack them per expert, `grouped_fn(x_NxD, sizes_E)`,
  unpack."""
  E, N, D = x_ExNxD.shape
  key = jnp.where(valid_ExN, jnp.arange(E, dtype=jnp.int32)[:, None], E).reshape(E * N)
  order = jnp.argsort(key, stable=True)  # valid rows grouped by expert first, padding last
  y_sorted = grouped_fn(jnp.take(x_ExNxD.reshape(E * N, D), order, axis=0), valid_ExN.sum(1).astype(jnp.int32))
  y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
  return jnp.where(valid_ExN.reshape(E * N, 1), y, 0).reshape(E, N, D)


def compact_sorted(sorted_fn, x_ExNxD, valid_ExN):
  """The padded rows' SwiGLU on valid rows only, through the sorted layout: `sorted_fn(x_RxD, layout)`."""
  E, N, D = x_ExNxD.shape
  expert_of_row = jnp.repeat(jnp.arange(E, dtype=jnp.int32), N)[:, None]
  lay = grouped_gemm.layout(expert_of_row, valid_ExN.reshape(E * N), E, grouped_gemm.row_tile(E * N, E))
  y_RxD = sorted_fn(grouped_gemm.gather_rows(x_ExNxD.reshape(E * N, D), lay), lay)
  return grouped_gemm.pair_rows(y_RxD, lay).reshape(E, N, D)


def choose(compute: ComputeConfig, experts: dict) -> ExpertFFN:
  """The routed experts' FFN for these settings and these (one layer's, this device's) expert weights."""
  fp8_cfg = compute.fp8.use("routed_experts")
  if gemm_impl(compute) == "grouped":
    kernel = grouped_kernel(compute)
    if fp8_cfg is None:
      swiglu = lambda e, x_RxD, lay: grouped_gemm.swiglu(e, x_RxD, lay, kernel)  # noqa: E731
    elif kernel == "xla":  # the FP8 recipe's grouped form (fp8/ragged.py) over the layout's padded groups
      swiglu = lambda e, x_RxD, lay: fp8.experts.grouped(e, x_RxD, lay.tiles_E * lay.bm, fp8_cfg)  # noqa: E731
    else:
      raise ConfigError("compute.expert_gemm=grouped has no FP8 Triton kernel yet: set compute.grouped_kernel=xla "
                        "(FP8 through ragged_dot), compute.fp8.routed_experts=false, or compute.expert_gemm=einsum")
    return ExpertFFN(lambda e, x, _, valid: compact_sorted(functools.partial(swiglu, e), x, valid), sorted=swiglu)
  if gemm_impl(compute) == "ragged_dot":
    one = grouped if fp8_cfg is None else functools.partial(fp8.experts.grouped, fp8_cfg=fp8_cfg)
    return ExpertFFN(lambda e, x, _, valid: compact(functools.partial(one, e), x, valid))
  if fp8_cfg is None:
    return ExpertFFN(lambda e, x, _, valid: padded(e, x))
  if fp8.weights.is_quantized(experts["w_gate"]):  # keep_fp8 bytes: the GEMMs read them, x goes as it is
    return ExpertFFN(lambda e, x, _, valid: fp8.experts.padded(e, x, fp8_cfg))
  return ExpertFFN(lambda e, x, sent, valid: fp8.experts.padded_dispatched(e, x, sent, fp8_cfg),
                   send=lambda x_Tp1xD: fp8.experts.dispatch_rows(x_Tp1xD, fp8_cfg))
