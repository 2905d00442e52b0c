"""The CPU demo loop: SFT of a config on a built-in digit task, printing a falling loss."""

from __future__ import annotations

import time

import jax
import numpy as np

from r1jax import sharding, tasks, train
from r1jax.config import RunConfig


def run_sft(cfg: RunConfig) -> int:
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.validate_mesh(cfg.model, mesh, cfg.train.batch_size)
  print(f"mesh {dict(mesh.shape)} on {len(jax.devices())} {jax.devices()[0].platform} devices")
  rng = np.random.default_rng(cfg.train.seed)
  with jax.set_mesh(mesh):
    state = train.init_state(cfg, jax.random.key(cfg.train.seed), mesh)
    new_batch = lambda: sharding.global_batch(  # noqa: E731
        tasks.digit_batch(rng, cfg.train.task, cfg.train.batch_size, cfg.train.seq_len), mesh)
    batch = new_batch()
    step_fn = train.jit_sft_step(state, batch, mesh)
    start = time.perf_counter()
    for step in range(1, cfg.train.steps + 1):
      state, metrics = step_fn(state, batch)
      if step == 1:
        jax.block_until_ready(metrics)
        print(f"step 1 (with compilation) took {time.perf_counter() - start:.1f}s", flush=True)
        start, timed = time.perf_counter(), 0
      else:
        timed += 1
      if step % cfg.train.log_every == 0 or step == 1:
        m = jax.device_get(metrics)
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"step {step}: loss is {m['loss']}")
        per_step = f"{(time.perf_counter() - start) / timed:.3f}s/step" if timed else ""
        print(f"step {step:4d}  loss {m['loss']:.4f}  ce {m['ce']:.4f}  mtp {m.get('mtp_loss', 0):.4f}  "
              f"load max/mean {m.get('expert_load_max_over_mean', 0):.2f}  {per_step}", flush=True)
      batch = new_batch()
  return 0
