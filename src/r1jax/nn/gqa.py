"""Grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245) for the dense Llama/Qwen-style students
R1 was distilled into: n_heads query heads share n_kv_heads key/value heads, RoPE on the whole head in the
rotate-half layout of HF checkpoints, and optional q/k/v biases (Qwen2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.config import ComputeConfig, ModelConfig
from r1jax.nn import attention, layers, rope
from r1jax.sharding import constrain


def init(key, cfg: ModelConfig, compute: ComputeConfig) -> dict:
  dt, std = jnp.dtype(compute.param_dtype), compute.init_std
  q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  kq, kk, kv, ko = jax.random.split(key, 4)
  p = {
      "wq": layers.normal(kq, (cfg.dim, q_dim), ("embed", "heads"), std, dt),
      "wk": layers.normal(kk, (cfg.dim, kv_dim), ("embed", "kv_heads"), std, dt),
      "wv": layers.normal(kv, (cfg.dim, kv_dim), ("embed", "kv_heads"), std, dt),
      "wo": layers.normal(ko, (q_dim, cfg.dim), ("heads", "embed"), std, dt),
  }
  if cfg.qkv_bias:
    p["bq"] = layers.zeros((q_dim,), ("heads",), dt)
    p["bk"] = layers.zeros((kv_dim,), ("kv_heads",), dt)
    p["bv"] = layers.zeros((kv_dim,), ("kv_heads",), dt)
  return p


def _project(p: dict, name: str, x_BxLxD, compute: ComputeConfig):
  y = layers.dense(x_BxLxD, p[f"w{name}"], compute.fp8.use("attention"))
  return y + p[f"b{name}"].astype(y.dtype) if f"b{name}" in p else y


def _qkv(p: dict, x_BxLxD, cos, sin, cfg: ModelConfig, compute: ComputeConfig):
  """Roped queries [B, L, H, Dh], roped keys and values [B, L, Hkv, Dh]."""
  B, L, _ = x_BxLxD.shape
  H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  q_BxLxHxDh = constrain(_project(p, "q", x_BxLxD, compute).reshape(B, L, H, Dh), "batch", "seq", "act_heads", None)
  k_BxLxHkvxDh = _project(p, "k", x_BxLxD, compute).reshape(B, L, Hkv, Dh)
  v_BxLxHkvxDh = _project(p, "v", x_BxLxD, compute).reshape(B, L, Hkv, Dh)
  return (rope.apply_rotate_half(q_BxLxHxDh, cos, sin), rope.apply_rotate_half(k_BxLxHkvxDh, cos, sin),
          v_BxLxHkvxDh)


def _attend(p: dict, q_BxLxHxDh, k_BxSxHkvxDh, v_BxSxHkvxDh, mask: attention.Mask, compute: ComputeConfig):
  B, L, H, Dh = q_BxLxHxDh.shape
  # Llama/Qwen scale by 1/sqrt(head_dim) only; YaRN's temperature lives in cos/sin (rope.cos_sin_scale).
  o_BxLxHxDh = attention.attend(q_BxLxHxDh, k_BxSxHkvxDh, v_BxSxHkvxDh, mask, scale=Dh**-0.5,
                                impl=compute.attention_impl, block=compute.attention_block)
  o_BxLxHxDh = constrain(o_BxLxHxDh, "batch", "seq", "act_heads", None)
  return layers.dense(o_BxLxHxDh.reshape(B, L, H * Dh), p["wo"], compute.fp8.use("attention"))


def apply(p: dict, x_BxLxD, cos, sin, mask: attention.Mask, cfg: ModelConfig, compute: ComputeConfig):
  q, k, v = _qkv(p, x_BxLxD, cos, sin, cfg, compute)
  # Context parallelism: a shard's queries attend over the whole sequence, so keys and values are all-gathered
  # over `context` (the queries, and so the output, stay split).
  k, v = (constrain(x, "batch", None, "act_heads", None) for x in (k, v))
  return _attend(p, q, k, v, mask, compute)


def init_cache(cfg: ModelConfig, B: int, S: int, dtype) -> dict:
  """A per-head key/value cache: 2 * n_kv_heads * head_dim values per token."""
  shape = (B, S, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_NAMES = {"k": ("batch", None, "act_heads", None), "v": ("batch", None, "act_heads", None)}


def apply_cached(p: dict, x_BxTxD, cos, sin, mask: attention.Mask, cache: dict, write_B, cfg: ModelConfig,
                 compute: ComputeConfig):
  """Decode path: write this step's keys/values at slots write_B + [0, T), attend over the cache."""
  q, k, v = _qkv(p, x_BxTxD, cos, sin, cfg, compute)
  cache = {"k": layers.write_rows(cache["k"], k, write_B), "v": layers.write_rows(cache["v"], v, write_B)}
  return _attend(p, q, cache["k"], cache["v"], mask, compute), cache
