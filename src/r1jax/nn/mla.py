"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 report §2.1.1): low-rank query and key/value
compression with RMSNorm on the latents, and a decoupled RoPE key shared by all heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.config import ComputeConfig, ModelConfig
from r1jax.nn import attention, fp8, layers, rope
from r1jax.sharding import constrain


def init(key, cfg: ModelConfig, compute: ComputeConfig) -> dict:
  dt, std, H = jnp.dtype(compute.param_dtype), compute.init_std, cfg.n_heads
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


def _project(p: dict, x_BxLxD, cos, sin, cfg: ModelConfig, compute: ComputeConfig):
  """Per-head queries (q_nope [B, L, H, Dn], roped q_pe [B, L, H, Dr]) and what MLA caches per token (the
  normalised kv latent [B, L, R], the roped shared key [B, L, Dr]). x's two projections, wq_a and wkv_a, go
  through layers.dense_many (in FP8: one quantisation of x)."""
  B, L, _ = x_BxLxD.shape
  fp8_cfg = compute.fp8.use("attention")
  if cfg.q_lora_rank:
    cq_BxLxRq, kv_a = layers.dense_many(x_BxLxD, [p["wq_a"], p["wkv_a"]], fp8_cfg)
    q = layers.dense(layers.rms_norm(cq_BxLxRq, p["q_norm"], cfg.norm_eps), p["wq_b"], fp8_cfg)
  else:  # wq's columns are split over heads ("tensor"), wkv_a's not: separate GEMMs
    q, kv_a = layers.dense(x_BxLxD, p["wq"], fp8_cfg), layers.dense(x_BxLxD, p["wkv_a"], fp8_cfg)
  q_BxLxHxDqk = constrain(q.reshape(B, L, cfg.n_heads, cfg.qk_head_dim), "batch", "seq", "act_heads", None)
  Dn, R = cfg.qk_nope_head_dim, cfg.kv_lora_rank
  ckv_BxLxR = layers.rms_norm(kv_a[..., :R], p["kv_norm"], cfg.norm_eps)
  k_pe_BxLxDr = rope.apply(kv_a[..., None, R:], cos, sin)[:, :, 0]
  return q_BxLxHxDqk[..., :Dn], rope.apply(q_BxLxHxDqk[..., Dn:], cos, sin), ckv_BxLxR, k_pe_BxLxDr


def apply(p: dict, x_BxLxD, cos, sin, mask: attention.Mask, cfg: ModelConfig, compute: ComputeConfig):
  """Training/prefill path: decompress per-head keys and values from the latent; every head's key is its
  own no-RoPE part followed by the shared RoPE key."""
  B, L, _ = x_BxLxD.shape
  H, Dn, Dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
  q_nope, q_pe, ckv_BxLxR, k_pe_BxLxDr = _project(p, x_BxLxD, cos, sin, cfg, compute)
  # Context parallelism: a shard's queries attend over the whole sequence, so what MLA caches per token (the
  # latent and the shared rope key, kv_lora_rank + qk_rope_head_dim values: 576 for V3) is all-gathered over
  # `context` and every shard decompresses the keys and values itself: ~70x fewer bytes than gathering
  # per-head keys and values (128 heads x 320 values for V3), for one extra wkv_b GEMM per shard.
  ckv_BxLxR = constrain(ckv_BxLxR, "batch", None, None)
  k_pe_BxLxDr = constrain(k_pe_BxLxDr, "batch", None, None)
  kv_BxLxHx = layers.dense(ckv_BxLxR, p["wkv_b"], compute.fp8.use("attention")).reshape(B, L, H, Dn + Dv)
  kv_BxLxHx = constrain(kv_BxLxHx, "batch", None, "act_heads", None)
  k_pe_BxLxHxDr = jnp.broadcast_to(k_pe_BxLxDr[:, :, None], (B, L, H, cfg.qk_rope_head_dim))
  q_BxLxHxDqk = jnp.concatenate([q_nope, q_pe], -1)
  k_BxLxHxDqk = jnp.concatenate([kv_BxLxHx[..., :Dn], k_pe_BxLxHxDr], -1)
  o_BxLxHxDv = attention.attend(q_BxLxHxDqk, k_BxLxHxDqk, kv_BxLxHx[..., Dn:], mask, scale=rope.softmax_scale(cfg),
                                impl=compute.attention_impl, block=compute.attention_block)
  o_BxLxHxDv = constrain(o_BxLxHxDv, "batch", "seq", "act_heads", None)
  return layers.dense(o_BxLxHxDv.reshape(B, L, H * Dv), p["wo"], compute.fp8.use("attention"))


def init_cache(cfg: ModelConfig, B: int, S: int, dtype) -> dict:
  """The latent cache: the normalised kv latent followed by the roped shared key, kv_lora_rank +
  qk_rope_head_dim values per token (V2 paper §2.1.4), not per head."""
  return {"latent": jnp.zeros((B, S, cfg.kv_lora_rank + cfg.qk_rope_head_dim), dtype)}


CACHE_NAMES = {"latent": ("batch", None, None)}  # logical axes of each cache entry


def apply_cached(p: dict, x_BxTxD, cos, sin, mask: attention.Mask, cache: dict, write_B, cfg: ModelConfig,
                 compute: ComputeConfig):
  """Decode path: write this step's latents at slots write_B + [0, T), attend over the whole cache in the
  absorbed form (V2 paper §2.1.2; DeepSeek's attn_impl="absorb"): W_UK is folded into the query and W_UV
  applied after attention, so keys and values are never decompressed. That is multi-query attention with
  the cached latent as the one key (R + Dr wide) and its first R values as the value. Returns (y, cache)."""
  B, T, _ = x_BxTxD.shape
  H, Dn, Dv, R = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  q_nope, q_pe, ckv_BxTxR, k_pe_BxTxDr = _project(p, x_BxTxD, cos, sin, cfg, compute)
  latent_BxSxRr = layers.write_rows(cache["latent"], jnp.concatenate([ckv_BxTxR, k_pe_BxTxDr], -1), write_B)
  wkv_b_RxHxDnv = fp8.weights.cast(p["wkv_b"], x_BxTxD.dtype).reshape(R, H, Dn + Dv)  # high precision (keep_fp8 too)
  w_uk_RxHxDn, w_uv_RxHxDv = wkv_b_RxHxDnv[..., :Dn], wkv_b_RxHxDnv[..., Dn:]
  q_lat_BxTxHxR = jnp.einsum("bthd,rhd->bthr", q_nope, w_uk_RxHxDn)
  q_BxTxHxRr = jnp.concatenate([q_lat_BxTxHxR, q_pe], -1)
  kv_BxSx1xRr = latent_BxSxRr[:, :, None]
  o_lat_BxTxHxR = attention.attend(q_BxTxHxRr, kv_BxSx1xRr, kv_BxSx1xRr[..., :R], mask, scale=rope.softmax_scale(cfg),
                                   impl=compute.attention_impl)
  o_BxTxHxDv = constrain(jnp.einsum("bthr,rhd->bthd", o_lat_BxTxHxR, w_uv_RxHxDv), "batch", "seq", "act_heads", None)
  y_BxTxD = layers.dense(o_BxTxHxDv.reshape(B, T, H * Dv), p["wo"], compute.fp8.use("attention"))
  return y_BxTxD, {"latent": latent_BxSxRr}
