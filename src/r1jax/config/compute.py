"""How a run computes and trains the network, apart from what the network is (model.py): numerics,
implementation choices, initialisation, loss weights and the balancing speed, and DeepSeek's FP8 recipe.
A checkpoint's architecture does not depend on any of it."""

from __future__ import annotations

import dataclasses
from typing import Literal

from r1jax.config.errors import fail
from r1jax.config.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class FP8Config:
  """DeepSeek-V3's fine-grained FP8 GEMMs (V3 report §3.3; nn/fp8/) and which matmuls use them. The
  embedding, head, norms, router, attention softmax and MLA's absorbed decode stay high precision."""

  enabled: bool = False
  block: int = 128  # 1 x block activation tiles and block x block weight tiles (128 in V3; smaller for tiny tests)
  pow2_scales: bool = False  # scales rounded up to powers of two
  # auto: Mosaic GPU kernel on Hopper, Triton on other GPUs, XLA elsewhere (fp8.resolve_impl); the ragged_dot
  # expert form (fp8/ragged.py) is the XLA formulation whatever this says
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

  def validate(self, prefix: str = "compute.fp8"):
    if self.block < 16 or self.block & (self.block - 1):
      fail(f"{prefix}.block", self.block, "must be a power of two >= 16 (tensor-core tile depth)")


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
  """Per run, not per checkpoint: the same weights may be trained or sampled in another dtype, with FP8, remat or
  another attention kernel."""

  dtype: Literal["bfloat16", "float32"] = "bfloat16"  # compute dtype; router, softmax, norms stay fp32
  param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights
  init_std: float = 0.006  # a fresh model's weights
  remat: Literal["none", "full", "dots"] = "none"
  # nn/attention.py: auto picks cuDNN flash attention on GPU, splash on TPU, blockwise (nn/blockwise.py) under
  # context parallelism, the XLA reference elsewhere.
  attention_impl: Literal["auto", "xla", "cudnn", "splash", "blockwise"] = "auto"
  attention_block: int = 512  # keys per block of blockwise attention: its scores are [L, attention_block]
  # Expert parallelism (expert_parallel.py): fixed-capacity all-to-all dispatch over the `expert` mesh axis.
  # Slots per (source shard, expert) = ceil(capacity_factor * local tokens * top-k / n_routed_experts);
  # 0 means dropless (every slot fits: V3 report §2.1.2 "No Token-Dropping"), at E/K times the buffer.
  capacity_factor: float = 0.0
  # The routed experts' GEMMs (nn/expert_ffn.py): einsum over capacity-padded rows; ragged_dot over those rows'
  # valid ones; grouped: dropless, rows sorted by expert, one grouped GEMM (nn/grouped_gemm.py) whose kernel is
  # grouped_kernel's (auto: Pallas Triton on GPU, XLA's ragged_dot elsewhere). auto: ragged_dot on TPU, einsum
  # elsewhere (grouped becomes the GPU default once its kernels are measured there: docs/perf.md).
  expert_gemm: Literal["auto", "einsum", "ragged_dot", "grouped"] = "auto"
  grouped_kernel: Literal["auto", "triton", "xla"] = "auto"
  head_chunk: int = 512  # training losses make the fp32 head logits this many positions at a time (0: all)
  mtp_loss_weight: float = 0.3  # lambda (V3 report §2.2)
  aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight (V3 report eq. 17-20)
  bias_update_speed: float = 0.001  # gamma of the aux-loss-free balancing (V3 report eq. 16 and §4.2)
  fp8: FP8Config = FP8Config()

  def validate(self, prefix: str = "compute"):
    if self.capacity_factor < 0:
      fail(f"{prefix}.capacity_factor", self.capacity_factor, "must be >= 0 (0: dropless)")
    if self.expert_gemm == "grouped" and self.capacity_factor > 0:
      fail(f"{prefix}.expert_gemm", self.expert_gemm, f"is dropless: set {prefix}.capacity_factor=0 (or pick einsum)")
    if self.head_chunk < 0:
      fail(f"{prefix}.head_chunk", self.head_chunk, "must be >= 0")
    if self.attention_block < 1:
      fail(f"{prefix}.attention_block", self.attention_block, "must be >= 1")
    self.fp8.validate(f"{prefix}.fp8")

  def validate_for(self, model: ModelConfig, prefix: str = "compute"):
    """Against the architecture: the FP8 matmuls' input dims must be whole blocks (1 x block activation tiles); a
    partial last block of output columns is padded, as DeepSeek's checkpoints round it up (fp8.dot)."""
    if not self.fp8.enabled:
      return
    m = model
    if m.attention == "gqa":
      attn = [m.dim, m.n_heads * m.head_dim]
    else:
      attn = [m.dim, m.q_lora_rank, m.kv_lora_rank, m.n_heads * m.v_head_dim]
    experts = [m.dim, m.moe_inter_dim]
    inputs = {"attention": attn, "dense_mlp": [m.dim, m.inter_dim], "shared_experts": experts,
              "routed_experts": experts, "mtp_proj": [2 * m.dim]}
    block = self.fp8.block
    for part, sizes in inputs.items():
      bad = [d for d in sizes if d and d % block]
      if self.fp8.use(part) and bad:
        fail(f"{prefix}.fp8.{part}", True, f"input dims {bad} are not multiples of {prefix}.fp8.block={block}; "
             f"set {prefix}.fp8.{part}=false or another block")
