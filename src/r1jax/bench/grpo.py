"""`r1jax bench grpo`: GRPO steps with the rollout and the learner timed apart."""

from __future__ import annotations

import functools
import statistics
import time

import jax
import numpy as np

from r1jax import sharding, train
from r1jax.config import RunConfig
from r1jax.rl import grpo, pipeline, rollouts


def bench_grpo(cfg: RunConfig, steps: int = 4) -> dict:
  """GRPO steps of a fresh model (no checkpoints): the rollout (sampler + rewards + batch) and the learner
  (train.jit_step of rl.grpo.grpo_step) timed apart, as tokens/s: generated tokens per rollout second, and
  real (prompt + completion) tokens per learner second. The first step (compilation) is reported apart."""
  pipeline.check_grpo(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  step_fn = functools.partial(grpo.grpo_step, gcfg=cfg.grpo, temperature=cfg.sampler.temperature,
                              norm_len=cfg.sampler.max_new_tokens)
  rows = []
  with jax.set_mesh(mesh):
    state = train.init_state(cfg, jax.random.key(0), mesh)
    source = rollouts.RolloutSource(cfg, mesh)
    step_jit = None
    for _ in range(steps):
      t0 = time.perf_counter()
      batch, info = source.next_batch(state)
      jax.block_until_ready(batch)
      t1 = time.perf_counter()
      step_jit = step_jit or train.jit_step(step_fn, state, batch, mesh)
      state, metrics = step_jit(state, batch)
      jax.block_until_ready(metrics)
      t2 = time.perf_counter()
      generated = float(np.asarray(batch.loss_mask_BxL).sum())
      real = float(np.asarray(batch.token_mask_BxL).sum())
      rows.append({"rollout_s": t1 - t0, "learner_s": t2 - t1, "generated_tokens": generated, "real_tokens": real})
  timed = rows[1:] or rows
  med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
  return {"bench": "grpo", "platform": jax.devices()[0].platform, "devices": jax.device_count(),
          "rows": cfg.grpo.prompts_per_step * cfg.grpo.group_size, "seq_len": cfg.train.seq_len,
          "max_new_tokens": cfg.sampler.max_new_tokens, "first_step": rows[0], "steps": rows,
          "rollout_tokens_per_s": med("generated_tokens") / med("rollout_s"),
          "learner_tokens_per_s": med("real_tokens") / med("learner_s"),
          "rollout_s_median": med("rollout_s"), "learner_s_median": med("learner_s"),
          "rollout_share": med("rollout_s") / (med("rollout_s") + med("learner_s")),
          "sampler": {"slots": cfg.sampler.slots, "fp8_weights": cfg.sampler.fp8_weights}}

