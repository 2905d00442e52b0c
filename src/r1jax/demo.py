"""The CPU demo loop: SFT of a config on a built-in digit task, printing a falling loss. The same loop runs
on one process or many (`r1jax sft --coordinator ...`); process 0 prints and writes metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import jax
import numpy as np

from r1jax import model, sharding, train
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


def router_bias_replicas_equal(params: dict) -> bool:
  """Whether every local copy of every router bias is identical (each replica applied the same update)."""
  for bias in model.router_biases(params).values():
    shards = [np.asarray(s.data) for s in bias.addressable_shards]
    if not all(np.array_equal(shards[0], s) for s in shards):
      return False
  return True


def run_sft(cfg: RunConfig, metrics_path: str | None = None) -> list[dict]:
  """Train cfg.train.steps steps; process 0 prints every log_every steps and writes every step's metrics
  (JSON lines) to `metrics_path`. Returns the metrics as floats."""
  mesh = sharding.make_mesh(cfg.mesh)
  lead = jax.process_index() == 0
  print(f"process {jax.process_index()}/{jax.process_count()}: mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].platform} devices ({jax.local_device_count()} local)", flush=True)
  history = []
  with jax.set_mesh(mesh):
    start, timed = time.perf_counter(), 0
    for step, state, metrics in sft_steps(cfg, mesh, cfg.train.steps):
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(f"step {step}: loss is {m['loss']}")
      history.append(m)
      if step == 1:
        if lead:
          print(f"step 1 (with compilation) took {time.perf_counter() - start:.1f}s", flush=True)
        start = time.perf_counter()
      else:
        timed += 1
      if lead and (step % cfg.train.log_every == 0 or step == 1):
        per_step = f"{(time.perf_counter() - start) / timed:.3f}s/step" if timed else ""
        print(f"step {step:4d}  loss {m['loss']:.4f}  ce {m['ce']:.4f}  mtp {m.get('mtp_loss', 0):.4f}  "
              f"load max/mean {m.get('expert_load_max_over_mean', 0):.2f}  dropped pairs "
              f"{m.get('dropped_pairs', 0):g}  {per_step}", flush=True)
    history[-1]["router_bias_replicas_equal"] = float(router_bias_replicas_equal(state.params))
  if lead and metrics_path:
    with open(metrics_path, "w") as f:
      f.writelines(json.dumps(m) + "\n" for m in history)
  return history
