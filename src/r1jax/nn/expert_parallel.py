"""Expert parallelism: fixed-capacity all-to-all dispatch (GShard, arXiv 2006.16668 §2.2; the V3 report
§3.2.2 all-to-all) run by each shard inside `shard_map`. Tokens stay sharded over the batch axes and
experts over `expert`: a shard sorts its (token, slot) pairs by expert into an [E, C, D] buffer (first
come first served in token-slot order, C rows per expert), one all-to-all hands every device the rows of
its local experts from all peers, the expert GEMMs run, and a second all-to-all brings the rows home
for the weighted combine. Pairs beyond capacity are dropped and counted. An expert FFN that runs on sorted rows
(grouped_gemm) skips the buffers where one shard holds every expert: nothing is dropped there."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax.config import ModelConfig
from r1jax.nn import grouped_gemm
from r1jax.sharding import mesh_axes


class Plan(NamedTuple):
  slot_TK: jax.Array  # [T*K] buffer row (expert * C + rank) of each (token, slot) pair; E*C if dropped
  token_EC: jax.Array  # [E*C] token feeding each buffer row; T (a zero row) where the row is empty
  kept_E: jax.Array  # [E] rows in use per expert: min(routed count, C)
  dropped_pairs: jax.Array  # int32 number of real (token, slot) pairs that did not fit


def capacity(n_tokens: int, cfg: ModelConfig, capacity_factor: float) -> int:
  """Rows per (source shard, expert): ceil(cf * T * K / E), at most T since a token picks an expert once.

  capacity_factor 0 gives T: dropless whatever the routing.
  """
  if capacity_factor <= 0:
    return n_tokens
  balanced = capacity_factor * n_tokens * cfg.n_activated_experts / cfg.n_routed_experts
  return max(1, min(n_tokens, math.ceil(balanced)))


def plan(experts_TxK, n_experts: int, C: int, valid_T=None) -> Plan:
  """Stable sort of the T*K pairs by expert; a pair's rank within its expert is its row if below C.

  Pairs of invalid tokens (padding, `valid_T` False) sort after every expert: they take no row and are not
  counted as dropped.
  """
  T, K = experts_TxK.shape
  flat = experts_TxK.reshape(T * K)
  if valid_T is not None:
    flat = jnp.where(jnp.repeat(valid_T, K), flat, n_experts)
  order = jnp.argsort(flat, stable=True)
  counts_E = jnp.bincount(flat, length=n_experts + 1)  # the last bucket holds the padding's pairs
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank_sorted = jnp.arange(T * K, dtype=jnp.int32) - starts_E[flat[order]].astype(jnp.int32)
  rank = jnp.zeros(T * K, jnp.int32).at[order].set(rank_sorted)
  keep = (rank < C) & (flat < n_experts)
  slot = jnp.where(keep, flat * C + rank, n_experts * C)
  token_of_pair = jnp.arange(T * K, dtype=jnp.int32) // K
  token_EC = jnp.full(n_experts * C + 1, T, jnp.int32).at[slot].set(token_of_pair)[:-1]
  dropped = (counts_E[:n_experts].sum() - keep.sum()).astype(jnp.int32)
  return Plan(slot, token_EC, jnp.minimum(counts_E[:n_experts], C).astype(jnp.int32), dropped)


def exchange(x, axes: tuple[str, ...]):
  """All-to-all on the leading axis over the expert axes: chunk i goes to peer i, received in peer order."""
  return jax.lax.all_to_all(x, axes, 0, 0, tiled=True) if axes else x


def _dispatch(rows_Tp1, token_EC, E_loc: int, exp_axes: tuple[str, ...]):
  """Rows [T + 1, ...] (the last one fills empty slots) into this device's [E_loc, n_ep * C, ...] buffers."""
  n_ep = math.prod(jax.lax.axis_size(a) for a in exp_axes)
  send = jnp.take(rows_Tp1, token_EC, axis=0)
  recv = exchange(send, exp_axes).reshape(n_ep, E_loc, -1, *send.shape[1:])  # [source peer, local expert, ...]
  return jnp.swapaxes(recv, 0, 1).reshape(E_loc, -1, *send.shape[1:])


