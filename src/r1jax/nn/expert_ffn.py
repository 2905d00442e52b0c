"""The routed experts' SwiGLU over the rows expert parallelism hands them (expert_parallel.dispatch_combine
takes it as an ExpertFFN): batched einsums over capacity-padded rows (the fast GPU GEMM) or ragged_dot over
the valid rows only (TPU), in the compute dtype or as DeepSeek's FP8 GEMMs (nn/fp8/experts.py)."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from r1jax.config import ComputeConfig
from r1jax.nn import fp8


class ExpertFFN(NamedTuple):
  """`apply(experts, x_ExNxD, sent, valid_ExN) -> y_ExNxD` over this device's experts' received rows (valid_ExN
  marks real ones); `send(x_Tp1xD)`: rows [T + 1, ...] (a tuple of arrays) that each token and the empty-slot
  row send besides x, arriving as `sent` [E, N, ...] (FP8 dispatch sends e4m3 words and scales)."""

  apply: Callable
  send: Callable = lambda x_Tp1xD: ()


def gemm_impl(compute: ComputeConfig) -> str:
  """The expert-GEMM choice: ragged_dot suits TPU; on one H100 it ran at 7 TFLOP/s against 647 for the
  padded einsum (measured, JAX 0.11.2), and ran out of memory at V2-Lite sizes."""
  if compute.expert_gemm != "auto":
    return compute.expert_gemm
  return "ragged_dot" if jax.default_backend() == "tpu" else "einsum"


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


def choose(compute: ComputeConfig, experts: dict) -> ExpertFFN:
  """The routed experts' FFN for these settings and these (one layer's, this device's) expert weights."""
  fp8_cfg = compute.fp8.use("routed_experts")
  if gemm_impl(compute) == "ragged_dot":
    one = grouped if fp8_cfg is None else functools.partial(fp8.experts.grouped, fp8_cfg=fp8_cfg)
    return ExpertFFN(lambda e, x, _, valid: compact(functools.partial(one, e), x, valid))
  if fp8_cfg is None:
    return ExpertFFN(lambda e, x, _, valid: padded(e, x))
  if fp8.weights.is_quantized(experts["w_gate"]):  # keep_fp8 bytes: the GEMMs read them, x goes as it is
    return ExpertFFN(lambda e, x, _, valid: fp8.experts.padded(e, x, fp8_cfg))
  return ExpertFFN(lambda e, x, sent, valid: fp8.experts.padded_dispatched(e, x, sent, fp8_cfg),
                   send=lambda x_Tp1xD: fp8.experts.dispatch_rows(x_Tp1xD, fp8_cfg))
