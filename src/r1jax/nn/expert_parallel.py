"""Expert parallelism: fixed-capacity all-to-all dispatch (GShard, arXiv 2006.16668 §2.2; the V3 report
§3.2.2 all-to-all) run by each shard inside `shard_map`. Tokens stay sharded over the batch axes and
experts over `expert`: a shard sorts its (token, slot) pairs by expert into an [E, C, D] buffer (first
come first served in token-slot order, C rows per expert), one all-to-all hands every device the rows of
its local experts from all peers, the expert GEMMs run, and a second all-to-all brings the rows home
for the weighted combine. Pairs beyond capacity are dropped and counted."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax.config import FP8Config, ModelConfig
from r1jax.nn import fp8 as fp8_lib
from r1jax.nn import fp8_ragged, fp8_weights
from r1jax.sharding import mesh_axes


class Plan(NamedTuple):
  slot_TK: jax.Array  # [T*K] buffer row (expert * C + rank) of each (token, slot) pair; E*C if dropped
  token_EC: jax.Array  # [E*C] token feeding each buffer row; T (a zero row) where the row is empty
  kept_E: jax.Array  # [E] rows in use per expert: min(routed count, C)
  dropped_pairs: jax.Array  # int32 number of real (token, slot) pairs that did not fit


def capacity(n_tokens: int, cfg: ModelConfig) -> int:
  """Rows per (source shard, expert): ceil(cf * T * K / E), at most T since a token picks an expert once.

  capacity_factor 0 gives T: dropless whatever the routing.
  """
  if cfg.capacity_factor <= 0:
    return n_tokens
  balanced = cfg.capacity_factor * n_tokens * cfg.n_activated_experts / cfg.n_routed_experts
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


def grouped_ffn(experts: dict, x_NxD, group_sizes_E, fp8: FP8Config | None = None):
  """SwiGLU of each expert over its contiguous rows of x (rows sorted by expert), via ragged_dot, or as
  block-scaled FP8 grouped GEMMs (fp8_ragged)."""
  if fp8 is not None:
    mm = lambda x, w: fp8_ragged.ragged_dot(x, w, group_sizes_E, fp8.block, fp8.pow2_scales)  # noqa: E731
    return mm(jax.nn.silu(mm(x_NxD, experts["w_gate"])) * mm(x_NxD, experts["w_up"]), experts["w_down"])
  dt = x_NxD.dtype
  gate = jax.lax.ragged_dot(x_NxD, experts["w_gate"].astype(dt), group_sizes_E)
  up = jax.lax.ragged_dot(x_NxD, experts["w_up"].astype(dt), group_sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, experts["w_down"].astype(dt), group_sizes_E)


def expert_tiles(experts: dict, fp8: FP8Config) -> dict:
  """The routed experts' FP8 weights (fp8.weight_tiles) for every layer and expert of a stack [..., E, D, F] in
  one pass per weight, for padded_ffn's `fp8_tiles` (FP8Config.quantize_experts_once). [gate | up] is laid out
  [..., D, 2, F] (scales [..., D/b, 2, F/b], N-major [..., 2, F, D]): the joined GEMM's [D, 2F] where F is
  whole on the device, and still split over exp_mlp like the weights where shard_map splits F. One pass over
  both weights in place where they join (on one device, the Triton quantiser's `parts`); under GSPMD
  partitioning (the XLA quantiser: a pallas_call has no partitioning rule) each is quantised where it lies and
  stacked, as a join along F would reshard it."""
  kw = dict(block=fp8.block, impl=fp8.impl, pow2=fp8.pow2_scales)
  w_gate, w_up = experts["w_gate"], experts["w_up"]
  *lead, D, F = w_gate.shape
  b = fp8.block
  if fp8_lib.joins_columns(F, F, block=b):
    t = fp8_lib.weight_tiles((w_gate, w_up), **kw)
    gate_up = fp8_lib.WeightTiles(t.q_KxN.reshape(*lead, D, 2, F), t.s_KbxNb.reshape(*lead, D // b, 2, F // b),
                                  t.q_NxK.reshape(*lead, 2, F, D))
  else:
    g, u = (fp8_lib.weight_tiles((w,), **kw) for w in (w_gate, w_up))
    gate_up = fp8_lib.WeightTiles(jnp.stack([g.q_KxN, u.q_KxN], -2), jnp.stack([g.s_KbxNb, u.s_KbxNb], -2),
                                  jnp.stack([g.q_NxK, u.q_NxK], -3))
  return {"gate_up": gate_up, "down": fp8_lib.weight_tiles((experts["w_down"],), **kw)}


def _joined(tiles: dict, block: int) -> tuple:
  """expert_tiles of this device's experts as batched_swiglu_mlp's w_tiles: [gate | up] as [E, D, 2F]."""
  gu = tiles["gate_up"]
  E, D, _, F = gu.q_KxN.shape
  return (fp8_lib.WeightTiles(gu.q_KxN.reshape(E, D, 2 * F), gu.s_KbxNb.reshape(E, D // block, 2 * F // block),
                              gu.q_NxK.reshape(E, 2 * F, D)), tiles["down"])


def padded_ffn(experts: dict, x_ExNxD, fp8: FP8Config | None = None, x_quantized=None):
  """SwiGLU of each expert over its capacity-padded rows as batched einsums (the fast GPU GEMM), or as
  block-scaled FP8 GEMMs per expert (from stored e4m3 bytes for keep_fp8 experts). `x_quantized`: x's e4m3
  rows and scales as dispatched (fp8.quantize_input), for the master-weight FP8 GEMMs; `experts["fp8_tiles"]`,
  where present, their weights quantised ahead (expert_tiles)."""
  if fp8 is not None:
    kw = dict(block=fp8.block, impl=fp8.impl, pow2=fp8.pow2_scales)
    w_gate, w_up, w_down = experts["w_gate"], experts["w_up"], experts["w_down"]
    kept = any(map(fp8_weights.is_quantized, (w_gate, w_up, w_down)))
    tiles = experts.get("fp8_tiles")
    if not kept and fp8_lib.joins_columns(w_gate.shape[-1], w_up.shape[-1], block=fp8.block):
      # One GEMM over [gate | up] columns (x quantised once, one launch twice as wide), the SwiGLU fused into the
      # down GEMM's input quantisation (fp8.swiglu_mlp; layers.mlp does the same).
      return fp8_lib.batched_swiglu_mlp(x_ExNxD, w_gate, w_up, w_down, x_quantized=x_quantized,
                                        w_tiles=None if tiles is None else _joined(tiles, fp8.block), **kw)
    if tiles is not None:
      raise ValueError(f"expert_parallel.padded_ffn: expert weight tiles given, but gate and up {w_gate.shape} do "
                       "not join here (F must be whole blocks on the device)")

    def mm(x, w, xq=None):  # a keep_fp8 weight runs its forward GEMM from the stored bytes
      if fp8_weights.is_quantized(w):
        return jax.vmap(lambda x, w: fp8_weights.dot(x, w, fp8.block, fp8.impl, fp8.pow2_scales))(x, w)
      return fp8_lib.batched_dot(x, w, x_quantized=xq, **kw)

    return mm(jax.nn.silu(mm(x_ExNxD, w_gate, x_quantized)) * mm(x_ExNxD, w_up, x_quantized), w_down)
  dt = x_ExNxD.dtype
  gate = jnp.einsum("end,edf->enf", x_ExNxD, experts["w_gate"].astype(dt))
  up = jnp.einsum("end,edf->enf", x_ExNxD, experts["w_up"].astype(dt))
  return jnp.einsum("enf,efd->end", jax.nn.silu(gate) * up, experts["w_down"].astype(dt))


def compact_ffn(experts: dict, x_ExNxD, valid_ExN, fp8: FP8Config | None = None):
  """The padded rows' SwiGLU computed on valid rows only: pack them per expert, ragged_dot, unpack."""
  E, N, D = x_ExNxD.shape
  key = jnp.where(valid_ExN, jnp.arange(E, dtype=jnp.int32)[:, None], E).reshape(E * N)
  order = jnp.argsort(key, stable=True)  # valid rows grouped by expert first, padding last
  y_sorted = grouped_ffn(experts, jnp.take(x_ExNxD.reshape(E * N, D), order, axis=0),
                         valid_ExN.sum(1).astype(jnp.int32), fp8)
  y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
  return jnp.where(valid_ExN.reshape(E * N, 1), y, 0).reshape(E, N, D)


def gemm_impl(cfg: ModelConfig) -> str:
  """The expert-GEMM choice: ragged_dot suits TPU; on one H100 it ran at 7 TFLOP/s against 647 for the
  padded einsum (measured, JAX 0.11.2), and ran out of memory at V2-Lite sizes."""
  if cfg.expert_gemm != "auto":
    return cfg.expert_gemm
  return "ragged_dot" if jax.default_backend() == "tpu" else "einsum"


def _exchange(x, axes: tuple[str, ...]):
  """All-to-all on the leading axis over the expert axes: chunk i goes to peer i, received in peer order."""
  return jax.lax.all_to_all(x, axes, 0, 0, tiled=True) if axes else x


def _words(q):
  """e4m3 rows [..., D] as uint32 words [..., D / 4] and back (D is whole blocks of >= 16): a gather or collective
  then moves 4-byte elements (XLA's GPU gather of single bytes ran at the speed of the bf16 one on an H200), and
  collectives need not take fp8 types on every backend."""
  if q.dtype == jnp.uint32:
    return jax.lax.bitcast_convert_type(q, fp8_lib.E4M3).reshape(*q.shape[:-1], -1)
  return jax.lax.bitcast_convert_type(q.reshape(*q.shape[:-1], -1, 4), jnp.uint32)


def _dispatch(rows_Tp1, token_EC, E_loc: int, exp_axes: tuple[str, ...]):
  """Rows [T + 1, ...] (the last one fills empty slots) into this device's [E_loc, n_ep * C, ...] buffers."""
  n_ep = math.prod(jax.lax.axis_size(a) for a in exp_axes)
  send = jnp.take(rows_Tp1, token_EC, axis=0)
  recv = _exchange(send, exp_axes).reshape(n_ep, E_loc, -1, *send.shape[1:])  # [source peer, local expert, ...]
  return jnp.swapaxes(recv, 0, 1).reshape(E_loc, -1, *send.shape[1:])


def dispatch_combine(experts: dict, x_TxD, weights_TxK, experts_TxK, valid_T, cfg: ModelConfig,
                     exp_axes: tuple[str, ...]):
  """One shard's routed-expert output (partial over the tensor axis when F is split) and its drop count.

  Runs inside shard_map with `exp_axes` the expert mesh axes, `experts` holding this device's E/n_ep
  experts; with no axes it is the same computation on one device. Invalid (padding) tokens take no rows.
  """
  T, D = x_TxD.shape
  E = cfg.n_routed_experts
  n_ep = math.prod(jax.lax.axis_size(a) for a in exp_axes)
  E_loc, C = E // n_ep, capacity(T, cfg)
  pl = plan(experts_TxK, E, C, valid_T)
  x_pad = jnp.concatenate([x_TxD, jnp.zeros((1, D), x_TxD.dtype)])
  x_ExNxD = _dispatch(x_pad, pl.token_EC, E_loc, exp_axes)
  fp8 = cfg.fp8.use("routed_experts")
  if gemm_impl(cfg) == "ragged_dot":
    kept_SxE = _exchange(pl.kept_E, exp_axes).reshape(n_ep, E_loc)
    valid = jnp.arange(C)[None, None, :] < kept_SxE.T[:, :, None]
    y_ExNxD = compact_ffn(experts, x_ExNxD, valid.reshape(E_loc, n_ep * C), fp8)
  elif fp8 is not None and not fp8_weights.is_quantized(experts["w_gate"]):
    # FP8 dispatch (V3 report §3.3.3): tokens quantised once, before the gather (1 x block tiles are per row, so
    # this is exactly the quantisation of the gathered rows) and moved as e4m3 bytes and scales; the bf16
    # x_ExNxD only carries the gradient back through the dispatch, so XLA drops its forward gather.
    xq_pad, xs_pad = fp8_lib.quantize_input(x_pad, fp8.block, fp8.impl, fp8.pow2_scales)
    x_quantized = (_words(_dispatch(_words(xq_pad), pl.token_EC, E_loc, exp_axes)),
                   _dispatch(xs_pad, pl.token_EC, E_loc, exp_axes))
    y_ExNxD = padded_ffn(experts, x_ExNxD, fp8, x_quantized)
  else:
    y_ExNxD = padded_ffn(experts, x_ExNxD, fp8)
  back = y_ExNxD.reshape(E_loc, n_ep, C, D).transpose(1, 0, 2, 3).reshape(E, C, D)
  y_ECxD = _exchange(back, exp_axes).reshape(E * C, D)
  y_pad = jnp.concatenate([y_ECxD, jnp.zeros((1, D), y_ECxD.dtype)])
  y_TxKxD = jnp.take(y_pad, pl.slot_TK, axis=0).reshape(T, -1, D)
  y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD.astype(jnp.float32), weights_TxK)
  return y_TxD.astype(x_TxD.dtype), pl.dropped_pairs


