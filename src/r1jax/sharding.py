"""One mesh (data, fsdp, expert, context, tensor) and ONE table from logical axis names to mesh axes.

`context` splits every activation along the sequence (context parallelism for long sequences): attention
all-gathers what it attends to over it (MLA: the small latent, nn/mla.py), the MoE layer treats a context
shard's tokens like another batch shard's (nn/moe.py), and weights are FSDP-sharded over it as over fsdp."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax.config import ComputeConfig, ConfigError, MeshConfig, ModelConfig

AXES = ("data", "fsdp", "expert", "context", "tensor")

# Logical name -> mesh axis (or axes). Weights and activations name their dimensions; only this table
# says where those dimensions live. Outside MoE layers the expert axis is one more data axis: it shards
# the batch, and the non-expert weights are sharded FSDP-style over (fsdp, expert) so they are not
# replicated expert-axis times. A mesh axis already taken by an earlier dimension of the same tensor is
# skipped (expert weights ("exp", "embed", ...) put `expert` on experts and `fsdp` on embed).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": "context",
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # weights
    "layers": None,  # the scan axis of stacked identical layers
    "vocab": "tensor",
    "embed": ("fsdp", "context", "expert"),
    # The latent ranks are small (V3: 1536 and 512): over context too they would not divide a 1024-device mesh.
    "q_lora": ("fsdp", "expert"),
    "kv_lora": ("fsdp", "expert"),
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
  used, dims = set(), []
  for name in names:
    if name is not None and name not in RULES:
      raise KeyError(f"logical axis {name!r} is not in sharding.RULES")
    axes = tuple(a for a in (mesh_axes(name) if name else ()) if a not in used)
    used.update(axes)
    dims.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*dims)


def mesh_axes(name: str) -> tuple[str, ...]:
  """The mesh axes a logical name maps to, as a tuple (empty: replicated)."""
  axes = RULES[name]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def named(mesh: jax.sharding.Mesh, names: tuple) -> NamedSharding:
  return NamedSharding(mesh, spec(*names))


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Constrain an activation's layout by logical names, against the mesh set with `jax.set_mesh`.

  With no mesh in context (plain eager use in a notebook) there is nothing to constrain against. A dimension
  that a name's mesh axes do not divide stays whole (a decode step's one token is not split over `context`;
  every context shard computes it).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, fitted(spec(*names), x.shape, mesh))


def fitted(pspec: P, shape, mesh) -> P:
  """`pspec` with the mesh axes of each dimension that they do not divide dropped."""
  dims = []
  for size, axes in zip(shape, tuple(pspec) + (None,) * (len(shape) - len(pspec))):
    axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    dims.append(axes if axes_t and size % math.prod(mesh.shape[a] for a in axes_t) == 0 else None)
  while dims and dims[-1] is None:  # P(x, None) and P(x) are one layout; one spelling keeps jit caches warm
    dims.pop()
  return P(*dims)


def canonical(tree):
  """Each array's NamedSharding spelled without trailing Nones. jit keys its cache on the spelling, and XLA
  returns P(None, None) where a constraint said P(): arrays that cycle through compiled calls keep one spelling
  so each program compiles once. Moves no data."""
  def one(x):
    s = getattr(x, "sharding", None)
    if not isinstance(s, NamedSharding):
      return x
    dims = list(s.spec)
    while dims and dims[-1] is None:
      dims.pop()
    return x if len(dims) == len(s.spec) else jax.device_put(x, NamedSharding(s.mesh, P(*dims)))

  return jax.tree.map(one, tree)


def context_size(mesh) -> int:
  """How many shards each sequence is split into (1 without context parallelism)."""
  return _size(mesh, "seq")


def axis_sizes(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
  """Resolve -1 to "the rest of the devices"; fail with one line if the product is wrong."""
  sizes = cfg.axes()
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


def split_devices(n_rollout: int, devices=None) -> tuple[list, list]:
  """(learner devices, sampler devices) for asynchronous rollouts: the first n_rollout / process_count devices
  of every process sample and the rest learn, so every process takes part in both sub-meshes (one program
  per process, as multi-controller JAX runs) and a sub-mesh never waits on another host to start."""
  devices = jax.devices() if devices is None else list(devices)
  n_proc = len({d.process_index for d in devices})
  if n_rollout <= 0 or n_rollout % n_proc:
    raise ConfigError(f"mesh.rollout_devices={n_rollout}: must be a positive multiple of the {n_proc} processes")
  per_process = n_rollout // n_proc
  seen: dict[int, int] = {}
  learner, sampler = [], []
  for d in devices:
    i = seen[d.process_index] = seen.get(d.process_index, -1) + 1
    (sampler if i < per_process else learner).append(d)
  if not learner:
    raise ConfigError(f"mesh.rollout_devices={n_rollout}: leaves no device to learn on ({len(devices)} devices)")
  return learner, sampler


def sub_meshes(cfg: MeshConfig, devices=None) -> tuple[jax.sharding.Mesh, jax.sharding.Mesh]:
  """(learner mesh, sampler mesh): the axis sizes of `cfg` resolved over each sub-mesh's own devices."""
  learner, sampler = split_devices(cfg.rollout_devices, devices)
  meshes = []
  for name, devs in (("learner", learner), ("sampler", sampler)):
    try:
      meshes.append(make_mesh(cfg, devs))
    except ConfigError as e:
      raise ConfigError(f"the {name} sub-mesh ({len(devs)} devices, mesh.rollout_devices={cfg.rollout_devices}): "
                        f"{e}") from None
  return meshes[0], meshes[1]


