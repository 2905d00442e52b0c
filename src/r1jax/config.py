"""Frozen dataclass configs: the single source of truth. YAML files and `section.field=value` overrides
only replace fields; everything is validated once, here, before any tracing or compilation."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
  """A bad config; the message is one line naming the key and the reason."""


def _fail(key: str, value, reason: str):
  raise ConfigError(f"{key}={value!r}: {reason}")


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
      _fail(f"{prefix}.block", self.block, "must be a power of two >= 16 (tensor-core tile depth)")


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
        _fail(k(name), getattr(self, name), "must be positive")
    for name in ["n_dense_layers", "q_lora_rank", "qk_nope_head_dim", "n_mtp", "n_shared_experts",
                 "n_routed_experts", "head_chunk"]:
      if getattr(self, name) < 0:
        _fail(k(name), getattr(self, name), "must be >= 0")
    if self.qk_rope_head_dim % 2:
      _fail(k("qk_rope_head_dim"), self.qk_rope_head_dim, "must be even (RoPE rotates pairs)")
    if self.n_dense_layers > self.n_layers:
      _fail(k("n_dense_layers"), self.n_dense_layers, f"must be <= model.n_layers={self.n_layers}")
    if self.n_dense_layers < self.n_layers or self.n_mtp:
      self._validate_moe(k)
    if self.rope_scaling == "yarn" and self.rope_factor < 1:
      _fail(k("rope_factor"), self.rope_factor, "YaRN needs a factor >= 1")
    llama3_ok = self.rope_factor >= 1 and self.high_freq_factor > self.low_freq_factor > 0
    if self.rope_scaling == "llama3" and not llama3_ok:
      _fail(k("high_freq_factor"), self.high_freq_factor,
            f"llama3 RoPE needs rope_factor >= 1 and high_freq_factor > low_freq_factor={self.low_freq_factor} > 0")
    if self.attention == "gqa":
      self._validate_gqa(k)
    if self.norm_eps <= 0:
      _fail(k("norm_eps"), self.norm_eps, "must be positive")
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
        _fail(k(f"fp8.{part}"), True, f"input dims {bad} are not multiples of model.fp8.block={self.fp8.block}; "
              f"set model.fp8.{part}=false or another block")

  def _validate_gqa(self, k):
    if self.head_dim <= 0 or self.head_dim % 2:
      _fail(k("head_dim"), self.head_dim, "attention=gqa needs a positive, even head_dim (RoPE rotates pairs)")
    if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
      _fail(k("n_kv_heads"), self.n_kv_heads, f"attention=gqa needs n_kv_heads dividing model.n_heads={self.n_heads}")

  def _validate_moe(self, k):
    e = self.n_routed_experts
    if e <= 0:
      _fail(k("n_routed_experts"), e, "MoE layers (n_dense_layers < n_layers, or MTP) need routed experts")
    if not 0 < self.n_activated_experts <= e:
      _fail(k("n_activated_experts"), self.n_activated_experts,
            f"top-k must be in [1, model.n_routed_experts={e}]")
    if self.n_expert_groups <= 0 or e % self.n_expert_groups:
      _fail(k("n_expert_groups"), self.n_expert_groups, f"must divide model.n_routed_experts={e}")
    if not 0 < self.n_limited_groups <= self.n_expert_groups:
      _fail(k("n_limited_groups"), self.n_limited_groups,
            f"top-k groups must be in [1, model.n_expert_groups={self.n_expert_groups}]")
    reachable = self.n_limited_groups * (e // self.n_expert_groups)
    if self.n_activated_experts > reachable:
      _fail(k("n_activated_experts"), self.n_activated_experts,
            f"exceeds the {reachable} experts in the n_limited_groups={self.n_limited_groups} selected groups")
    if self.score_func == "sigmoid" and self.n_expert_groups > 1 and e // self.n_expert_groups < 2:
      _fail(k("n_expert_groups"), self.n_expert_groups, "sigmoid group scores sum each group's top-2 experts,"
            " so every group needs >= 2 experts")
    if self.moe_inter_dim <= 0:
      _fail(k("moe_inter_dim"), self.moe_inter_dim, "must be positive")
    if self.capacity_factor < 0:
      _fail(k("capacity_factor"), self.capacity_factor, "must be >= 0 (0: dropless)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; -1 means "all remaining devices" (at most one axis)."""

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  def validate(self, prefix: str = "mesh"):
    sizes = dataclasses.asdict(self)
    for name, size in sizes.items():
      if size == 0 or size < -1:
        _fail(f"{prefix}.{name}", size, "must be a positive axis size or -1 (the rest)")
    if sum(s == -1 for s in sizes.values()) > 1:
      _fail(prefix, sizes, "at most one axis may be -1")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warmup + cosine decay (V3 report §4.2 uses AdamW, beta2 0.95, weight decay 0.1)."""

  lr: float = 3e-3
  warmup_steps: int = 10
  decay_steps: int = 1000
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  grad_clip: float = 1.0

  def validate(self, prefix: str = "optim"):
    if self.lr <= 0:
      _fail(f"{prefix}.lr", self.lr, "must be positive")
    if self.warmup_steps < 0 or self.decay_steps <= 0:
      _fail(f"{prefix}.decay_steps", self.decay_steps, "must be positive (and warmup_steps >= 0)")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      _fail(f"{prefix}.b2", self.b2, "Adam betas must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop: how long, how big a batch, where to write."""

  steps: int = 60
  batch_size: int = 16  # global rows per optimizer step (all micro-batches together)
  seq_len: int = 64
  grad_accum: int = 1  # micro-batches per optimizer step; batch_size must divide by it
  seed: int = 0
  log_every: int = 5
  max_bad_steps: int = 3  # non-finite loss/grads this many steps in a row stops the run
  run_dir: str = "runs"  # a run writes to run_dir/name
  name: str = ""  # "": the config file's stem

  def validate(self, prefix: str = "train"):
    for name in ["steps", "batch_size", "seq_len", "log_every", "grad_accum", "max_bad_steps"]:
      if getattr(self, name) <= 0:
        _fail(f"{prefix}.{name}", getattr(self, name), "must be positive")
    if self.batch_size % self.grad_accum:
      _fail(f"{prefix}.grad_accum", self.grad_accum, f"must divide train.batch_size={self.batch_size}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where SFT examples come from and how they become token batches (data.py, tokenizer.py)."""

  # "task:<copy|reverse|sort>" (generated digit strings, no files), "rl:<task>" (a tasks.py problem in
  # `template` with its cold-start completion `<think>trace</think><answer>...</answer>`), or a JSONL file
  source: str = "task:copy"
  template: Literal["r1zero", "short"] = "short"  # prompt template of tasks.py problems
  eval_source: str = ""  # optional held-out JSONL or task
  tokenizer: str = "bytes"  # "bytes" (built in, no files) or a `tokenizers` JSON file
  pack: bool = True  # several examples per row, with segment ids and per-segment positions
  shuffle: bool = True
  seed: int = 0
  task_examples: int = 100_000  # examples a generated task dataset holds (an epoch)
  task_digits: int = 8  # digits per generated task example

  def validate(self, prefix: str = "data"):
    if not self.source:
      _fail(f"{prefix}.source", self.source, "must be task:<name>, rl:<task> or a JSONL path")
    for name in ["task_examples", "task_digits"]:
      if getattr(self, name) <= 0:
        _fail(f"{prefix}.{name}", getattr(self, name), "must be positive")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints of a run (checkpoint.py): TrainState, data iterator state and config."""

  every: int = 50  # steps between saves (and one at the end, and on SIGTERM/SIGINT)
  keep: int = 3  # newest complete checkpoints kept
  async_save: bool = True

  def validate(self, prefix: str = "checkpoint"):
    for name in ["every", "keep"]:
      if getattr(self, name) <= 0:
        _fail(f"{prefix}.{name}", getattr(self, name), "must be positive")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Generation with a KV cache (sampler.py). temperature 0 is greedy."""

  max_new_tokens: int = 64  # the token budget of each call (per row)
  temperature: float = 1.0
  top_p: float = 1.0  # nucleus: the smallest set of tokens with probability >= top_p (1: off)
  top_k: int = 0  # 0: off
  steps_per_call: int = 16  # decode steps per compiled call (progress is reported between calls)
  speculative: bool = False  # greedy only: the MTP module drafts one token per step (V3 report §5.4.3)
  # MoE capacity while sampling. 0 (dropless) by default: with a few tokens per shard per decode step, a
  # capacity factor drops pairs routinely and a row's sample would depend on its batch-mates.
  capacity_factor: float = 0.0

  def validate(self, prefix: str = "sampler"):
    if self.max_new_tokens <= 0 or self.steps_per_call <= 0:
      _fail(f"{prefix}.max_new_tokens", self.max_new_tokens, "must be positive (and steps_per_call too)")
    if self.temperature < 0:
      _fail(f"{prefix}.temperature", self.temperature, "must be >= 0 (0: greedy)")
    if not 0 < self.top_p <= 1:
      _fail(f"{prefix}.top_p", self.top_p, "must be in (0, 1]")
    if self.top_k < 0:
      _fail(f"{prefix}.top_k", self.top_k, "must be >= 0 (0: off)")
    if self.capacity_factor < 0:
      _fail(f"{prefix}.capacity_factor", self.capacity_factor, "must be >= 0 (0: dropless)")
    if self.speculative and self.temperature != 0:
      _fail(f"{prefix}.speculative", self.speculative, "MTP speculative decoding is greedy: set sampler.temperature=0")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Group-relative policy optimisation (DeepSeekMath §4; R1) and its variants (DAPO, Dr.GRPO, GSPO, RLOO)."""

  task: str = "reverse"  # tasks.py name: countdown, arith, copy, reverse, sort (prompt template: data.template)
  init: str = ""  # checkpoint or run directory to start from; "" trains from scratch, base_steps of SFT first
  base_steps: int = 0  # without init: SFT steps on the task's cold-start text (R1-Zero's "base model" stage)
  lr: float = 0.0  # the GRPO stage's peak learning rate (0: optim.lr); RL wants far smaller steps than SFT
  rewards: str = "accuracy:1.0,format:0.1"  # name:weight, comma-separated (rl.rewards registry)
  prompts_per_step: int = 8
  group_size: int = 8  # completions per prompt
  advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
  adv_eps: float = 1e-6  # GRPO: (r - mean) / (std + eps)
  zero_variance: Literal["count", "filter"] = "count"  # filter: DAPO dynamic sampling, resample to fill
  max_resample_rounds: int = 3
  loss: Literal["token", "sequence"] = "token"  # token: GRPO/DAPO clipped ratio; sequence: GSPO
  aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
  clip_low: float = 0.2
  clip_high: float = 0.28  # DAPO clip-higher
  kl_beta: float = 0.0  # k3 KL to the frozen reference; 0 skips the reference forward
  mu: int = 1  # optimisation iterations per batch of rollouts (on stored old log-probs)
  tis_cap: float = 2.0  # truncated importance sampling cap C for the sampler/learner gap (0: off)
  routing_replay: bool = True  # the learner routes completion tokens to the sampler's experts
  mask_truncated: bool = False  # completions cut by the token budget leave the loss
  overlong_buffer: int = 0  # DAPO overlong shaping over the last this-many tokens of the budget (0: off)
  eval_every: int = 10
  eval_prompts: int = 64
  log_samples_every: int = 10

  def validate(self, prefix: str = "grpo"):
    if self.base_steps < 0:
      _fail(f"{prefix}.base_steps", self.base_steps, "must be >= 0")
    for name in ["prompts_per_step", "group_size", "mu", "eval_every", "eval_prompts", "log_samples_every",
                 "max_resample_rounds"]:
      if getattr(self, name) <= 0:
        _fail(f"{prefix}.{name}", getattr(self, name), "must be positive")
    if self.group_size < 2:
      _fail(f"{prefix}.group_size", self.group_size, "group advantages need >= 2 completions per prompt")
    for name in ["clip_low", "clip_high", "kl_beta", "tis_cap", "adv_eps", "overlong_buffer", "lr"]:
      if getattr(self, name) < 0:
        _fail(f"{prefix}.{name}", getattr(self, name), "must be >= 0")
    for item in self.rewards.split(","):
      name, sep, weight = item.partition(":")
      if not name.strip() or not sep:
        _fail(f"{prefix}.rewards", self.rewards, f"entry {item!r}: expected name:weight")
      _float_from_str(f"{prefix}.rewards", weight)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The R1 pipeline (rl/pipeline.py, R1 paper §2.3): stages run in order, each from the final checkpoint of
  the stage it builds on. Stages: base (SFT on direct answers: `<think></think><answer>..`), r1zero (GRPO from
  base), cold_start (SFT of base on a few reasoning traces), rl (GRPO from cold_start), rejection (correct,
  well-formed samples of rl -> JSONL), sft (SFT of base on them), final_rl (GRPO from sft), distill (SFT of
  the dense `student` preset from scratch on them). The task and GRPO settings are the grpo section's."""

  stages: str = "base,r1zero,cold_start,rl,rejection,sft,final_rl,distill"
  base_steps: int = 120
  r1zero_steps: int = 40
  cold_start_examples: int = 200  # the small cold-start set of traces
  cold_start_steps: int = 40
  rl_steps: int = 40
  rejection_prompts: int = 256
  rejection_k: int = 4  # samples per prompt
  sft_steps: int = 80
  final_rl_steps: int = 20
  student: str = "configs/tiny_dense_student.yaml"  # a preset whose model section is the distilled student
  distill_steps: int = 120
  eval_prompts: int = 128
  eval_k: int = 4  # pass@k in the report

  STAGES = ("base", "r1zero", "cold_start", "rl", "rejection", "sft", "final_rl", "distill")

  def validate(self, prefix: str = "pipeline"):
    for name in self.stages.split(","):
      if name.strip() not in self.STAGES:
        _fail(f"{prefix}.stages", self.stages, f"unknown stage {name.strip()!r}; known: {list(self.STAGES)}")
    for f in dataclasses.fields(self):
      if f.type in ("int", int) and getattr(self, f.name) <= 0:
        _fail(f"{prefix}.{f.name}", getattr(self, f.name), "must be positive")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  sampler: SamplerConfig = SamplerConfig()
  grpo: GRPOConfig = GRPOConfig()
  pipeline: PipelineConfig = PipelineConfig()

  def validate(self):
    for f in dataclasses.fields(self):
      getattr(self, f.name).validate(f.name)
    if self.train.seq_len > self.model.max_seq_len:
      _fail("train.seq_len", self.train.seq_len, f"exceeds model.max_seq_len={self.model.max_seq_len}")
    return self


def _float_from_str(key: str, text: str) -> float:
  """PyYAML (YAML 1.1) reads `3e-4` as a string: accept any text Python parses as a finite float."""
  try:
    value = float(text)
  except ValueError:
    _fail(key, text, "must be a number")
  if not math.isfinite(value):
    _fail(key, text, "must be a finite number, not nan or inf")
  return value


def _coerce(key: str, value, hint):
  """Check `value` against a field's type hint (ints and numeric strings such as "3e-4" become floats)."""
  origin = typing.get_origin(hint)
  if origin is Literal:
    if value not in typing.get_args(hint):
      _fail(key, value, f"must be one of {list(typing.get_args(hint))}")
    return value
  if origin in (typing.Union, types.UnionType):
    for arg in typing.get_args(hint):
      try:
        return _coerce(key, value, arg)
      except ConfigError:
        pass
    _fail(key, value, f"must be {hint}")
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint is float and isinstance(value, str):
    return _float_from_str(key, value)
  if hint is type(None) and value is None:
    return None
  if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
    _fail(key, value, f"must be of type {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
  if hint is float and not math.isfinite(value):
    _fail(key, value, "must be a finite number, not nan or inf")
  return value


def _replace(obj, updates: dict, prefix: str):
  """dataclasses.replace with unknown-key and type checks, recursing into nested sections."""
  if not isinstance(updates, dict):
    _fail(prefix, updates, "must be a mapping of fields")
  hints = typing.get_type_hints(type(obj))
  fields = {f.name for f in dataclasses.fields(obj)}
  changes = {}
  for name, value in updates.items():
    key = f"{prefix}.{name}" if prefix else str(name)
    if name not in fields:
      _fail(key, value, f"unknown key; known: {sorted(fields)}")
    current = getattr(obj, name)
    if dataclasses.is_dataclass(current):
      changes[name] = _replace(current, value, key)
    else:
      changes[name] = _coerce(key, value, hints[name])
  return dataclasses.replace(obj, **changes)


def parse_override(text: str) -> tuple[list[str], object]:
  """`model.n_routed_experts=16` -> (["model", "n_routed_experts"], 16); values are parsed as YAML."""
  if "=" not in text:
    raise ConfigError(f"override {text!r}: expected section.field=value")
  key, raw = text.split("=", 1)
  return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
  """Read a YAML of overrides onto the dataclass defaults, apply `k=v` overrides, validate."""
  updates: dict = {}
  if path is not None:
    path = Path(path)
    if not path.exists():
      raise ConfigError(f"config file {path} does not exist")
    try:
      updates = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
      line = getattr(getattr(e, "problem_mark", None), "line", None)
      raise ConfigError(f"{path}:{'' if line is None else line + 1}: invalid YAML ({getattr(e, 'problem', e)})") from None
  try:
    cfg = _replace(RunConfig(), updates, "")
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  return apply_overrides(cfg, overrides)


def apply_overrides(cfg: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
  """Apply `section.field=value` overrides (same checks as YAML) and validate."""
  for text in overrides:
    keys, value = parse_override(text)
    nested: dict = {keys[-1]: value}
    for name in reversed(keys[:-1]):
      nested = {name: nested}
    cfg = _replace(cfg, nested, "")
  return cfg.validate()


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)
