"""DeepSeekMoE (V3 report §2.1.2): shared experts plus fine-grained routed experts behind a sigmoid
(or softmax) router with group-limited top-k, a selection-only bias for aux-loss-free balancing,
and a tiny sequence-wise balance loss. On a mesh the routed experts run expert-parallel
(expert_parallel.py) inside one `shard_map`; without one, a dropless single-device dispatch is the reference."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from r1jax import sharding
from r1jax.config import ModelConfig
from r1jax.nn import expert_parallel as ep
from r1jax.nn import layers


class Routing(NamedTuple):
  weights_TxK: jax.Array  # fp32 gate values of the chosen experts (normalised, times route_scale)
  experts_TxK: jax.Array  # int32 chosen expert ids
  scores_TxE: jax.Array  # fp32 affinities s_{i,t} before the bias (V3 eq. 15)


def init(key, cfg: ModelConfig) -> dict:
  dt, std, E = jnp.dtype(cfg.param_dtype), cfg.init_std, cfg.n_routed_experts
  k_router, k_shared, k_gate, k_up, k_down = jax.random.split(key, 5)
  F = cfg.moe_inter_dim
  p = {
      "router": {
          "w": layers.normal(k_router, (cfg.dim, E), ("embed", None), std, jnp.float32),
          # Selection-only bias, updated from observed load (V3 eq. 16), never by gradients.
          "bias": layers.zeros((E,), (None,), jnp.float32),
      },
      "experts": {
          "w_gate": layers.normal(k_gate, (E, cfg.dim, F), ("exp", "embed", "exp_mlp"), std, dt),
          "w_up": layers.normal(k_up, (E, cfg.dim, F), ("exp", "embed", "exp_mlp"), std, dt),
          "w_down": layers.normal(k_down, (E, F, cfg.dim), ("exp", "exp_mlp", "embed"), std, dt),
      },
  }
  if cfg.n_shared_experts:
    p["shared"] = layers.init_mlp(k_shared, cfg.dim, cfg.n_shared_experts * F, std, dt)
  return p


def route(router: dict, x_TxD, cfg: ModelConfig) -> Routing:
  """V3 gate: affinities in fp32, bias added for selection only, top-k within the best groups."""
  T, E, G = x_TxD.shape[0], cfg.n_routed_experts, cfg.n_expert_groups
  logits_TxE = x_TxD.astype(jnp.float32) @ router["w"].astype(jnp.float32)
  if cfg.score_func == "sigmoid":
    scores_TxE = jax.nn.sigmoid(logits_TxE)
  else:
    scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  select_TxE = scores_TxE + jax.lax.stop_gradient(router["bias"])
  if G > 1:
    select_TxGxM = select_TxE.reshape(T, G, E // G)
    if cfg.score_func == "sigmoid":  # V3: a group scores the sum of its two best experts
      group_TxG = jax.lax.top_k(select_TxGxM, 2)[0].sum(-1)
    else:  # V2: a group scores its best expert
      group_TxG = select_TxGxM.max(-1)
    top_groups_TxG = jax.lax.top_k(group_TxG, cfg.n_limited_groups)[1]
    keep_TxG = jax.nn.one_hot(top_groups_TxG, G, dtype=jnp.bool_).any(axis=1)
    select_TxE = jnp.where(jnp.repeat(keep_TxG, E // G, axis=1), select_TxE, -jnp.inf)
  experts_TxK = jax.lax.top_k(jax.lax.stop_gradient(select_TxE), cfg.n_activated_experts)[1]
  weights_TxK = jnp.take_along_axis(scores_TxE, experts_TxK, axis=1)
  if cfg.norm_topk_prob:
    weights_TxK = weights_TxK / (weights_TxK.sum(-1, keepdims=True) + 1e-20)
  return Routing(weights_TxK * cfg.route_scale, experts_TxK.astype(jnp.int32), scores_TxE)


def routed_experts(experts: dict, x_TxD, routing: Routing, cfg: ModelConfig):
  """Dropless single-device dispatch: sort (token, slot) pairs by expert, grouped GEMM, unsort, combine.

  Returns (y_TxD, dropped pairs = 0). The reference that the expert-parallel path must match.
  """
  T, K = routing.experts_TxK.shape
  flat_expert = routing.experts_TxK.reshape(T * K)
  order = jnp.argsort(flat_expert, stable=True)
  x_sorted = jnp.take(x_TxD, order // K, axis=0)
  group_sizes_E = jnp.bincount(flat_expert, length=cfg.n_routed_experts).astype(jnp.int32)
  y_sorted = ep.grouped_ffn(experts, x_sorted, group_sizes_E)
  y_TxKxD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(T, K, -1)
  y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD.astype(jnp.float32), routing.weights_TxK)
  return y_TxD.astype(x_TxD.dtype), jnp.zeros((), jnp.int32)


def sequence_aux_loss(scores_BxLxE, experts_BxLxK, cfg: ModelConfig):
  """Sequence-wise balance loss alpha * sum_i f_i P_i (V3 eq. 17-20), averaged over sequences."""
  E, K, L = cfg.n_routed_experts, cfg.n_activated_experts, scores_BxLxE.shape[1]
  chosen_BxLxE = jax.nn.one_hot(experts_BxLxK, E, dtype=jnp.float32).sum(axis=2)
  f_BxE = chosen_BxLxE.sum(axis=1) * E / (K * L)
  p_BxE = (scores_BxLxE / scores_BxLxE.sum(-1, keepdims=True)).mean(axis=1)
  return cfg.aux_loss_alpha * (f_BxE * p_BxE).sum(-1).mean()


def _stats(routing: Routing, B: int, L: int, cfg: ModelConfig) -> dict:
  """This shard's router statistics: per-expert load (pairs routed), balance loss."""
  return {"load": jnp.bincount(routing.experts_TxK.reshape(-1), length=cfg.n_routed_experts).astype(jnp.float32),
          "aux_loss": sequence_aux_loss(routing.scores_TxE.reshape(B, L, -1),
                                        routing.experts_TxK.reshape(B, L, -1), cfg)}