def abstract_mesh(sizes: dict[str, int]) -> jax.sharding.AbstractMesh:
  """A device-less mesh of the given axis sizes (missing axes: 1), for lowering without the hardware."""
  unknown = set(sizes) - set(AXES)
  if unknown:
    raise ConfigError(f"mesh axes {sorted(unknown)} are unknown; known: {list(AXES)}")
  shape = tuple(int(sizes.get(a, 1)) for a in AXES)
  if min(shape) < 1:
    raise ConfigError(f"mesh {dict(zip(AXES, shape))}: abstract mesh axes must be >= 1")
  return jax.sharding.AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _size(mesh, name: str) -> int:
  return math.prod(mesh.shape[a] for a in mesh_axes(name))


def batch_size_multiple(mesh) -> int:
  """The batch must divide evenly over the mesh axes that shard it."""
  return _size(mesh, "batch")


def validate_mesh(cfg: ModelConfig, compute: ComputeConfig, mesh, batch_size: int | None = None,
                  seq_len: int | None = None):
  """Model-vs-mesh checks that must fail with one line before anything is traced or compiled."""
  if seq_len is not None and seq_len % context_size(mesh):
    raise ConfigError(f"train.seq_len={seq_len}: must be a multiple of mesh.context={context_size(mesh)}, the "
                      "shards each sequence is split into")
  n_tensor = mesh.shape["tensor"]
  split = [("n_heads", cfg.n_heads, "heads"), ("vocab_size", cfg.vocab_size, "vocab")]
  if cfg.n_dense_layers:
    split.append(("inter_dim", cfg.inter_dim, "mlp"))
  if cfg.attention == "gqa":
    split.append(("n_kv_heads", cfg.n_kv_heads, "kv_heads"))
  for field, size, name in split:
    if size % _size(mesh, name):
      raise ConfigError(f"mesh.tensor={n_tensor}: the tensor axis must divide model.{field}={size}")
  if cfg.n_moe_layers or cfg.n_mtp:
    n_exp, n_mlp = _size(mesh, "exp"), _size(mesh, "exp_mlp")
    if cfg.n_routed_experts % n_exp:
      raise ConfigError(f"mesh.expert={n_exp}: the expert axis must divide model.n_routed_experts="
                        f"{cfg.n_routed_experts}")
    if cfg.moe_inter_dim % n_mlp:
      raise ConfigError(f"mesh.tensor={n_mlp}: the tensor axis must divide model.moe_inter_dim={cfg.moe_inter_dim}")
    local_f, block = cfg.moe_inter_dim // n_mlp, compute.fp8.block
    if compute.fp8.use("routed_experts") and local_f % block:  # each device's expert GEMMs tile their own columns
      raise ConfigError(f"mesh.tensor={n_mlp}: model.moe_inter_dim={cfg.moe_inter_dim} split over it leaves "
                        f"{local_f} columns per device, not whole compute.fp8.block={block} blocks")
  if batch_size is not None and batch_size % batch_size_multiple(mesh):
    raise ConfigError(f"train.batch_size={batch_size}: must be a multiple of {batch_size_multiple(mesh)}, the "
                      "devices that shard the batch (data*fsdp*expert)")


def global_batch(batch, mesh):
  """Host arrays (the same full batch on every process; a Batch or any pytree) -> global jax.Arrays split over
  "batch".

  Multi-process jit needs global arrays; each process fills only its addressable shards.
  """
  def put(x):
    x = np.asarray(x)
    s = named(mesh, ("batch",) + (None,) * (x.ndim - 1))
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  return jax.tree.map(put, batch)
