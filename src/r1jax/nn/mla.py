"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 report §2.1.1): low-rank query and key/value
compression with RMSNorm on the latents, and a decoupled RoPE key shared by all heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.nn import layers, rope
from r1jax.sharding import constrain


def init(key, cfg: ModelConfig) -> dict:
  dt, std, H = jnp.dtype(cfg.param_dtype), cfg.init_std, cfg.n_heads
  k = iter(jax.random.split(key, 5))
  p = {}
  if cfg.q_lora_rank:
    p["wq_a"] = layers.normal(next(k), (cfg.dim, cfg.q_lora_rank), ("embed", "q_lora"), std, dt)
    p["q_norm"] = layers.ones((cfg.q_lora_rank,), ("norm",), dt)
    p["wq_b"] = layers.normal(next(k), (cfg.q_lora_rank, H * cfg.qk_head_dim), ("q_lora", "heads"), std, dt)
  else:
    p["wq"] = layers.normal(next(k), (cfg.dim, H * cfg.qk_head_dim), ("embed", "heads"), std, dt)
  p["wkv_a"] = layers.normal(next(k), (cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"),
                             std, dt)
  p["kv_norm"] = layers.ones((cfg.kv_lora_rank,), ("norm",), dt)
  p["wkv_b"] = layers.normal(next(k), (cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
                             ("kv_lora", "heads"), std, dt)
  p["wo"] = layers.normal(next(k), (H * cfg.v_head_dim, cfg.dim), ("heads", "embed"), std, dt)
  return p


def apply(p: dict, x_BxLxD, cos, sin, mask_BxLxL, cfg: ModelConfig):
  """Training/prefill path: decompress per-head keys and values from the latent, causal softmax in fp32."""
  B, L, _ = x_BxLxD.shape
  H, Dn, Dr, Dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  if cfg.q_lora_rank:
    cq_BxLxRq = layers.rms_norm(layers.dense(x_BxLxD, p["wq_a"]), p["q_norm"], cfg.norm_eps)
    q = layers.dense(cq_BxLxRq, p["wq_b"])
  else:
    q = layers.dense(x_BxLxD, p["wq"])
  q_BxLxHxDqk = constrain(q.reshape(B, L, H, Dn + Dr), "batch", "seq", "act_heads", None)
  q_nope, q_pe = q_BxLxHxDqk[..., :Dn], rope.apply(q_BxLxHxDqk[..., Dn:], cos, sin)

  kv_a = layers.dense(x_BxLxD, p["wkv_a"])
  ckv_BxLxR = layers.rms_norm(kv_a[..., :cfg.kv_lora_rank], p["kv_norm"], cfg.norm_eps)
  k_pe_BxLx1xDr = rope.apply(kv_a[..., None, cfg.kv_lora_rank:], cos, sin)
  kv_BxLxHx = layers.dense(ckv_BxLxR, p["wkv_b"]).reshape(B, L, H, Dn + Dv)
  kv_BxLxHx = constrain(kv_BxLxHx, "batch", "seq", "act_heads", None)
  k_nope, v_BxLxHxDv = kv_BxLxHx[..., :Dn], kv_BxLxHx[..., Dn:]

  f32 = jnp.float32
  scores_BxHxLxL = (jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope, preferred_element_type=f32)
                    + jnp.einsum("bqhd,bkd->bhqk", q_pe, k_pe_BxLx1xDr[:, :, 0], preferred_element_type=f32))
  scores_BxHxLxL = scores_BxHxLxL * rope.softmax_scale(cfg)
  scores_BxHxLxL = jnp.where(mask_BxLxL[:, None], scores_BxHxLxL, jnp.finfo(f32).min)
  probs = jax.nn.softmax(scores_BxHxLxL, axis=-1).astype(x_BxLxD.dtype)
  o_BxLxHxDv = jnp.einsum("bhqk,bkhd->bqhd", probs, v_BxLxHxDv)
  o_BxLxHxDv = constrain(o_BxLxHxDv, "batch", "seq", "act_heads", None)
  return layers.dense(o_BxLxHxDv.reshape(B, L, H * Dv), p["wo"])
