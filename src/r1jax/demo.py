"""The CPU demo loop: SFT of a config on a built-in digit task, printing a falling loss."""

from __future__ import annotations

import time

import jax
import numpy as np

from r1jax import sharding, tasks, train
from r1jax.config import ConfigError, RunConfig


def run_sft(cfg: RunConfig) -> int:
  mesh = sharding.make_mesh(cfg.mesh)
  multiple = sharding.batch_size_multiple(mesh)
  if cfg.train.batch_size % multiple:
    raise ConfigError(f"train.batch_size={cfg.train.batch_size}: must be a multiple of {multiple}, the devices "
                      "that shard the batch (data*fsdp*expert)")
  print(f"mesh {dict(mesh.shape)} on {len(jax.devices())} {jax.devices()[0].platform} devices")
  rng = np.random.default_rng(cfg.train.seed)
  with jax.set_mesh(mesh):
    state = train.init_state(cfg, jax.random.key(cfg.train.seed), mesh)
    batch = tasks.digit_batch(rng, cfg.train.task, cfg.train.batch_size, cfg.train.seq_len)
    step_fn = train.jit_sft_step(state, batch, mesh)
    start = time.perf_counter()
    for step in range(1, cfg.train.steps + 1):
      state, metrics = step_fn(state, batch)
      if step % cfg.train.log_every == 0 or step == 1:
        m = jax.device_get(metrics)
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"step {step}: loss is {m['loss']}")
        print(f"step {step:4d}  loss {m['loss']:.4f}  ce {m['ce']:.4f}  mtp {m.get('mtp_loss', 0):.4f}  "
              f"load max/mean {m.get('expert_load_max_over_mean', 0):.2f}  "
              f"{(time.perf_counter() - start) / step:.2f}s/step", flush=True)
      batch = tasks.digit_batch(rng, cfg.train.task, cfg.train.batch_size, cfg.train.seq_len)
  return 0
