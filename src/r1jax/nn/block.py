"""A pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is a dense SwiGLU
or DeepSeekMoE."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from r1jax.config import ComputeConfig, ModelConfig
from r1jax.nn import attention, fp8, gqa, layers, mla, moe
from r1jax.sharding import constrain


class Context(NamedTuple):
  """What every block needs about the positions of a batch, computed once per forward pass."""

  cos: jax.Array  # rotary tables of each position
  sin: jax.Array
  mask: attention.Mask  # causal within packed segments; when decoding, up to each row's position in the cache
  tokens: moe.Tokens  # real-token mask and segment ids for the router statistics
  write_B: jax.Array | None = None  # decoding: the cache slot of each row's first new token


def _attention(cfg: ModelConfig):
  """The attention module: DeepSeek's MLA, or GQA for dense Llama/Qwen-style students."""
  return gqa if cfg.attention == "gqa" else mla


def init(key, cfg: ModelConfig, compute: ComputeConfig, is_moe: bool) -> dict:
  k_attn, k_ffn = jax.random.split(key)
  dt = jnp.dtype(compute.param_dtype)
  if is_moe:
    ffn = moe.init(k_ffn, cfg, compute)
  else:
    ffn = layers.init_mlp(k_ffn, cfg.dim, cfg.inter_dim, compute.init_std, dt)
  return {
      "attn_norm": layers.ones((cfg.dim,), ("norm",), dt),
      "attn": _attention(cfg).init(k_attn, cfg, compute),
      "ffn_norm": layers.ones((cfg.dim,), ("norm",), dt),
      "ffn": ffn,
  }


def _ffn(p: dict, x_BxLxD, ctx: Context, cfg: ModelConfig, compute: ComputeConfig, is_moe: bool, replay_BxLxK):
  h = layers.rms_norm(x_BxLxD, p["ffn_norm"], cfg.norm_eps)
  if is_moe:
    y, stats = moe.apply(p["ffn"], h, cfg, compute, ctx.tokens, replay_BxLxK)
  else:
    y, stats = layers.mlp(p["ffn"], h, compute.fp8.use("dense_mlp")), None
  return constrain(x_BxLxD + y, "batch", "seq", "act_embed"), stats


def apply(p: dict, x_BxLxD, ctx: Context, cfg: ModelConfig, compute: ComputeConfig, is_moe: bool, replay_BxLxK=None):
  """Returns (x_BxLxD, router stats or None); `replay_BxLxK` fixes an MoE block's experts (routing replay)."""
  h = layers.rms_norm(x_BxLxD, p["attn_norm"], cfg.norm_eps)
  x_BxLxD = x_BxLxD + _attention(cfg).apply(p["attn"], h, ctx.cos, ctx.sin, ctx.mask, cfg, compute)
  return _ffn(p, constrain(x_BxLxD, "batch", "seq", "act_embed"), ctx, cfg, compute, is_moe, replay_BxLxK)


def apply_cached(p: dict, x_BxTxD, cache: dict, ctx: Context, cfg: ModelConfig, compute: ComputeConfig,
                 is_moe: bool):
  """Decoding: attention reads and extends this block's KV cache. Returns (x_BxTxD, stats, cache)."""
  h = layers.rms_norm(x_BxTxD, p["attn_norm"], cfg.norm_eps)
  a, cache = _attention(cfg).apply_cached(p["attn"], h, ctx.cos, ctx.sin, ctx.mask, cache, ctx.write_B, cfg,
                                          compute)
  x_BxTxD, stats = _ffn(p, constrain(x_BxTxD + a, "batch", "seq", "act_embed"), ctx, cfg, compute, is_moe, None)
  return x_BxTxD, stats, cache


def init_cache(cfg: ModelConfig, B: int, S: int, dtype) -> dict:
  return _attention(cfg).init_cache(cfg, B, S, dtype)


def cache_names(cfg: ModelConfig) -> dict:
  """Logical axis names of one block's cache entries (a stacked cache adds "layers" in front)."""
  return _attention(cfg).CACHE_NAMES


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # bf16 dots without batch dims, and the FP8 GEMMs in their place (a kernel is no dot_general: fp8.SAVED_NAMES)
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*fp8.SAVED_NAMES)),
}


def scan(stack: dict, x_BxLxD, ctx: Context, cfg: ModelConfig, compute: ComputeConfig, is_moe: bool,
         replay_NxBxLxK=None):
  """Run a stack of identical blocks (leading "layers" axis) with lax.scan; returns (x, stacked stats). An MoE
  stack's FP8 expert weights are quantised here, once for all layers (moe.with_expert_tiles), so that neither
  a layer's forward nor its rematerialisation quantises them."""
  if is_moe:
    stack = {**stack, "ffn": moe.with_expert_tiles(stack["ffn"], compute)}

  def body(x, layer):
    p, replay = layer
    return apply(p, x, ctx, cfg, compute, is_moe, replay)

  if compute.remat != "none":
    body = jax.checkpoint(body, policy=_REMAT_POLICIES[compute.remat])
  return jax.lax.scan(body, x_BxLxD, (stack, replay_NxBxLxK))


def scan_cached(stack: dict, x_BxTxD, cache: dict, ctx: Context, cfg: ModelConfig, compute: ComputeConfig,
                is_moe: bool):
  """Decode through a stack of blocks and their stacked caches; returns (x, stacked stats, caches). A stack given
  as a tuple of layers (model.per_layer) runs unrolled, each layer reading its own weight arrays in place."""
  if isinstance(stack, tuple):
    stats = []
    for i, p in enumerate(stack):
      x_BxTxD, s, c = apply_cached(p, x_BxTxD, jax.tree.map(lambda a, i=i: a[i], cache), ctx, cfg, compute, is_moe)
      cache = jax.tree.map(lambda a, u, i=i: a.at[i].set(u), cache, c)
      stats.append(s)
    return x_BxTxD, jax.tree.map(lambda *s: jnp.stack(s), *stats) if stats[0] is not None else None, cache

  def body(x, layer):
    p, c = layer
    x, stats, c = apply_cached(p, x, c, ctx, cfg, compute, is_moe)
    return x, (stats, c)

  x_BxTxD, (stats, cache) = jax.lax.scan(body, x_BxTxD, (stack, cache))
  return x_BxTxD, stats, cache