def _p(*names):
  """PartitionSpec over mesh axes for shard_map, from logical names (None: whole dim on every device)."""
  return P(*(None if n is None else (mesh_axes(n) or None) for n in names))


class Axes(NamedTuple):
  """Mesh axes the MoE layer reduces over: all empty when it runs on one device outside shard_map."""

  batch: tuple[str, ...] = ()  # shard the tokens
  exp: tuple[str, ...] = ()  # shard the experts (the all-to-all group)
  exp_mlp: tuple[str, ...] = ()  # split each expert's FFN width

  @classmethod
  def from_rules(cls) -> Axes:
    return cls(mesh_axes("batch"), mesh_axes("exp"), mesh_axes("exp_mlp"))


def specs(router: dict, replay: bool, tiles: bool = False):
  """in/out specs of the MoE shard_map over (router, experts, x, token mask, sequence ids[, replayed experts]).

  Expert weights arrive split by expert and (F) by tensor; their fsdp-split embed dim is all-gathered on
  entry (FSDP), as are their e4m3 tiles with `tiles` (expert_tiles: then FSDP gathers a byte per weight and
  major). The router is small and replicated; per-token inputs and outputs are split over the batch.
  """
  x, per_token = _p("batch", None, None), _p("batch", None)
  experts = {"w_gate": _p("exp", None, "exp_mlp"), "w_up": _p("exp", None, "exp_mlp"),
             "w_down": _p("exp", "exp_mlp", None)}
  if tiles:
    gate_up = _p("exp", None, None, "exp_mlp")
    experts["fp8_tiles"] = {"gate_up": fp8_lib.WeightTiles(gate_up, gate_up, _p("exp", None, "exp_mlp", None)),
                            "down": fp8_lib.WeightTiles(experts["w_down"], experts["w_down"],
                                                        _p("exp", None, "exp_mlp"))}
  in_specs = (jax.tree.map(lambda _: P(), router), experts, x, per_token, per_token) + ((x,) if replay else ())
  stats = {"load": P(), "aux_loss": P(), "dropped_pairs": P(), "replay_differs": P(), "experts": x}
  return in_specs, (x, stats)


def sum_over(x, axes: tuple[str, ...]):
  """psum over mesh axes (no-op for none)."""
  return jax.lax.psum(x, axes) if axes else x
