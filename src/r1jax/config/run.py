"""The run's sections beside the model: mesh, optimizer, training loop, data, checkpoints, sampler, GRPO and the
R1 pipeline, and RunConfig, which holds them all."""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

from r1jax.config.errors import fail
from r1jax.config.compute import ComputeConfig
from r1jax.config.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; -1 means "all remaining devices" (at most one axis)."""

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  context: int = 1  # splits each sequence (context parallelism for long sequences)
  tensor: int = 1
  # GRPO with grpo.async_rollouts: this many devices sample, the rest learn; each sub-mesh resolves the axis
  # sizes above over its own devices (0: no split).
  rollout_devices: int = 0

  def axes(self) -> dict[str, int]:
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "rollout_devices"}

  def validate(self, prefix: str = "mesh"):
    if self.rollout_devices < 0:
      fail(f"{prefix}.rollout_devices", self.rollout_devices, "must be >= 0 (0: no sampler sub-mesh)")
    sizes = self.axes()
    for name, size in sizes.items():
      if size == 0 or size < -1:
        fail(f"{prefix}.{name}", size, "must be a positive axis size or -1 (the rest)")
    if sum(s == -1 for s in sizes.values()) > 1:
      fail(prefix, sizes, "at most one axis may be -1")


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
      fail(f"{prefix}.lr", self.lr, "must be positive")
    if self.warmup_steps < 0 or self.decay_steps <= 0:
      fail(f"{prefix}.decay_steps", self.decay_steps, "must be positive (and warmup_steps >= 0)")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      fail(f"{prefix}.b2", self.b2, "Adam betas must be in [0, 1)")


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
        fail(f"{prefix}.{name}", getattr(self, name), "must be positive")
    if self.batch_size % self.grad_accum:
      fail(f"{prefix}.grad_accum", self.grad_accum, f"must divide train.batch_size={self.batch_size}")


class DataSource(NamedTuple):
  """data.source as a kind and its argument: `task:<copy|reverse|sort>` (generated digit strings, no files),
  `rl:<task>` (a tasks.py problem in data.template with its cold-start completion
  `<think>trace</think><answer>...</answer>`), `rl-direct:<task>` (the same problems answered directly,
  `<think></think><answer>...</answer>`: the pipeline's base stage), or a JSONL file path."""

  kind: Literal["task", "rl", "rl-direct", "jsonl"]
  arg: str

  @classmethod
  def parse(cls, text: str, key: str = "data.source") -> DataSource:
    kind, sep, arg = text.partition(":")
    if sep and kind in ("task", "rl", "rl-direct"):
      if not arg:
        fail(key, text, f"{kind}: needs a task name")
      return cls(kind, arg)
    if not text:
      fail(key, text, "must be task:<name>, rl:<task>, rl-direct:<task> or a JSONL path")
    return cls("jsonl", text)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where SFT examples come from and how they become token batches (data.py, tokenizer.py)."""

  source: str = "task:copy"  # a DataSource: task:<name>, rl:<task>, rl-direct:<task> or a JSONL path
  # How a question becomes a prompt: short "{question}\n" (tiny byte-level models), r1zero (R1's template for
  # base models), raw (as written), chat (one user turn through the tokenizer's chat template; problems only)
  template: Literal["r1zero", "short", "raw", "chat"] = "short"
  eval_source: str = ""  # optional held-out JSONL or task
  # "bytes" (built in, no files), a `tokenizers` JSON file, or a Hugging Face tokenizer directory
  tokenizer: str = "bytes"
  # RL problems from a JSONL file instead of grpo.task (rl/problems.py): per line "prompt" or "messages",
  # "answer", optional "verifier", "id" and metadata. eval_problems: a held-out file; without one, eval_share
  # of the problems (by a hash of id, else prompt) are held out.
  problems: str = ""
  eval_problems: str = ""
  eval_share: float = 0.1
  skip_bad_problems: bool = False  # skip malformed problem lines (counted and reported) instead of failing
  pack: bool = True  # several examples per row, with segment ids and per-segment positions
  shuffle: bool = True
  seed: int = 0
  task_examples: int = 100_000  # examples a generated task dataset holds (an epoch)
  task_digits: int = 8  # digits per generated task example

  def validate(self, prefix: str = "data"):
    DataSource.parse(self.source, f"{prefix}.source")
    if self.eval_source:
      DataSource.parse(self.eval_source, f"{prefix}.eval_source")
    for name in ["task_examples", "task_digits"]:
      if getattr(self, name) <= 0:
        fail(f"{prefix}.{name}", getattr(self, name), "must be positive")
    if not 0 <= self.eval_share < 1:
      fail(f"{prefix}.eval_share", self.eval_share, "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints of a run (checkpoint.py): TrainState, data iterator state and config."""

  every: int = 50  # steps between saves (and one at the end, and on SIGTERM/SIGINT)
  keep: int = 3  # newest complete checkpoints kept
  async_save: bool = True

  def validate(self, prefix: str = "checkpoint"):
    for name in ["every", "keep"]:
      if getattr(self, name) <= 0:
        fail(f"{prefix}.{name}", getattr(self, name), "must be positive")


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
  # Rollouts (GRPO's, rejection sampling's): 0 decodes all prompts as one static batch; N > 0 decodes them in
  # N slots refilled as rows finish (continuous_batching.py), the same samples for the same key.
  slots: int = 0
  # Rollouts decode from e4m3 weights with compute.fp8.block^2 scales, made once per rollout from the learner's
  # (model.fp8_weights), in compute.fp8's recipe (enabled for the sampler even where training is bf16): half
  # the bytes per decode step. The learner's recomputed log-probs differ; grpo.tis_cap covers the gap.
  fp8_weights: bool = False
  # Decode reads each layer's weights from arrays of their own (model.per_layer), made once per generate call:
  # the weights twice in memory while sampling. false decodes from the stacked weights in a layer scan, whose
  # per-layer slices a GPU copies every step (docs/perf.md: 49% of a decode step on an H100).
  per_layer_weights: bool = True

  def validate(self, prefix: str = "sampler"):
    if self.max_new_tokens <= 0 or self.steps_per_call <= 0:
      fail(f"{prefix}.max_new_tokens", self.max_new_tokens, "must be positive (and steps_per_call too)")
    if self.temperature < 0:
      fail(f"{prefix}.temperature", self.temperature, "must be >= 0 (0: greedy)")
    if not 0 < self.top_p <= 1:
      fail(f"{prefix}.top_p", self.top_p, "must be in (0, 1]")
    if self.top_k < 0:
      fail(f"{prefix}.top_k", self.top_k, "must be >= 0 (0: off)")
    if self.capacity_factor < 0:
      fail(f"{prefix}.capacity_factor", self.capacity_factor, "must be >= 0 (0: dropless)")
    if self.slots < 0:
      fail(f"{prefix}.slots", self.slots, "must be >= 0 (0: one static batch)")
    if self.slots and self.speculative:
      fail(f"{prefix}.slots", self.slots, "continuous batching does not run MTP speculative decoding")
    if self.speculative and self.temperature != 0:
      fail(f"{prefix}.speculative", self.speculative, "MTP speculative decoding is greedy: set sampler.temperature=0")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Group-relative policy optimisation (DeepSeekMath §4; R1) and its variants (DAPO, Dr.GRPO, GSPO, RLOO)."""

  task: str = "reverse"  # tasks.py name: countdown, arith, copy, reverse, sort (prompt template: data.template)
  init: str = ""  # checkpoint or run directory to start from; "" trains from scratch, base_steps of SFT first
  base_steps: int = 0  # without init: SFT steps on the task's cold-start text (R1-Zero's "base model" stage)
  lr: float = 0.0  # the GRPO stage's peak learning rate (0: optim.lr); RL wants far smaller steps than SFT
  # (name, weight) of rl.rewards' registry; YAML takes {name: weight}, an override `accuracy:1.0,format:0.1`
  rewards: tuple[tuple[str, float], ...] = (("accuracy", 1.0), ("format", 0.1))
  verifier: str = "math"  # accuracy of a data.problems record without its own "verifier" (rl/verifiers.py)
  language: str = "en"  # the `language` reward's target: a language code (en, zh, ru, ...) or a script name
  prompts_per_step: int = 8
  group_size: int = 8  # completions per prompt
  advantage: str = "grpo"  # rl.grpo.ADVANTAGES: grpo, dr_grpo, rloo, or one registered by name
  adv_eps: float = 1e-6  # GRPO: (r - mean) / (std + eps)
  zero_variance: Literal["count", "filter"] = "count"  # filter: DAPO dynamic sampling, resample to fill
  max_resample_rounds: int = 3
  loss: str = "token"  # rl.grpo.RATIO_LOSSES: token (GRPO/DAPO clipped ratio), sequence (GSPO), or registered
  aggregation: str = "token_mean"  # rl.grpo.AGGREGATIONS: token_mean, seq_mean_token_mean, seq_mean_token_sum_norm
  clip_low: float = 0.2
  clip_high: float = 0.28  # DAPO clip-higher
  kl_beta: float = 0.0  # KL to the frozen reference; 0 skips the reference forward
  kl_estimator: Literal["k3", "unbiased_k3"] = "k3"  # unbiased_k3: weighted by pi_theta/pi_old (V3.2 §3.1)
  mu: int = 1  # optimisation iterations per batch of rollouts (on stored old log-probs)
  tis_cap: float = 2.0  # truncated importance sampling cap C for the sampler/learner gap (0: off)
  tis_level: Literal["token", "sequence"] = "token"  # sequence: one weight per sequence (geometric mean)
  tis_mode: Literal["truncate", "mask"] = "truncate"  # mask: weights over the cap are 0 (MIS), not the cap
  off_policy_mask: float = 0.0  # delta of V3.2's off-policy sequence masking (negative advantages; 0: off)
  keep_sampling_mask: bool = False  # learner log-probs renormalised over the sampler's top-k/top-p set (V3.2)
  routing_replay: bool = True  # the learner routes completion tokens to the sampler's experts
  mask_truncated: bool = False  # completions cut by the token budget leave the loss
  overlong_buffer: int = 0  # DAPO overlong shaping over the last this-many tokens of the budget (0: off)
  eval_every: int = 10
  eval_prompts: int = 64
  log_samples_every: int = 10
  # Asynchronous rollouts (rl/async_rollouts.py): a sampler sub-mesh of mesh.rollout_devices samples ahead of
  # the learner; rollout k uses weights at most max_staleness updates old, pushed every sync_every updates.
  async_rollouts: bool = False  # (`async` is a Python keyword)
  sync_every: int = 1
  max_staleness: int = 0

  def validate(self, prefix: str = "grpo"):
    if self.base_steps < 0:
      fail(f"{prefix}.base_steps", self.base_steps, "must be >= 0")
    for name in ["prompts_per_step", "group_size", "mu", "eval_every", "eval_prompts", "log_samples_every",
                 "max_resample_rounds"]:
      if getattr(self, name) <= 0:
        fail(f"{prefix}.{name}", getattr(self, name), "must be positive")
    if self.group_size < 2:
      fail(f"{prefix}.group_size", self.group_size, "group advantages need >= 2 completions per prompt")
    if self.sync_every <= 0:
      fail(f"{prefix}.sync_every", self.sync_every, "must be positive")
    if self.max_staleness < self.sync_every - 1:
      fail(f"{prefix}.max_staleness", self.max_staleness, f"must be >= grpo.sync_every - 1 = "
           f"{self.sync_every - 1}: weights pushed every {self.sync_every} updates are that old between pushes")
    for name in ["clip_low", "clip_high", "kl_beta", "tis_cap", "adv_eps", "overlong_buffer", "lr", "off_policy_mask",
                 "max_staleness"]:
      if getattr(self, name) < 0:
        fail(f"{prefix}.{name}", getattr(self, name), "must be >= 0")
    if not self.rewards:
      fail(f"{prefix}.rewards", self.rewards, "needs at least one reward")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The R1 pipeline (rl/pipeline.py, R1 paper §2.3): stages run in order, each from the final checkpoint of
  the stage it builds on. Stages: base (SFT on direct answers: `<think></think><answer>..`), r1zero (GRPO from
  base), cold_start (SFT of base on a few reasoning traces), rl (GRPO from cold_start), rejection (correct,
  well-formed samples of rl -> JSONL), sft (SFT of base on them), final_rl (GRPO from sft), distill (SFT of
  the dense `student` preset from scratch on them). The task and GRPO settings are the grpo section's."""

  STAGES = ("base", "r1zero", "cold_start", "rl", "rejection", "sft", "final_rl", "distill")

  stages: tuple[str, ...] = STAGES  # run in this order; YAML takes a list, an override `base,r1zero`
  base_steps: int = 120
  r1zero_steps: int = 40
  cold_start_examples: int = 200  # the small cold-start set of traces
  cold_start_data: str = ""  # an SFT JSONL of curated traces for cold_start instead of grpo.task's generated ones
  cold_start_steps: int = 40
  rl_steps: int = 40
  rejection_prompts: int = 256
  rejection_k: int = 4  # samples per prompt
  min_kept: int = 16  # fewer distinct correct samples than this is refused: SFT would memorise a handful
  sft_steps: int = 80
  final_rl_steps: int = 20
  student: str = "configs/tiny_dense_student.yaml"  # a preset whose model section is the distilled student
  distill_steps: int = 120
  eval_prompts: int = 128
  eval_k: int = 4  # pass@k in the report

  def validate(self, prefix: str = "pipeline"):
    for name in self.stages:
      if name not in self.STAGES:
        fail(f"{prefix}.stages", ",".join(self.stages), f"unknown stage {name!r}; known: {list(self.STAGES)}")
    for f in dataclasses.fields(self):
      if f.type in ("int", int) and getattr(self, f.name) <= 0:
        fail(f"{prefix}.{f.name}", getattr(self, f.name), "must be positive")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig = ModelConfig()  # the architecture: a checkpoint rebuilds the network from this alone
  compute: ComputeConfig = ComputeConfig()  # how this run computes and trains it
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
    self.compute.validate_for(self.model)
    if self.train.seq_len > self.model.max_seq_len:
      fail("train.seq_len", self.train.seq_len, f"exceeds model.max_seq_len={self.model.max_seq_len}")
    return self