def dispatch_combine(experts: dict, x_TxD, weights_TxK, experts_TxK, valid_T, cfg: ModelConfig,
                     capacity_factor: float, exp_axes: tuple[str, ...], ffn):
  """One shard's routed-expert output (partial over the tensor axis when F is split) and its drop count.

  Runs inside shard_map with `exp_axes` the expert mesh axes, `experts` holding this device's E/n_ep
  experts; with no axes it is the same computation on one device. Invalid (padding) tokens take no rows.
  `ffn` (an expert_ffn.ExpertFFN) is what the experts compute on their rows and what else a token sends.
  """
  T, D = x_TxD.shape
  E = cfg.n_routed_experts
  n_ep = math.prod(jax.lax.axis_size(a) for a in exp_axes)
  if n_ep == 1 and ffn.sorted is not None:  # every expert here: sort the pairs, no capacity buffers, no drops
    return _sorted_combine(experts, x_TxD, weights_TxK, experts_TxK, valid_T, E, ffn.sorted)
  E_loc, C = E // n_ep, capacity(T, cfg, capacity_factor)
  pl = plan(experts_TxK, E, C, valid_T)
  x_pad = jnp.concatenate([x_TxD, jnp.zeros((1, D), x_TxD.dtype)])  # row T fills the empty slots
  x_ExNxD = _dispatch(x_pad, pl.token_EC, E_loc, exp_axes)
  sent = tuple(_dispatch(rows, pl.token_EC, E_loc, exp_axes) for rows in ffn.send(x_pad))
  kept_SxE = exchange(pl.kept_E, exp_axes).reshape(n_ep, E_loc)  # rows each source filled per local expert
  valid_ExN = (jnp.arange(C)[None, None, :] < kept_SxE.T[:, :, None]).reshape(E_loc, n_ep * C)
  y_ExNxD = ffn.apply(experts, x_ExNxD, sent, valid_ExN)
  back = y_ExNxD.reshape(E_loc, n_ep, C, D).transpose(1, 0, 2, 3).reshape(E, C, D)
  y_ECxD = exchange(back, exp_axes).reshape(E * C, D)
  y_pad = jnp.concatenate([y_ECxD, jnp.zeros((1, D), y_ECxD.dtype)])
  y_TxKxD = jnp.take(y_pad, pl.slot_TK, axis=0).reshape(T, -1, D)
  y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD.astype(jnp.float32), weights_TxK)
  return y_TxD.astype(x_TxD.dtype), pl.dropped_pairs


def _sorted_combine(experts: dict, x_TxD, weights_TxK, experts_TxK, valid_T, E: int, sorted_fn):
  """Dropless on a shard that holds every expert: the pairs' rows sorted by expert (grouped_gemm.layout), the
  expert FFN over them, each pair's row weighted and summed per token."""
  T, K = experts_TxK.shape
  lay = grouped_gemm.layout(experts_TxK, valid_T, E, grouped_gemm.row_tile(T * K, E))
  y_RxD = sorted_fn(experts, grouped_gemm.gather_rows(x_TxD, lay), lay)
  y_TxKxD = grouped_gemm.pair_rows(y_RxD, lay).reshape(T, K, -1)
  y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD.astype(jnp.float32), weights_TxK)
  return y_TxD.astype(x_TxD.dtype), jnp.zeros((), jnp.int32)


def spec(*names):
  """PartitionSpec over mesh axes for shard_map, from logical names (None: whole dim on every device)."""
  return P(*(None if n is None else (mesh_axes(n) or None) for n in names))


class Axes(NamedTuple):
  """Mesh axes the MoE layer reduces over: all empty when it runs on one device outside shard_map."""

  batch: tuple[str, ...] = ()  # shard the tokens by row
  exp: tuple[str, ...] = ()  # shard the experts (the all-to-all group)
  exp_mlp: tuple[str, ...] = ()  # split each expert's FFN width
  seq: tuple[str, ...] = ()  # shard the tokens along each sequence (context parallelism)

  @classmethod
  def from_rules(cls, split_seq: bool = False) -> Axes:
    return cls(mesh_axes("batch"), mesh_axes("exp"), mesh_axes("exp_mlp"), mesh_axes("seq") if split_seq else ())

  @property
  def tokens(self) -> tuple[str, ...]:
    """Every axis that splits the tokens: what token statistics are summed over."""
    return self.batch + self.seq


def specs(router: dict, replay: bool, expert_extras: dict | None = None, split_seq: bool = False):
  """in/out specs of the MoE shard_map over (router, experts, x, token mask, sequence ids[, replayed experts]).

  Expert weights arrive split by expert and (F) by tensor; their fsdp-split embed dim is all-gathered on
  entry (FSDP), as are `expert_extras` (the specs of whatever else the experts dict holds, such as weights
  quantised ahead). The router is small and replicated; per-token inputs and outputs are split over the batch,
  and with `split_seq` along the sequence too (context parallelism: a context shard's tokens route like
  another batch shard's).
  """
  seq = "seq" if split_seq else None
  x, per_token = spec("batch", seq, None), spec("batch", seq)
  experts = {"w_gate": spec("exp", None, "exp_mlp"), "w_up": spec("exp", None, "exp_mlp"),
             "w_down": spec("exp", "exp_mlp", None), **(expert_extras or {})}
  in_specs = (jax.tree.map(lambda _: P(), router), experts, x, per_token, per_token) + ((x,) if replay else ())
  stats = {"load": P(), "aux_loss": P(), "dropped_pairs": P(), "replay_differs": P(), "experts": x}
  return in_specs, (x, stats)


def sum_over(x, axes: tuple[str, ...]):
  """psum over mesh axes (no-op for none)."""
  return jax.lax.psum(x, axes) if axes else x
