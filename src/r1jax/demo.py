"""The CPU demo loop: SFT of a config on a built-in digit task, printing a falling loss."""

from __future__ import annotations

import time
from collections.abc import Iterator

import jax
import numpy as np

from r1jax import sharding, train
from r1jax.config import RunConfig
from r1jax.rl import tasks


def sft_steps(cfg: RunConfig, mesh, steps: int) -> Iterator[tuple[int, train.TrainState, dict]]:
  """Yield (step, state, metrics) for `steps` SFT steps on fresh digit batches; call under jax.set_mesh.

  Every process builds the same host batch and feeds only its own shards (sharding.global_batch), so the
  same loop runs on one host or many.
  """
  sharding.validate_mesh(cfg.model, mesh, cfg.train.batch_size)
  rng = np.random.default_rng(cfg.train.seed)
  state = train.init_state(cfg, jax.random.key(cfg.train.seed), mesh)
  step_fn = None
  for step in range(1, steps + 1):
    batch = sharding.global_batch(tasks.digit_batch(rng, cfg.train.task, cfg.train.batch_size, cfg.train.seq_len),
                                  mesh)
    step_fn = step_fn or train.jit_sft_step(state, batch, mesh)
    state, metrics = step_fn(state, batch)
    yield step, state, metrics


def run_sft(cfg: RunConfig) -> int:
  mesh = sharding.make_mesh(cfg.mesh)
  print(f"mesh {dict(mesh.shape)} on {len(jax.devices())} {jax.devices()[0].platform} devices")
  with jax.set_mesh(mesh):
    start, timed = time.perf_counter(), 0
    for step, _, metrics in sft_steps(cfg, mesh, cfg.train.steps):
      if step == 1:
        jax.block_until_ready(metrics)
        print(f"step 1 (with compilation) took {time.perf_counter() - start:.1f}s", flush=True)
        start = time.perf_counter()
      else:
        timed += 1
      if step % cfg.train.log_every == 0 or step == 1:
        m = jax.device_get(metrics)
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"step {step}: loss is {m['loss']}")
        per_step = f"{(time.perf_counter() - start) / timed:.3f}s/step" if timed else ""
        print(f"step {step:4d}  loss {m['loss']:.4f}  ce {m['ce']:.4f}  mtp {m.get('mtp_loss', 0):.4f}  "
              f"load max/mean {m.get('expert_load_max_over_mean', 0):.2f}  {per_step}", flush=True)
  return 0
