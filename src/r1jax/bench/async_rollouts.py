"""`r1jax bench async`: R1-Zero with synchronous vs asynchronous rollouts (grpo.async_rollouts), per seed from
one shared base checkpoint: GRPO steps per second, eval accuracy after GRPO, and the off-policy metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from r1jax import config as config_lib
from r1jax import loop
from r1jax.config import RunConfig
from r1jax.rl import pipeline

# One step behind on half the devices: rollouts of step k overlap the learner's step k - 1.
DEFAULT_ARMS = {"async": ["grpo.async=true", "mesh.rollout_devices=-2", "grpo.max_staleness=1"]}


def _arm_config(cfg: RunConfig, overrides: list[str], base_dir: Path) -> RunConfig:
  """cfg with an arm's overrides (mesh.rollout_devices=-2 means half the devices) and grpo.init the base."""
  overrides = [o.replace("mesh.rollout_devices=-2", f"mesh.rollout_devices={jax.device_count() // 2}")
               for o in overrides]
  cfg = config_lib.apply_overrides(cfg, overrides)
  return dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, init=str(base_dir), base_steps=0))


def _grpo_numbers(grpo_dir: Path) -> dict:
  rows = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
  before = json.loads((grpo_dir / "eval_before.json").read_text())["accuracy"]
  # Wall clock between the end of step 1 (compilation) and the end of the second-to-last step (the last one
  # runs the final evaluation): steady-state steps per second, rollouts and learning together.
  timed = rows[1:-1]
  steps_per_s = len(timed) / (timed[-1]["time"] - rows[0]["time"]) if timed else float("nan")
  mean = lambda key: float(np.mean([r[key] for r in rows if key in r])) if any(key in r for r in rows) else None  # noqa: E731
  return {"eval_before": before, "eval_accuracy": rows[-1]["eval_accuracy"], "steps_per_s": steps_per_s,
          "learner_wait_s": mean("data_s"), "learner_step_s": mean("step_s"), "staleness": mean("staleness"),
          "sampler_learner_kl": mean("sampler_learner_kl"), "tis_mean": mean("tis_mean"),
          "off_policy_masked_frac": mean("off_policy_masked_frac"), "reward_accuracy_last10":
          float(np.mean([r["reward_accuracy"] for r in rows[-10:]])) if "reward_accuracy" in rows[0] else None}


def _spread(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
          "values": values}


def bench_async(cfg: RunConfig, run_dir, seeds: int = 3, arms: dict[str, list[str]] | None = None) -> dict:
  """For train.seed, train.seed + 1, ...: the base stage once (SEED/base), then GRPO from it once per arm
  ("sync": the config as given; the others: their overrides), each in SEED/ARM/. Returns per-arm, per-seed
  numbers and each arm's mean, min and max over the seeds."""
  run_dir = Path(run_dir)
  arms = {"sync": [], **(DEFAULT_ARMS if arms is None else arms)}
  per_seed: dict[str, dict[int, dict]] = {name: {} for name in arms}
  for seed in range(cfg.train.seed, cfg.train.seed + seeds):
    seed_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    base_dir = run_dir / f"seed-{seed}" / "base"
    if not (base_dir / "checkpoints").is_dir():
      loop.fit(pipeline.base_config(seed_cfg), base_dir)
    for name, overrides in arms.items():
      arm_dir = run_dir / f"seed-{seed}" / name
      print(f"==== seed {seed}, {name}: {' '.join(overrides) or '(as configured)'}", flush=True)
      pipeline.r1_zero(_arm_config(seed_cfg, overrides, base_dir), arm_dir)
      per_seed[name][seed] = _grpo_numbers(arm_dir / "grpo")
  summary = {name: {key: _spread([r[key] for r in runs.values()])
                    for key in ("eval_accuracy", "steps_per_s")} for name, runs in per_seed.items()}
  return {"bench": "async", "task": cfg.grpo.task, "platform": jax.devices()[0].platform,
          "devices": jax.device_count(), "grpo_steps": cfg.train.steps, "eval_prompts": cfg.grpo.eval_prompts,
          "arms": arms, "summary": summary, "per_seed": per_seed}
