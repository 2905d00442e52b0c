"""`r1jax bench rl-demo`: the R1-Zero demo end to end, eval accuracy against wall-clock time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from r1jax.config import RunConfig  # noqa: E402
from r1jax.rl import pipeline  # noqa: E402


def bench_rl_demo(cfg: RunConfig, run_dir, target: float = 0.8) -> dict:
  """The R1-Zero demo end to end (base SFT stage, then GRPO; rl/pipeline.py) in `run_dir`: eval accuracy
  against wall-clock time from the start (compilation included), the time to reach `target`, and the
  GRPO stage's rollout vs learner time. Draws RUN/accuracy_vs_time.png."""
  run_dir = Path(run_dir)
  t0 = time.time()
  pipeline.r1_zero(cfg, run_dir)
  total_s = time.time() - t0
  rows = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
  before = json.loads((run_dir / "grpo" / "eval_before.json").read_text())["accuracy"]
  base_end = rows[0]["time"] - rows[0]["data_s"] - rows[0]["step_s"]  # when GRPO's first step began
  curve = [(base_end - t0, before, 0)] + [(r["time"] - t0, r["eval_accuracy"], r["step"]) for r in rows
                                           if "eval_accuracy" in r]
  reached = next((t for t, acc, _ in curve if acc >= target), None)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([t / 60 for t, _, _ in curve], [a for _, a, _ in curve], marker="o")
  ax.axhline(target, color="gray", lw=0.8, ls="--")
  ax.axvline((base_end - t0) / 60, color="gray", lw=0.8, ls=":")
  ax.set(xlabel="wall-clock minutes (base SFT stage, then GRPO)", ylabel="eval accuracy (greedy)",
         title=f"R1-Zero on {cfg.grpo.task}: {jax.device_count()} {jax.devices()[0].platform} devices")
  fig.tight_layout()
  fig.savefig(run_dir / "accuracy_vs_time.png", dpi=100)
  return {"bench": "rl-demo", "task": cfg.grpo.task, "platform": jax.devices()[0].platform,
          "devices": jax.device_count(), "total_s": total_s, "base_stage_s": base_end - t0,
          "curve": [{"seconds": t, "eval_accuracy": a, "grpo_step": s} for t, a, s in curve],
          "target": target, "seconds_to_target": reached,
          "grpo_rollout_s": sum(r["data_s"] for r in rows), "grpo_learner_s": sum(r["step_s"] for r in rows),
          "plot": str(run_dir / "accuracy_vs_time.png")}

