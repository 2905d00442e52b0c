"""The R1 recipe as stages of the one training loop, each in its own run directory under the run:
R1-Zero is `base/` (optional SFT on a task's cold-start text, standing in for a pretrained base model) then
`grpo/` (GRPO with rule-based rewards from that checkpoint, or from `grpo.init`)."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax

from r1jax import checkpoint, loop, sharding
from r1jax.config import ConfigError, RunConfig
from r1jax.rl import grpo, rollouts


def base_config(cfg: RunConfig) -> RunConfig:
  """The base stage: SFT on `rl:<task>` text for grpo.base_steps steps."""
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=f"rl:{cfg.grpo.task}"),
                             train=dataclasses.replace(cfg.train, steps=cfg.grpo.base_steps))


def grpo_config(cfg: RunConfig) -> RunConfig:
  """The GRPO stage: optim.lr replaced by grpo.lr when that is set."""
  if not cfg.grpo.lr:
    return cfg
  return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.grpo.lr))


def _stage_done(run_dir: Path, steps: int) -> bool:
  directory = run_dir / "checkpoints"
  return directory.is_dir() and checkpoint.Manager(directory).steps()[-1:] == [steps]


def _ref_logp_fn(ref_params, cfg: RunConfig):
  """Log-probs of the frozen reference (the starting checkpoint) for the k3 KL term."""
  model_cfg = dataclasses.replace(cfg.model, n_mtp=0)
  fn = jax.jit(lambda p, b: grpo.learner_logp(p, b, model_cfg, cfg.sampler.temperature, cfg.grpo.routing_replay)[0])
  return lambda batch: fn(ref_params, batch)


def r1_zero(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False) -> list[dict]:
  """Base stage (unless grpo.init names a checkpoint), then GRPO; returns the GRPO stage's metrics."""
  run_dir, g = Path(run_dir), cfg.grpo
  if cfg.train.grad_accum != 1:
    raise ConfigError(f"train.grad_accum={cfg.train.grad_accum}: a GRPO step is one batch of "
                      "grpo.prompts_per_step x grpo.group_size rollouts (grad_accum applies to SFT only)")
  init_dir = g.init or None
  if not init_dir and g.base_steps:
    base_dir = run_dir / "base"
    if not _stage_done(base_dir, g.base_steps):
      loop.fit(base_config(cfg), base_dir, resume=resume and (base_dir / "checkpoints").is_dir())
    init_dir = base_dir
  if g.kl_beta > 0 and not init_dir:
    raise ConfigError(f"grpo.kl_beta={g.kl_beta}: the KL reference is the starting checkpoint; set grpo.init "
                      "or grpo.base_steps")
  cfg = grpo_config(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    init_params = checkpoint.load_params(init_dir, cfg, mesh) if init_dir else None
    grpo_dir = run_dir / "grpo"
    grpo_dir.mkdir(parents=True, exist_ok=True)
    if init_params is not None and not resume:
      before = rollouts.evaluate(init_params, cfg, g.eval_prompts)
      (grpo_dir / "eval_before.json").write_text(json.dumps(before))
      print(f"before GRPO: eval accuracy {before['accuracy']:.3f}, format {before['format']:.3f}", flush=True)
    ref_fn = _ref_logp_fn(init_params, cfg) if g.kl_beta > 0 else None
    source = rollouts.RolloutSource(cfg, mesh, ref_fn, samples_path=grpo_dir / "samples.jsonl")
  step_fn = functools.partial(grpo.grpo_step, gcfg=g, temperature=cfg.sampler.temperature,
                              norm_len=cfg.sampler.max_new_tokens)

  def after_step(step: int, state) -> dict:
    if step % g.eval_every and step != cfg.train.steps:
      return {}
    return {f"eval_{k}": v for k, v in rollouts.evaluate(state.params, cfg, g.eval_prompts).items() if k != "n"}

  return loop.fit(cfg, grpo_dir, resume=resume, step_fn=step_fn, source=source, init_params=init_params,
                  after_step=after_step)
