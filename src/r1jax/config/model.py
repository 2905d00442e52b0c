"""The architecture: what a checkpoint needs to rebuild the network and what HF config.json maps (field names
follow DeepSeek's inference ModelArgs). How a run computes it is compute.py's."""

from __future__ import annotations

import dataclasses
from typing import Literal

from r1jax.config.errors import fail


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V3's architecture (a checkpoint's `model` section rebuilds it exactly). Defaults are V3 671B."""

  vocab_size: int = 129280
  dim: int = 7168
  inter_dim: int = 18432  # dense-layer SwiGLU width
  n_layers: int = 61
  n_dense_layers: int = 3  # first-k dense layers; the rest are MoE layers
  n_heads: int = 128
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  # Multi-head Latent Attention (V3 report §2.1.1).
  q_lora_rank: int = 1536  # 0: no query compression (V2-Lite)
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  # Grouped-query attention for dense Llama/Qwen-style students (gqa.py); the MLA fields are then unused.
  attention: Literal["mla", "gqa"] = "mla"
  n_kv_heads: int = 0  # gqa: key/value heads, dividing n_heads
  head_dim: int = 0  # gqa: per-head query/key/value width
  qkv_bias: bool = False  # gqa: biases on the q, k, v projections (Qwen2)
  # RoPE and YaRN (rope.py). rope_scaling "yarn" uses rope_factor/original_seq_len/beta_*/mscale*;
  # "llama3" (Llama 3.1) uses rope_factor/original_seq_len/low_freq_factor/high_freq_factor.
  rope_theta: float = 10000.0
  rope_scaling: Literal["none", "yarn", "llama3"] = "yarn"
  rope_factor: float = 40.0
  original_seq_len: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  max_seq_len: int = 163840
  # DeepSeekMoE (V3 report §2.1.2).
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  n_activated_experts: int = 8  # top-k
  moe_inter_dim: int = 2048
  score_func: Literal["sigmoid", "softmax"] = "sigmoid"
  n_expert_groups: int = 8
  n_limited_groups: int = 4  # top-k groups
  norm_topk_prob: bool = True
  route_scale: float = 2.5
  # The aux-loss-free selection bias (V3 report eq. 16): None means on for sigmoid routers (V3) and off for
  # softmax routers (V2, which has no such bias and whose HF format cannot hold one).
  router_bias: bool | None = None
  # Multi-token prediction (V3 report §2.2).
  n_mtp: int = 1

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def rope_dim(self) -> int:
    """Rotated width per head: the decoupled RoPE key of MLA, or the whole head under GQA."""
    return self.head_dim if self.attention == "gqa" else self.qk_rope_head_dim

  @property
  def has_router_bias(self) -> bool:
    return self.score_func == "sigmoid" if self.router_bias is None else self.router_bias

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  def validate(self, prefix: str = "model"):
    k = lambda name: f"{prefix}.{name}"  # noqa: E731
    positive = ["vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_rope_head_dim",
                "v_head_dim", "max_seq_len", "original_seq_len"]
    for name in positive:
      if getattr(self, name) <= 0:
        fail(k(name), getattr(self, name), "must be positive")
    for name in ["n_dense_layers", "q_lora_rank", "qk_nope_head_dim", "n_mtp", "n_shared_experts",
                 "n_routed_experts"]:
      if getattr(self, name) < 0:
        fail(k(name), getattr(self, name), "must be >= 0")
    if self.qk_rope_head_dim % 2:
      fail(k("qk_rope_head_dim"), self.qk_rope_head_dim, "must be even (RoPE rotates pairs)")
    if self.n_dense_layers > self.n_layers:
      fail(k("n_dense_layers"), self.n_dense_layers, f"must be <= model.n_layers={self.n_layers}")
    if self.n_dense_layers < self.n_layers or self.n_mtp:
      self._validate_moe(k)
    if self.rope_scaling == "yarn" and self.rope_factor < 1:
      fail(k("rope_factor"), self.rope_factor, "YaRN needs a factor >= 1")
    llama3_ok = self.rope_factor >= 1 and self.high_freq_factor > self.low_freq_factor > 0
    if self.rope_scaling == "llama3" and not llama3_ok:
      fail(k("high_freq_factor"), self.high_freq_factor,
            f"llama3 RoPE needs rope_factor >= 1 and high_freq_factor > low_freq_factor={self.low_freq_factor} > 0")
    if self.attention == "gqa":
      self._validate_gqa(k)
    if self.norm_eps <= 0:
      fail(k("norm_eps"), self.norm_eps, "must be positive")

  def _validate_gqa(self, k):
    if self.head_dim <= 0 or self.head_dim % 2:
      fail(k("head_dim"), self.head_dim, "attention=gqa needs a positive, even head_dim (RoPE rotates pairs)")
    if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
      fail(k("n_kv_heads"), self.n_kv_heads, f"attention=gqa needs n_kv_heads dividing model.n_heads={self.n_heads}")

  def _validate_moe(self, k):
    e = self.n_routed_experts
    if e <= 0:
      fail(k("n_routed_experts"), e, "MoE layers (n_dense_layers < n_layers, or MTP) need routed experts")
    if not 0 < self.n_activated_experts <= e:
      fail(k("n_activated_experts"), self.n_activated_experts,
            f"top-k must be in [1, model.n_routed_experts={e}]")
    if self.n_expert_groups <= 0 or e % self.n_expert_groups:
      fail(k("n_expert_groups"), self.n_expert_groups, f"must divide model.n_routed_experts={e}")
    if not 0 < self.n_limited_groups <= self.n_expert_groups:
      fail(k("n_limited_groups"), self.n_limited_groups,
            f"top-k groups must be in [1, model.n_expert_groups={self.n_expert_groups}]")
    reachable = self.n_limited_groups * (e // self.n_expert_groups)
    if self.n_activated_experts > reachable:
      fail(k("n_activated_experts"), self.n_activated_experts,
            f"exceeds the {reachable} experts in the n_limited_groups={self.n_limited_groups} selected groups")
    if self.score_func == "sigmoid" and self.n_expert_groups > 1 and e // self.n_expert_groups < 2:
      fail(k("n_expert_groups"), self.n_expert_groups, "sigmoid group scores sum each group's top-2 experts,"
            " so every group needs >= 2 experts")
    if self.moe_inter_dim <= 0:
      fail(k("moe_inter_dim"), self.moe_inter_dim, "must be positive")
