"""Training compute from a config: FLOPs per token (6 * active matmul params + attention)."""

from __future__ import annotations

from r1jax.config import ModelConfig


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward QK^T and PV FLOPs per token under a causal mask (each token sees (L+1)/2 keys on average)."""
  qk_dim, v_dim = (cfg.head_dim, cfg.head_dim) if cfg.attention == "gqa" else (cfg.qk_head_dim, cfg.v_head_dim)
  per_layer = 2 * cfg.n_heads * (qk_dim + v_dim) * (seq_len + 1) / 2
  return cfg.n_layers * per_layer


def train_flops_per_token(counts: dict, cfg: ModelConfig, seq_len: int) -> dict:
  """6 * N_active (the seed's arithmetic; embedding lookup is not a matmul) plus 3x forward attention."""
  matmul = 6 * counts["active_without_embedding"]
  attention = 3 * attention_flops_per_token(cfg, seq_len)
  return {"matmul": matmul, "attention": attention, "total": matmul + attention, "seq_len": seq_len}
