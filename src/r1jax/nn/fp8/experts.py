"""The routed experts' SwiGLU in DeepSeek's FP8 (V3 report §3.3): tokens quantised once before the dispatch and
moved as e4m3 words with their scales (§3.3.3), per-expert GEMMs over capacity-padded rows from master weights
(their tiles computed once per step for a whole layer stack: `stack_tiles`) or from keep_fp8 bytes, and the
grouped form over rows sorted by expert (ragged.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.config import FP8Config
from r1jax.nn.fp8 import weights
from r1jax.nn.fp8.dot import batched_dot
from r1jax.nn.fp8.gemm import joins_columns
from r1jax.nn.fp8.mlp import batched_swiglu_mlp
from r1jax.nn.fp8.operands import quantize_input
from r1jax.nn.fp8.quantize import E4M3
from r1jax.nn.fp8.ragged import ragged_dot
from r1jax.nn.fp8.tiles import WeightTiles, weight_tiles


def grouped(experts: dict, x_NxD, group_sizes_E, fp8_cfg: FP8Config):
  """SwiGLU of each expert over its contiguous rows of x (rows sorted by expert) as block-scaled FP8 grouped
  GEMMs (ragged.py); master weights only."""
  mm = lambda x, w: ragged_dot(x, w, group_sizes_E, fp8_cfg.block, fp8_cfg.pow2_scales)  # noqa: E731
  return mm(jax.nn.silu(mm(x_NxD, experts["w_gate"])) * mm(x_NxD, experts["w_up"]), experts["w_down"])


def stack_tiles(experts: dict, fp8_cfg: FP8Config) -> dict:
  """The routed experts' FP8 weights (weight_tiles) for every layer and expert of a stack [..., E, D, F] in one
  pass per weight, for `padded`'s experts["fp8_tiles"] (FP8Config.quantize_experts_once). [gate | up] is laid out
  [..., D, 2, F] (scales [..., D/b, 2, F/b], N-major [..., 2, F, D]): the joined GEMM's [D, 2F] where F is whole
  on the device, and still split over exp_mlp like the weights where shard_map splits F. One pass over both
  weights in place where they join (on one device, the Triton quantiser's `parts`); under GSPMD partitioning
  (the XLA quantiser: a pallas_call has no partitioning rule) each is quantised where it lies and stacked, as a
  join along F would reshard it."""
  kw = dict(block=fp8_cfg.block, impl=fp8_cfg.impl, pow2=fp8_cfg.pow2_scales)
  w_gate, w_up = experts["w_gate"], experts["w_up"]
  *lead, D, F = w_gate.shape
  b = fp8_cfg.block
  if joins_columns(F, F, block=b):
    t = weight_tiles((w_gate, w_up), **kw)
    gate_up = WeightTiles(t.q_KxN.reshape(*lead, D, 2, F), t.s_KbxNb.reshape(*lead, D // b, 2, F // b),
                          t.q_NxK.reshape(*lead, 2, F, D))
  else:
    g, u = (weight_tiles((w,), **kw) for w in (w_gate, w_up))
    gate_up = WeightTiles(jnp.stack([g.q_KxN, u.q_KxN], -2), jnp.stack([g.s_KbxNb, u.s_KbxNb], -2),
                          jnp.stack([g.q_NxK, u.q_NxK], -3))
  return {"gate_up": gate_up, "down": weight_tiles((experts["w_down"],), **kw)}


def tile_specs(spec) -> dict:
  """shard_map specs of stack_tiles' output for one layer, `spec(*logical names)` giving a PartitionSpec: split
  by expert and (F) like the weights they quantise."""
  gate_up, down = spec("exp", None, None, "exp_mlp"), spec("exp", "exp_mlp", None)
  return {"gate_up": WeightTiles(gate_up, gate_up, spec("exp", None, "exp_mlp", None)),
          "down": WeightTiles(down, down, spec("exp", None, "exp_mlp"))}


def _joined(tiles: dict, block: int) -> tuple:
  """stack_tiles of this device's experts as batched_swiglu_mlp's w_tiles: [gate | up] as [E, D, 2F]."""
  gu = tiles["gate_up"]
  E, D, _, F = gu.q_KxN.shape
  return (WeightTiles(gu.q_KxN.reshape(E, D, 2 * F), gu.s_KbxNb.reshape(E, D // block, 2 * F // block),
                      gu.q_NxK.reshape(E, 2 * F, D)), tiles["down"])


def padded(experts: dict, x_ExNxD, fp8_cfg: FP8Config, x_quantized=None):
  """SwiGLU of each expert over its capacity-padded rows as block-scaled FP8 GEMMs per expert (from stored e4m3
  bytes for keep_fp8 experts). `x_quantized`: x's e4m3 rows and scales as dispatched (dispatch_rows), for the
  master-weight GEMMs; `experts["fp8_tiles"]`, where present, their weights quantised ahead (stack_tiles)."""
  kw = dict(block=fp8_cfg.block, impl=fp8_cfg.impl, pow2=fp8_cfg.pow2_scales)
  w_gate, w_up, w_down = experts["w_gate"], experts["w_up"], experts["w_down"]
  kept = any(map(weights.is_quantized, (w_gate, w_up, w_down)))
  tiles = experts.get("fp8_tiles")
  if not kept and joins_columns(w_gate.shape[-1], w_up.shape[-1], block=fp8_cfg.block):
    # One GEMM over [gate | up] columns (x quantised once, one launch twice as wide), the SwiGLU fused into the
    # down GEMM's input quantisation (mlp.swiglu_mlp; layers.mlp does the same).
    return batched_swiglu_mlp(x_ExNxD, w_gate, w_up, w_down, x_quantized=x_quantized,
                              w_tiles=None if tiles is None else _joined(tiles, fp8_cfg.block), **kw)
  if tiles is not None:
    raise ValueError(f"fp8.experts.padded: expert weight tiles given, but gate and up {w_gate.shape} do not join "
                     "here (F must be whole blocks on the device)")

  def mm(x, w, xq=None):  # a keep_fp8 weight runs its forward GEMM from the stored bytes
    if weights.is_quantized(w):
      return jax.vmap(lambda x, w: weights.dot(x, w, fp8_cfg.block, fp8_cfg.impl, fp8_cfg.pow2_scales))(x, w)
    return batched_dot(x, w, x_quantized=xq, **kw)

  return mm(jax.nn.silu(mm(x_ExNxD, w_gate, x_quantized)) * mm(x_ExNxD, w_up, x_quantized), w_down)


def words(q):
  """e4m3 rows [..., D] as uint32 words [..., D / 4] and back (D is whole blocks of >= 16): a gather or collective
  then moves 4-byte elements (XLA's GPU gather of single bytes ran at the speed of the bf16 one on an H200), and
  collectives need not take fp8 types on every backend."""
  if q.dtype == jnp.uint32:
    return jax.lax.bitcast_convert_type(q, E4M3).reshape(*q.shape[:-1], -1)
  return jax.lax.bitcast_convert_type(q.reshape(*q.shape[:-1], -1, 4), jnp.uint32)


def dispatch_rows(x_NxD, fp8_cfg: FP8Config) -> tuple:
  """FP8 dispatch (V3 report §3.3.3): the tokens quantised once, before the gather (1 x block tiles are per row,
  so this is exactly the quantisation of the gathered rows), as (e4m3 words, scales) rows to move; the bf16 rows
  dispatched beside them then only carry the gradient back, so XLA drops their forward gather."""
  q_NxD, s_NxDb = quantize_input(x_NxD, fp8_cfg.block, fp8_cfg.impl, fp8_cfg.pow2_scales)
  return words(q_NxD), s_NxDb


def padded_dispatched(experts: dict, x_ExNxD, sent: tuple, fp8_cfg: FP8Config):
  """`padded` over rows that arrived with their dispatch_rows (words unpacked back to e4m3)."""
  words_ExNxW, s_ExNxDb = sent
  return padded(experts, x_ExNxD, fp8_cfg, (words(words_ExNxW), s_ExNxDb))
