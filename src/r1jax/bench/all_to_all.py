"""The MoE exchange measured apart from the layer, against memory.all_to_all's prediction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax import memory, sharding
from r1jax.bench.timing import median_seconds
from r1jax.config import RunConfig
from r1jax.nn import expert_parallel as ep


def bench_all_to_all(cfg: RunConfig, mesh, repeats: int = 20, link_probe_bytes: int = 1 << 26) -> dict:
  """The MoE exchange on `mesh`, measured apart from the layer: one all-to-all of a layer's [E, C, D]
  dispatch buffer per device over the expert axes (expert_parallel's own exchange), timed; the link rate
  from a large all-to-all; and memory.all_to_all's prediction of bytes and time at that rate."""
  sizes = {a: int(mesh.shape[a]) for a in sharding.AXES}
  B, L = cfg.train.batch_size, cfg.train.seq_len
  predicted = memory.all_to_all(cfg.model, cfg.compute, sizes, B, L, link_GBps=1.0)  # bytes; time rescaled below
  n_ep = sizes["expert"]
  E, D = cfg.model.n_routed_experts, cfg.model.dim
  dt = jnp.dtype(cfg.compute.dtype)
  all_axes = tuple(a for a in sharding.AXES if sizes[a] > 1) or None
  exp_axes = ep.Axes.from_rules().exp

  def exchange_seconds(rows: int) -> float:
    split = jax.sharding.NamedSharding(mesh, P(all_axes))
    x = jax.jit(lambda: jnp.zeros((mesh.size * E, rows, D), dt), out_shardings=split)()  # made in place
    fn = jax.jit(jax.shard_map(lambda b: ep.exchange(b, exp_axes), mesh=mesh, in_specs=P(all_axes),
                               out_specs=P(all_axes)))
    return median_seconds(fn, x, repeats=repeats)

  leaves = (n_ep - 1) / n_ep
  layer_s = exchange_seconds(predicted["capacity"])
  probe_rows = max(1, link_probe_bytes // (E * D * dt.itemsize))
  link_GBps = E * probe_rows * D * dt.itemsize * leaves / exchange_seconds(probe_rows) / 1e9 if n_ep > 1 else None
  n_ex = predicted["exchanges_per_layer"] * predicted["moe_layers"]
  out = {"expert_axis": n_ep, "capacity": predicted["capacity"], "bytes_per_exchange": predicted["bytes_per_exchange"],
         "bytes_per_step": predicted["bytes_per_step"], "measured_ms_per_exchange": 1e3 * layer_s,
         "measured_ms_per_step": 1e3 * layer_s * n_ex, "measured_link_GBps": link_GBps}
  if link_GBps:
    out["predicted_ms_per_step"] = 1e3 * predicted["bytes_per_step"] / (link_GBps * 1e9)
  return out

