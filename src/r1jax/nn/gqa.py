"""Grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245) for the dense Llama/Qwen-style students
R1 was distilled into: n_heads query heads share n_kv_heads key/value heads, RoPE on the whole head in the
rotate-half layout of HF checkpoints, and optional q/k/v biases (Qwen2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.nn import layers, rope
from r1jax.sharding import constrain


def init(key, cfg: ModelConfig) -> dict:
  dt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
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


def _project(p: dict, name: str, x_BxLxD):
  y = layers.dense(x_BxLxD, p[f"w{name}"])
  return y + p[f"b{name}"].astype(y.dtype) if f"b{name}" in p else y


def apply(p: dict, x_BxLxD, cos, sin, mask_BxLxL, cfg: ModelConfig):
  """Causal GQA with fp32 softmax; query heads are grouped per key/value head, never copied."""
  B, L, _ = x_BxLxD.shape
  H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  q_BxLxHxDh = constrain(_project(p, "q", x_BxLxD).reshape(B, L, H, Dh), "batch", "seq", "act_heads", None)
  k_BxLxKxDh = _project(p, "k", x_BxLxD).reshape(B, L, K, Dh)
  v_BxLxKxDh = _project(p, "v", x_BxLxD).reshape(B, L, K, Dh)
  q_BxLxHxDh = rope.apply_rotate_half(q_BxLxHxDh, cos, sin)
  k_BxLxKxDh = rope.apply_rotate_half(k_BxLxKxDh, cos, sin)

  f32 = jnp.float32
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(B, L, K, H // K, Dh)  # head h uses key/value head h // (H / K), as HF
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q_BxLxKxGxDh, k_BxLxKxDh, preferred_element_type=f32)
  # Llama/Qwen scale by 1/sqrt(head_dim) only; YaRN's temperature lives in cos/sin (rope.cos_sin_scale).
  scores = scores * Dh**-0.5
  scores = jnp.where(mask_BxLxL[:, None, None], scores, jnp.finfo(f32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(x_BxLxD.dtype)
  o_BxLxKxGxDh = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_BxLxKxDh)
  o_BxLxHxDh = constrain(o_BxLxKxGxDh.reshape(B, L, H, Dh), "batch", "seq", "act_heads", None)
  return layers.dense(o_BxLxHxDh.reshape(B, L, H * Dh), p["wo"])
