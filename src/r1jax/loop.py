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
from r1jax.batch import Batch
from r1jax.config import ConfigError, RunConfig


class TrainingStopped(RuntimeError):
  """The run stopped itself (too many non-finite steps); the last good checkpoint is intact."""


class Interrupted(RuntimeError):
  """A stop signal (SIGTERM/SIGINT): the step reached is saved and the run ends unfinished, so no stage or
  command that builds on it starts; `--resume` continues it."""


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


class SFTSource:
  """SFT batches: this process's rows from the grain iterator (data.py), as global arrays."""

  def __init__(self, cfg: RunConfig, mesh):
    self.iterator = data.make_iterator(cfg, process_index=jax.process_index(), process_count=jax.process_count())
    self.mesh = mesh

  def next_batch(self, state) -> tuple[Batch, dict]:
    return data.assemble(next(self.iterator), self.mesh), {}

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


def fit(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, step_fn=None, source=None,
        init_params=None, after_step=None, mesh=None) -> list[dict]:
  """Train cfg.train.steps steps in `run_dir`; returns the metrics of the steps run here.

  `resume` continues from the newest readable checkpoint (a run directory with checkpoints and no
  `resume` is an error rather than being overwritten). `step_fn(state, batch)` defaults to train.sft_step;
  `source` (default SFTSource) gives `next_batch(state) -> (batch, host metrics)` and a JSON-able
  `get_state`/`set_state` that checkpoints hold; a fresh run starts from `init_params` if given (params on
  the mesh, e.g. checkpoint.load_params). `after_step(step, state) -> dict` adds metrics (evaluations).
  `mesh` (default: cfg.mesh over every device) is where the state lives: asynchronous GRPO passes the learner
  sub-mesh. A source's `close()`, if it has one, runs however the loop ends.
  """
  run_dir = Path(run_dir).absolute()
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  sharding.validate_mesh(cfg.model, cfg.compute, mesh, cfg.train.batch_size if source is None else None,
                         cfg.train.seq_len)
  lead, pid = jax.process_index() == 0, jax.process_index()
  print(f"process {pid}/{jax.process_count()}: mesh {dict(mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].platform} devices ({jax.local_device_count()} local)", flush=True)
  mngr = checkpoint.Manager(run_dir / "checkpoints", cfg.checkpoint)
  if mngr.steps() and not resume:
    raise ConfigError(f"{run_dir} already holds checkpoints (steps {mngr.steps()}); pass --resume or choose "
                      "another train.name")
  if resume and mngr.steps():
    checkpoint.check_resume(run_dir, cfg, lead)
  elif resume:
    print(f"--resume: {run_dir} holds no checkpoint yet; starting from step 0", flush=True)
  history = []
  with jax.set_mesh(mesh):
    source = SFTSource(cfg, mesh) if source is None else source
    restored = mngr.restore(cfg, mesh) if resume else None
    if restored is not None:
      state, data_states = restored
      if data_states is not None:
        source.set_state(data_states[pid])
    else:
      state = train.init_state(cfg, jax.random.key(cfg.train.seed), mesh)
      if init_params is not None:
        state = state.replace(params=init_params)
      checkpoint.write_config(run_dir, cfg)
      checkpoint.write_config(run_dir / "checkpoints", cfg)
    start = int(jax.device_get(state.step))
    writer = metrics.Writer(run_dir, enabled=lead, total_steps=cfg.train.steps, start_step=start)
    if restored is not None:
      writer.log_line(f"resumed from step {start} in {run_dir / 'checkpoints'}")
    step_jit, t0, stopped_at = None, time.perf_counter(), None
    try:
      with writer, _stop_signals() as stop:
        for step in range(start + 1, cfg.train.steps + 1):
          t_data = time.perf_counter()
          batch, host_metrics = source.next_batch(state)
          t_step = time.perf_counter()
          step_jit = step_jit or train.jit_step(step_fn or train.sft_step, state, batch, mesh)
          state, m = step_jit(state, batch)
          m = {**host_metrics, **{k: float(v) for k, v in jax.device_get(m).items()}}
          m.update(data_s=t_step - t_data, step_s=time.perf_counter() - t_step)  # GRPO: rollout vs learner time
          if after_step is not None:
            m.update(after_step(step, state))
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
            mngr.save(step, state, checkpoint.gather_process_states(source.get_state()))
          if last and step < cfg.train.steps:
            writer.log_line(f"stop signal: saved step {step} to {run_dir / 'checkpoints'}; --resume continues")
            stopped_at = step
            break
    finally:
      getattr(source, "close", lambda: None)()  # a sampler thread (async GRPO) stops with the loop
    mngr.close()
  if stopped_at is not None:
    raise Interrupted(f"stopped by a signal at step {stopped_at} of {cfg.train.steps} in {run_dir}; --resume "
                      "continues")
  return history


def _format(step: int, m: dict) -> str:
  line = f"step {step:5d}  loss {m['loss']:.4f}"
  for key, name in (("ce", "ce"), ("mtp_loss", "mtp"), ("reward_mean", "reward"), ("accuracy", "acc"),
                    ("eval_accuracy", "eval acc"), ("completion_len_mean", "len"), ("kl", "kl")):
    if key in m:
      line += f"  {name} {m[key]:.4f}"
  if "expert_load_max_over_mean" in m:
    line += f"  load max/mean {m['expert_load_max_over_mean']:.2f}  dropped {m['dropped_pairs']:g}"
  return line + (f"  skipped {m['skipped_steps']:g}" if m.get("skipped_steps") else "")
