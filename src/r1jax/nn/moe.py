"""DeepSeekMoE (V3 report §2.1.2): shared experts plus fine-grained routed experts behind a sigmoid
(or softmax) router with group-limited top-k, a selection-only bias for aux-loss-free balancing,
and a tiny sequence-wise balance loss. The routed experts always run as expert_parallel.dispatch_combine:
inside one `shard_map` on a mesh, the same function on one device without one. `dropless_reference` is the
independent ragged_dot formulation tests compare against."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from r1jax import sharding
from r1jax.config import ComputeConfig, ModelConfig
from r1jax.nn import expert_ffn, fp8, layers
from r1jax.nn import expert_parallel as ep


class Routing(NamedTuple):
  weights_TxK: jax.Array  # fp32 gate values of the chosen experts (normalised, times route_scale)
  experts_TxK: jax.Array  # int32 chosen expert ids
  scores_TxE: jax.Array  # fp32 affinities s_{i,t} before the bias (V3 eq. 15)
  selected_TxK: jax.Array | None = None  # the router's own choice: experts_TxK unless routing is replayed


class Tokens(NamedTuple):
  """Which positions are real tokens and which sequence each belongs to: router statistics count real
  tokens only (padding takes no expert capacity), and the balance loss is per sequence (packed segment)."""

  mask_BxL: jax.Array  # 1 for real tokens, 0 for padding
  segment_ids_BxL: jax.Array  # packed sequences are contiguous runs of one id within a row

  @classmethod
  def dense(cls, B: int, L: int) -> Tokens:
    return cls(jnp.ones((B, L), jnp.int32), jnp.zeros((B, L), jnp.int32))


def init(key, cfg: ModelConfig, compute: ComputeConfig) -> dict:
  dt, std, E = jnp.dtype(compute.param_dtype), compute.init_std, cfg.n_routed_experts
  k_router, k_shared, k_gate, k_up, k_down = jax.random.split(key, 5)
  F = cfg.moe_inter_dim
  router = {"w": layers.normal(k_router, (cfg.dim, E), ("embed", None), std, jnp.float32)}
  if cfg.has_router_bias:  # selection-only bias, updated from observed load (V3 eq. 16), never by gradients
    router["bias"] = layers.zeros((E,), (None,), jnp.float32)
  p = {
      "router": router,
      "experts": {
          "w_gate": layers.normal(k_gate, (E, cfg.dim, F), ("exp", "embed", "exp_mlp"), std, dt),
          "w_up": layers.normal(k_up, (E, cfg.dim, F), ("exp", "embed", "exp_mlp"), std, dt),
          "w_down": layers.normal(k_down, (E, F, cfg.dim), ("exp", "exp_mlp", "embed"), std, dt),
      },
  }
  if cfg.n_shared_experts:
    p["shared"] = layers.init_mlp(k_shared, cfg.dim, cfg.n_shared_experts * F, std, dt)
  return p


def route(router: dict, x_TxD, cfg: ModelConfig, experts_TxK=None) -> Routing:
  """V3 gate: affinities in fp32, bias added for selection only, top-k within the best groups.

  Routing replay: given `experts_TxK` (e.g. the sampler's choices), those experts are used and only their
  gates are recomputed (differentiably), so two forward passes compute one function. A row with a negative
  id (a token the sampler never fed) is routed freely.
  """
  logits_TxE = x_TxD.astype(jnp.float32) @ router["w"].astype(jnp.float32)
  if cfg.score_func == "sigmoid":
    scores_TxE = jax.nn.sigmoid(logits_TxE)
  else:
    scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  selected_TxK = _select(scores_TxE, router.get("bias"), cfg)
  if experts_TxK is None:
    experts_TxK = selected_TxK
  else:
    experts_TxK = jnp.where((experts_TxK < 0).any(axis=-1, keepdims=True), selected_TxK, experts_TxK)
  weights_TxK = jnp.take_along_axis(scores_TxE, experts_TxK, axis=1)
  if cfg.norm_topk_prob:
    weights_TxK = weights_TxK / (weights_TxK.sum(-1, keepdims=True) + 1e-20)
  return Routing(weights_TxK * cfg.route_scale, experts_TxK.astype(jnp.int32), scores_TxE,
                 selected_TxK.astype(jnp.int32))


def replay_differs(routing: Routing, mask_T):
  """Real tokens whose replayed expert set differs from the router's own choice (V3.2's keep-routing
  watch): how far the learner's router has drifted from the sampler's."""
  if routing.selected_TxK is None:
    return jnp.zeros((), jnp.float32)
  differs_T = (jnp.sort(routing.experts_TxK, -1) != jnp.sort(routing.selected_TxK, -1)).any(-1)
  return (differs_T * mask_T).sum().astype(jnp.float32)


def _select(scores_TxE, bias_E, cfg: ModelConfig):
  """Top-k experts of scores (+ the selection bias) within the n_limited_groups best groups (V3 eq. 12-16)."""
  T, E, G = scores_TxE.shape[0], cfg.n_routed_experts, cfg.n_expert_groups
  select_TxE = jax.lax.stop_gradient(scores_TxE if bias_E is None else scores_TxE + bias_E)
  if G > 1:
    select_TxGxM = select_TxE.reshape(T, G, E // G)
    if cfg.score_func == "sigmoid":  # V3: a group scores the sum of its two best experts
      group_TxG = jax.lax.top_k(select_TxGxM, 2)[0].sum(-1)
    else:  # V2: a group scores its best expert
      group_TxG = select_TxGxM.max(-1)
    top_groups_TxG = jax.lax.top_k(group_TxG, cfg.n_limited_groups)[1]
    keep_TxG = jax.nn.one_hot(top_groups_TxG, G, dtype=jnp.bool_).any(axis=1)
    select_TxE = jnp.where(jnp.repeat(keep_TxG, E // G, axis=1), select_TxE, -jnp.inf)
  return jax.lax.top_k(select_TxE, cfg.n_activated_experts)[1]


def sequence_ids(tokens: Tokens):
  """[B*L] index of each token's sequence, in [0, B*L): a new sequence starts at every row and at every
  change of segment id, so it needs no bound on the ids themselves."""
  seg_BxL = tokens.segment_ids_BxL
  B, L = seg_BxL.shape
  starts_BxL = jnp.concatenate([jnp.ones((B, 1), jnp.int32), (seg_BxL[:, 1:] != seg_BxL[:, :-1]).astype(jnp.int32)],
                               axis=1)
  return (jnp.cumsum(starts_BxL, axis=1) - 1 + L * jnp.arange(B)[:, None]).reshape(B * L)


def sequence_aux_loss(routing: Routing, tokens: Tokens, cfg: ModelConfig, alpha: float, seq_axes=()):
  """Sequence-wise balance loss alpha * sum_i f_i P_i (V3 eq. 17-20) of every sequence (a packed segment,
  real tokens only). Returns (sum over sequences, number of sequences), so shards can be combined exactly.
  With `seq_axes` (inside shard_map, rows split along the sequence) a sequence's sums are completed across the
  shards it spans before the product, and it is counted once, by the shard where it starts."""
  E, K = cfg.n_routed_experts, cfg.n_activated_experts
  T = routing.scores_TxE.shape[0]
  mask_T = tokens.mask_BxL.reshape(T).astype(jnp.float32)
  seq_T = sequence_ids(tokens)
  chosen_TxE = jax.nn.one_hot(routing.experts_TxK, E, dtype=jnp.float32).sum(axis=1) * mask_T[:, None]
  probs_TxE = routing.scores_TxE / routing.scores_TxE.sum(-1, keepdims=True) * mask_T[:, None]
  sums = {"n": jax.ops.segment_sum(mask_T, seq_T, num_segments=T),
          "chosen": jax.ops.segment_sum(chosen_TxE, seq_T, num_segments=T),
          "probs": jax.ops.segment_sum(probs_TxE, seq_T, num_segments=T)}
  home_S = jnp.ones(T, jnp.bool_)
  if seq_axes:
    sums, home_S = _join_split_sequences(sums, tokens.segment_ids_BxL, seq_axes)
  n_S = jnp.maximum(sums["n"], 1.0)[:, None]
  f_SxE, p_SxE = sums["chosen"] * E / (K * n_S), sums["probs"] / n_S
  counted_S = home_S & (sums["n"] > 0)
  return alpha * jnp.where(counted_S, (f_SxE * p_SxE).sum(-1), 0.0).sum(), counted_S.sum().astype(jnp.float32)


def _join_split_sequences(sums: dict, seg_BxL, seq_axes: tuple[str, ...]):
  """Per-sequence sums (indexed as sequence_ids numbers this shard's runs) completed across context shards: a
  row's last run gets the partial sums of the following shards' first runs for as long as the sequence goes
  on (a sequence continues into the next shard when its segment id is that shard's first one), and a row's
  first run is not this shard's to count when it continues the previous shard's last run. Only each row's two
  end runs are exchanged (an all-gather of 2 x (2E + 1) numbers per row), never the tokens."""
  B, L = seg_BxL.shape
  starts_BxL = jnp.concatenate([jnp.ones((B, 1), jnp.bool_), seg_BxL[:, 1:] != seg_BxL[:, :-1]], axis=1)
  runs_B = starts_BxL.sum(1)
  first_B = jnp.arange(B) * L
  last_B = first_B + runs_B - 1
  ends = {k: v[first_B] for k, v in sums.items()}  # this shard's first run of each row: what others may need
  mine = {"first": ends, "seg_first": seg_BxL[:, 0], "seg_last": seg_BxL[:, -1], "runs": runs_B}
  every = jax.tree.map(lambda x: jax.lax.all_gather(x, seq_axes), mine)  # leading axis: the shard
  n_shards = every["runs"].shape[0]
  j = jax.lax.axis_index(seq_axes)
  # continues_CxB[m]: shard m's first run is the same sequence as shard m-1's last run
  continues_CxB = jnp.concatenate([jnp.zeros((1, B), jnp.bool_), every["seg_first"][1:] == every["seg_last"][:-1]])
  added = jax.tree.map(jnp.zeros_like, ends)
  going_B = jnp.ones(B, jnp.bool_)  # the sequence of this shard's last run still runs on at shard m
  for m in range(1, n_shards):
    after = m > j
    take_B = after & going_B & continues_CxB[m]
    added = jax.tree.map(lambda a, x: a + jnp.where(take_B.reshape((B,) + (1,) * (x.ndim - 2)), x[m], 0.0),
                         added, every["first"])
    going_B = jnp.where(after, take_B & (every["runs"][m] == 1), going_B)
  sums = {k: v.at[last_B].add(added[k]) for k, v in sums.items()}
  home_S = jnp.ones(sums["n"].shape[0], jnp.bool_).at[first_B].set(~continues_CxB[j])
  return sums, home_S


def expert_load(experts_TxK, mask_T, n_experts: int):
  """(token, slot) pairs routed to each expert, counting real tokens only."""
  weights = jnp.broadcast_to(mask_T[:, None], experts_TxK.shape).reshape(-1).astype(jnp.float32)
  return jnp.zeros(n_experts, jnp.float32).at[experts_TxK.reshape(-1)].add(weights)


def _routed_shard(router: dict, experts: dict, x_BxLxD, mask_BxL, seg_BxL, replay_BxLxK, cfg: ModelConfig,
                  compute: ComputeConfig, axes: ep.Axes):
  """One shard of the MoE (inside shard_map, or all of it on one device): route its tokens, dispatch,
  combine. Stats are reduced over the axes that split the tokens (batch, and context when sequences are
  split) so every replica sees the global load and updates the same bias."""
  B, L, D = x_BxLxD.shape
  tokens = Tokens(mask_BxL, seg_BxL)
  x_TxD, mask_T = x_BxLxD.reshape(B * L, D), mask_BxL.reshape(B * L)
  replay_TxK = None if replay_BxLxK is None else replay_BxLxK.reshape(B * L, -1)
  routing = route(router, x_TxD, cfg, replay_TxK)
  if expert_ffn.gemm_impl(compute) in ("ragged_dot", "grouped"):  # FP8 grouped GEMMs take master weights: keep_fp8
    # experts of this shard and layer are dequantised here, and they re-create their e4m3 values (the padded form
    # reads them)
    experts = fp8.weights.dequantize_tree(experts, jnp.dtype(compute.param_dtype))
  y_TxD, dropped = ep.dispatch_combine(experts, x_TxD, routing.weights_TxK, routing.experts_TxK, mask_T > 0, cfg,
                                       compute.capacity_factor, axes.exp, expert_ffn.choose(compute, experts))
  y_TxD = ep.sum_over(y_TxD, axes.exp_mlp)  # the expert FFN width may be split over tensor: add the parts
  aux_sum, n_seq = sequence_aux_loss(routing, tokens, cfg, compute.aux_loss_alpha, axes.seq)
  over = axes.tokens
  stats = {"load": ep.sum_over(expert_load(routing.experts_TxK, mask_T, cfg.n_routed_experts), over),
           "aux_loss": ep.sum_over(aux_sum, over) / jnp.maximum(ep.sum_over(n_seq, over), 1.0),
           "dropped_pairs": ep.sum_over(dropped, over),
           "replay_differs": ep.sum_over(replay_differs(routing, mask_T), over),
           "experts": routing.experts_TxK.reshape(B, L, -1)}
  return y_TxD.reshape(B, L, D), stats


def _pad_rows(x, n: int):
  return jnp.pad(x, [(0, n)] + [(0, 0)] * (x.ndim - 1)) if n else x


def with_expert_tiles(p: dict, compute: ComputeConfig) -> dict:
  """An MoE layer's params (any leading stack axes) with its routed experts' FP8 weights quantised ahead into
  p["experts"]["fp8_tiles"] (fp8.experts.stack_tiles), where FP8Config.quantize_experts_once asks and the
  padded FP8 expert GEMMs from master weights will read them; p unchanged otherwise."""
  fp8_cfg, experts = compute.fp8.use("routed_experts"), p["experts"]
  if (fp8_cfg is None or not fp8_cfg.quantize_experts_once or expert_ffn.gemm_impl(compute) != "einsum"
      or any(map(fp8.weights.is_quantized, experts.values()))):
    return p
  return {**p, "experts": {**experts, "fp8_tiles": fp8.experts.stack_tiles(experts, fp8_cfg)}}


def apply(p: dict, x_BxLxD, cfg: ModelConfig, compute: ComputeConfig, tokens: Tokens | None = None,
          replay_BxLxK=None):
  """Returns (y_BxLxD, stats): per-expert load (real (token, slot) pairs), the balance loss, dropped pairs
  and each token's experts [B, L, K]. `replay_BxLxK` routes every token to given experts (routing replay).

  On a mesh, a batch that does not divide over the batch axes is padded with masked rows inside the layer
  (they take no capacity and no statistics), so small sampling batches run the same function as training.
  """
  B, L, D = x_BxLxD.shape
  tokens = Tokens.dense(B, L) if tokens is None else tokens
  args = (p["router"], p["experts"], x_BxLxD, tokens.mask_BxL, tokens.segment_ids_BxL)
  replay = replay_BxLxK is not None
  if replay:
    args += (replay_BxLxK,)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    y_BxLxD, stats = _routed_shard(*args[:5], replay_BxLxK, cfg, compute, ep.Axes())
  else:
    pad = -B % sharding.batch_size_multiple(mesh)
    args = args[:2] + tuple(_pad_rows(a, pad) for a in args[2:])
    tiles = {"fp8_tiles": fp8.experts.tile_specs(ep.spec)} if "fp8_tiles" in p["experts"] else None
    # Context parallelism: a sequence split over `context` routes its shard's tokens there; a length it does not
    # divide (a decode step's one token) is computed whole on every context shard.
    n_ctx = sharding.context_size(mesh)
    split_seq = n_ctx > 1 and L % n_ctx == 0
    in_specs, out_specs = ep.specs(p["router"], replay, tiles, split_seq)

    def shard_fn(r, e, x, m, s, *rep):
      return _routed_shard(r, e, x, m, s, rep[0] if rep else None, cfg, compute, ep.Axes.from_rules(split_seq))

    y_BxLxD, stats = jax.shard_map(shard_fn, in_specs=in_specs, out_specs=out_specs)(*args)
    y_BxLxD, stats["experts"] = y_BxLxD[:B], stats["experts"][:B]
  if "shared" in p:
    y_BxLxD = y_BxLxD + layers.mlp(p["shared"], x_BxLxD, compute.fp8.use("shared_experts"))
  return y_BxLxD, stats


def dropless_reference(p: dict, x_BxLxD, cfg: ModelConfig, compute: ComputeConfig, tokens: Tokens | None = None,
                       replay_BxLxK=None):
  """The same layer written independently: one sort of all (token, slot) pairs and ragged_dot, no capacity.
  For tests and notebooks; `apply` is what models run."""
  B, L, D = x_BxLxD.shape
  tokens = Tokens.dense(B, L) if tokens is None else tokens
  x_TxD, mask_T = x_BxLxD.reshape(B * L, D), tokens.mask_BxL.reshape(B * L)
  routing = route(p["router"], x_TxD, cfg, None if replay_BxLxK is None else replay_BxLxK.reshape(B * L, -1))
  y_BxLxD = routed_experts(p["experts"], x_TxD, routing, cfg).reshape(B, L, D)
  if "shared" in p:
    y_BxLxD = y_BxLxD + layers.mlp(p["shared"], x_BxLxD)
  aux_sum, n_seq = sequence_aux_loss(routing, tokens, cfg, compute.aux_loss_alpha)
  return y_BxLxD, {"load": expert_load(routing.experts_TxK, mask_T, cfg.n_routed_experts),
                   "aux_loss": aux_sum / jnp.maximum(n_seq, 1.0), "dropped_pairs": jnp.zeros((), jnp.int32),
                   "replay_differs": replay_differs(routing, mask_T),
                   "experts": routing.experts_TxK.reshape(B, L, -1)}


def routed_experts(experts: dict, x_TxD, routing: Routing, cfg: ModelConfig):
  """Dropless dispatch: sort (token, slot) pairs by expert, grouped GEMM (ragged_dot), unsort, combine."""
  T, K = routing.experts_TxK.shape
  flat_expert = routing.experts_TxK.reshape(T * K)
  order = jnp.argsort(flat_expert, stable=True)
  x_sorted = jnp.take(x_TxD, order // K, axis=0)
  group_sizes_E = jnp.bincount(flat_expert, length=cfg.n_routed_experts).astype(jnp.int32)
  y_sorted = expert_ffn.grouped(experts, x_sorted, group_sizes_E)
  y_TxKxD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(T, K, -1)
  y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD.astype(jnp.float32), routing.weights_TxK)
  return y_TxD.astype(x_TxD.dtype)


def update_bias(bias_E, load_E, speed: float):
  """Aux-loss-free balancing (V3 eq. 16 and §2.1.2): b_i += gamma * sign(mean load - load_i)."""
  return bias_E + speed * jnp.sign(load_E.mean(-1, keepdims=True) - load_E)