def _routed_shard(router: dict, experts: dict, x_BxLxD, cfg: ModelConfig):
  """One shard of the expert-parallel MoE (inside shard_map): route its own tokens, dispatch, combine.

  Stats are reduced over the batch axes so every replica sees the global load and updates the same bias.
  """
  B, L, D = x_BxLxD.shape
  x_TxD = x_BxLxD.reshape(B * L, D)
  routing = route(router, x_TxD, cfg)
  y_TxD, dropped = ep.dispatch_combine(experts, x_TxD, routing.weights_TxK, routing.experts_TxK, cfg)
  y_TxD = ep.sum_over(y_TxD, "exp_mlp")  # the expert FFN width may be split over tensor: add the parts
  stats = _stats(routing, B, L, cfg)
  stats = {"load": ep.sum_over(stats["load"], "batch"),
           "aux_loss": ep.sum_over(stats["aux_loss"], "batch") / ep.sum_over(1, "batch"),  # mean of equal shards
           "dropped": ep.sum_over(dropped, "batch")}
  return y_TxD.reshape(B, L, D), stats


def _use_expert_parallel(B: int) -> bool:
  """On a mesh, unless the batch does not split over the batch axes (e.g. decoding one prompt)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and B % sharding.batch_size_multiple(mesh) == 0


def apply(p: dict, x_BxLxD, cfg: ModelConfig):
  """Returns (y_BxLxD, stats): stats has per-expert load (pairs routed), aux_loss and dropped pairs."""
  B, L, D = x_BxLxD.shape
  if _use_expert_parallel(B):
    in_specs, out_specs = ep.specs()
    y_BxLxD, stats = jax.shard_map(lambda r, e, x: _routed_shard(r, e, x, cfg), in_specs=in_specs,
                                   out_specs=out_specs)(p["router"], p["experts"], x_BxLxD)
  else:
    x_TxD = x_BxLxD.reshape(B * L, D)
    routing = route(p["router"], x_TxD, cfg)
    y_TxD, dropped = routed_experts(p["experts"], x_TxD, routing, cfg)
    y_BxLxD, stats = y_TxD.reshape(B, L, D), {**_stats(routing, B, L, cfg), "dropped": dropped}
  if "shared" in p:
    y_BxLxD = y_BxLxD + layers.mlp(p["shared"], x_BxLxD)
  return y_BxLxD, stats


def update_bias(bias_E, load_E, speed: float):
  """Aux-loss-free balancing (V3 eq. 16 and §2.1.2): b_i += gamma * sign(mean load - load_i)."""
  return bias_E + speed * jnp.sign(load_E.mean(-1, keepdims=True) - load_E)
