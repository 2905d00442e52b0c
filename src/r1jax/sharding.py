"""One mesh (data, fsdp, expert, tensor) and ONE table from logical axis names to mesh axes."""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from r1jax.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axis (or axes). Weights and activations name their dimensions; only this table
# says where those dimensions live. Outside MoE layers the expert axis also shards the batch.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "act_exp": "expert",  # expert-major buffers inside the MoE dispatch
    # weights
    "layers": None,  # the scan axis of stacked identical layers
    "vocab": "tensor",
    "embed": "fsdp",
    "q_lora": None,
    "kv_lora": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "exp": "expert",
    "exp_mlp": "tensor",
    "norm": None,
}


def spec(*names: str | None) -> P:
  """PartitionSpec for a tensor whose dimensions carry these logical names (None: replicated)."""
  for name in names:
    if name is not None and name not in RULES:
      raise KeyError(f"logical axis {name!r} is not in sharding.RULES")
  return P(*(None if name is None else RULES[name] for name in names))


def named(mesh: jax.sharding.Mesh, names: tuple) -> NamedSharding:
  return NamedSharding(mesh, spec(*names))


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Constrain an activation's layout by logical names, against the mesh set with `jax.set_mesh`.

  With no mesh in context (plain eager use in a notebook) there is nothing to constrain against.
  """
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec(*names))


def axis_sizes(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
  """Resolve -1 to "the rest of the devices"; fail with one line if the product is wrong."""
  sizes = dataclasses.asdict(cfg)
  known = math.prod(s for s in sizes.values() if s != -1)
  for name, size in sizes.items():
    if size == -1:
      if n_devices % known:
        raise ConfigError(f"mesh.{name}=-1: the other axes ({known} devices) do not divide {n_devices} devices")
      sizes[name] = n_devices // known
  if math.prod(sizes.values()) != n_devices:
    desc = ", ".join(f"{k}={v}" for k, v in sizes.items())
    raise ConfigError(f"mesh {desc}: the axis product {math.prod(sizes.values())} != {n_devices} devices")
  return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """A mesh over all (global) devices with axes AXES; Auto axes so `constrain` guides GSPMD."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = axis_sizes(cfg, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def batch_size_multiple(mesh: jax.sharding.Mesh) -> int:
  """The batch must divide evenly over the mesh axes that shard it."""
  axes = RULES["batch"]
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
