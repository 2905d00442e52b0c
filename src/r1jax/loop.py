"""The one training loop: data -> jitted step -> metrics -> checkpoint. `r1jax sft` runs it now; GRPO and
the R1 pipeline reuse it with their own step and batches. A run lives in one directory (config.yaml,
checkpoints/, metrics.jsonl, events/, plots/) and resumes from it exactly, data order included."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import jax
import numpy as np

from r1jax import checkpoint, data, metrics, sharding, train
from r1jax.config import ConfigError, RunConfig


class TrainingStopped(RuntimeError):
  """The run stopped itself (too many non-finite steps); the last good checkpoint is intact."""


def run_directory(cfg: RunConfig, config_path: str | Path | None) -> Path:
  name = cfg.train.name or (Path(config_path).stem if config_path else "run")
  return Path(cfg.train.run_dir) / name


@contextlib.contextmanager
def _stop_signals():
  """SIGTERM/SIGINT set a flag instead of killing the process, so the loop can save and then exit."""
  received = []
  handler = lambda signum, frame: received.append(signum)  # noqa: E731
  old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield received
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def _any_process(flag: bool) -> bool:
  """Whether any process got a stop signal: all must save the same step together."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(multihost_utils.process_allgather(np.array([flag])).any())


def fit(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, step_fn=None) -> list[dict]:
  """Train cfg.train.steps optimizer steps in `run_dir`; returns the metrics of the steps run here.

  `resume` continues from the newest readable checkpoint (a run directory with checkpoints and no
  `resume` is an error rather than being overwritten). `step_fn(state, batch)` defaults to train.sft_step.
  """
  run_dir = Path(run_dir).absolute()
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.validate_mesh(cfg.model, mesh, cfg.train.batch_size)
  lead, pid = jax.process_index() == 0, jax.process_index()
  print(f"process {pid}/{jax.process_count()}: mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].platform} devices ({jax.local_device_count()} local)", flush=True)
  mngr = checkpoint.Manager(run_dir / "checkpoints", cfg.checkpoint)
  if mngr.steps() and not resume:
    raise ConfigError(f"{run_dir} already holds checkpoints (steps {mngr.steps()}); pass --resume or choose "
                      "another train.name")
  iterator = data.make_iterator(cfg, process_index=pid, process_count=jax.process_count())
  history = []
  with jax.set_mesh(mesh):
    restored = mngr.restore(cfg, mesh) if resume else None
    if restored is not None:
      state, data_states = restored
      if data_states is not None:
        iterator.set_state(data_states[pid])
    else:
      state = train.init_state(cfg, jax.random.key(cfg.train.seed), mesh)
      checkpoint.write_config(run_dir, cfg)
      checkpoint.write_config(run_dir / "checkpoints", cfg)
    start = int(jax.device_get(state.step))
    writer = metrics.Writer(run_dir, enabled=lead, total_steps=cfg.train.steps, start_step=start)
    if restored is not None:
      writer.log_line(f"resumed from step {start} in {run_dir / 'checkpoints'}")
    step_jit, t0 = None, time.perf_counter()
    with writer, _stop_signals() as stop:
      for step in range(start + 1, cfg.train.steps + 1):
        batch = data.global_batch(next(iterator), mesh)
        step_jit = step_jit or train.jit_step(step_fn or train.sft_step, state, batch, mesh)
        state, m = step_jit(state, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        history.append(m)
        writer.write(step, m)
        if step == start + 1:
          writer.log_line(f"step {step} (with compilation) took {time.perf_counter() - t0:.1f}s")
        if step % cfg.train.log_every == 0 or step == start + 1:
          writer.log_line(_format(step, m))
        if m["bad_steps"] >= cfg.train.max_bad_steps:
          raise TrainingStopped(f"step {step}: loss or gradients non-finite {int(m['bad_steps'])} steps in a row "
                                f"(train.max_bad_steps={cfg.train.max_bad_steps}); updates were skipped, the last "
                                f"good checkpoint is {mngr.steps()[-1] if mngr.steps() else 'none'}")
        last = step == cfg.train.steps or _any_process(bool(stop))
        if m["bad_steps"] == 0 and (last or mngr.due(step)):  # never in the middle of a non-finite streak
          mngr.save(step, state, checkpoint.gather_process_states(iterator.get_state()))
        if last and step < cfg.train.steps:
          writer.log_line(f"stop signal: saved step {step} to {run_dir / 'checkpoints'}; --resume continues")
          break
    mngr.close()
  return history


def _format(step: int, m: dict) -> str:
  line = f"step {step:5d}  loss {m['loss']:.4f}  ce {m['ce']:.4f}  mtp {m.get('mtp_loss', 0):.4f}"
  if "expert_load_max_over_mean" in m:
    line += f"  load max/mean {m['expert_load_max_over_mean']:.2f}  dropped {m['dropped_pairs']:g}"
  return line + (f"  skipped {m['skipped_steps']:g}" if m.get("skipped_steps") else "")
