"""What the network is and how a run computes it: DeepSeek-V3's architecture (field names follow DeepSeek's
inference ModelArgs) and the FP8 recipe's switches."""

from __future__ import annotations

import dataclasses
from typing import Literal

from r1jax.config.errors import fail


@dataclasses.dataclass(frozen=True)
class FP8Config:
  """DeepSeek-V3's fine-grained FP8 GEMMs (V3 report §3.3; nn/fp8.py) and which matmuls use them. The
  embedding, head, norms, router, attention softmax and MLA's absorbed decode stay high precision."""

  enabled: bool = False
  block: int = 128  # 1 x block activation tiles and block x block weight tiles (128 in V3; smaller for tiny tests)
  pow2_scales: bool = False  # scales rounded up to powers of two
  # auto: Mosaic GPU kernel on Hopper, Triton on other GPUs, XLA elsewhere (fp8.resolve_impl); the ragged_dot
  # expert form (fp8_ragged) is the XLA formulation whatever this says
  impl: Literal["auto", "xla", "mosaic_gpu", "triton", "mosaic_tpu"] = "auto"
  attention: bool = True  # MLA/GQA projections
  dense_mlp: bool = True
  shared_experts: bool = True
  routed_experts: bool = True
  mtp_proj: bool = True
  # Routed experts' weights quantised once per forward for all layers of the stack, before the layer scan (held
  # through the step at 2 bytes per expert weight: e4m3 in both majors), instead of in each layer's forward and
  # again under remat (moe.with_expert_tiles)
  quantize_experts_once: bool = True

  PARTS = ("attention", "dense_mlp", "shared_experts", "routed_experts", "mtp_proj")

  def use(self, part: str) -> FP8Config | None:
    """This config where `part` runs in FP8, else None (the matmul stays in the compute dtype)."""
    if part not in self.PARTS:
      raise ValueError(f"FP8Config.use({part!r}): parts are {self.PARTS}")
    return self if self.enabled and getattr(self, part) else None

  def validate(self, prefix: str = "model.fp8"):
    if self.block < 16 or self.block & (self.block - 1):
      fail(f"{prefix}.block", self.block, "must be a power of two >= 16 (tensor-core tile depth)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V3 architecture; field names follow DeepSeek's inference ModelArgs. Defaults are V3 671B."""

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
  # nn/attention.py: auto picks cuDNN flash attention on GPU, splash on TPU, the XLA reference elsewhere.
  attention_impl: Literal["auto", "xla", "cudnn", "splash"] = "auto"
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
  bias_update_speed: float = 0.001  # gamma of the aux-loss-free balancing (V3 report eq. 16 and §4.2)
  aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight (V3 report eq. 17-20)
  # Expert parallelism (expert_parallel.py): fixed-capacity all-to-all dispatch over the `expert` mesh axis.
  # Slots per (source shard, expert) = ceil(capacity_factor * local tokens * top-k / n_routed_experts);
  # 0 means dropless (every slot fits: V3 report §2.1.2 "No Token-Dropping"), at E/K times the buffer.
  capacity_factor: float = 0.0
  expert_gemm: Literal["auto", "einsum", "ragged_dot"] = "auto"  # auto: ragged_dot on TPU, einsum elsewhere
  # Multi-token prediction (V3 report §2.2).
  n_mtp: int = 1
  mtp_loss_weight: float = 0.3  # lambda
  # Numerics and memory.
  dtype: Literal["bfloat16", "float32"] = "bfloat16"  # compute dtype; router, softmax, norms stay fp32
  param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights
  init_std: float = 0.006
  remat: Literal["none", "full", "dots"] = "none"
  head_chunk: int = 512  # training losses make the fp32 head logits this many positions at a time (0: all)
  fp8: FP8Config = FP8Config()

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
                 "n_routed_experts", "head_chunk"]:
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
    self.fp8.validate(k("fp8"))
    self._validate_fp8(k)

  def _validate_fp8(self, k):
    """The FP8 matmuls' input dims must be whole blocks (1 x block activation tiles); a partial last block of
    output columns is padded, as DeepSeek's checkpoints round it up (fp8.dot)."""
    if not self.fp8.enabled:
      return
    if self.attention == "gqa":
      attn = [self.dim, self.n_heads * self.head_dim]
    else:
      attn = [self.dim, self.q_lora_rank, self.kv_lora_rank, self.n_heads * self.v_head_dim]
    experts = [self.dim, self.moe_inter_dim]
    inputs = {"attention": attn, "dense_mlp": [self.dim, self.inter_dim], "shared_experts": experts,
              "routed_experts": experts, "mtp_proj": [2 * self.dim]}
    for part, sizes in inputs.items():
      bad = [d for d in sizes if d and d % self.fp8.block]
      if self.fp8.use(part) and bad:
        fail(k(f"fp8.{part}"), True, f"input dims {bad} are not multiples of model.fp8.block={self.fp8.block}; "
              f"set model.fp8.{part}=false or another block")

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
    if self.capacity_factor < 0:
      fail(k("capacity_factor"), self.capacity_factor, "must be >= 0 (0: dropless)")
