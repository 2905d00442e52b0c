"""Helpers the Pallas kernels and FP8 custom_vjps share: zero-padding rows to whole tiles, the grouped program
order of a tile grid, and the manual-axis types a pallas_call's operands and output, and a custom_vjp's
cotangents, must declare inside shard_map."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_rows(x, multiple: int):
  """Zero rows up to a multiple of `multiple` (zeros change no amax and add nothing to a product)."""
  pad = -x.shape[0] % multiple
  return x if pad == 0 else jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))


def grouped_tile(p, n_m: int, n_n: int, group_m: int):
  """(row tile, column tile) of a Pallas kernel's program p over an n_m x n_n grid: column-major within groups
  of `group_m` row tiles, so that their column panels of the second operand stay in L2 (Triton's ordering)."""
  per_group = group_m * n_n
  first_m = (p // per_group) * group_m
  size = jnp.minimum(n_m - first_m, group_m)
  return first_m + (p % per_group) % size, (p % per_group) // size


def varying(x) -> frozenset:
  """The manual mesh axes x varies over inside shard_map (empty outside); `.mat.varying` in JAX 0.10."""
  t = jax.typeof(x)
  return frozenset(getattr(t, "vma", None) or getattr(getattr(t, "mat", None), "varying", ()))


def same_varying(*xs):
  """Inside shard_map (check_vma) a pallas_call's operands and output must declare how they vary over the
  manual axes: a weight replicated over the batch axes is cast to vary like the activations."""
  union = frozenset().union(*map(varying, xs))
  return [jax.lax.pcast(x, tuple(sorted(union - varying(x))), to="varying") if union - varying(x) else x
          for x in xs]


def manual_type(x) -> dict:
  """The output's manual-axis type: that of the (cast) operands; nothing outside shard_map."""
  mat = getattr(jax.typeof(x), "mat", None)
  return {"manual_axis_type": mat} if varying(x) and mat is not None else {}


def varying_like(y, x):
  """y cast to vary over x's manual axes: a kernel whose launcher drops the manual-axis type of its output
  (plgpu.kernel traces with check_vma off) still computes a per-device value from per-device operands."""
  extra = tuple(sorted(varying(x) - varying(y)))
  return jax.lax.pcast(y, extra, to="varying") if extra else y


def sum_to(g, like):
  """A custom_vjp must return each cotangent with its primal's type: inside shard_map a weight replicated
  over some manual axes gets its gradient summed over them (what the transpose of the implicit pvary does)."""
  extra = tuple(sorted(varying(g) - varying(like)))
  return jax.lax.psum(g, extra) if extra else g
