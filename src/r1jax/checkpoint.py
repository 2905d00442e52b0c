"""Checkpoints over orbax's CheckpointManager: each step directory holds the params, the rest of the
TrainState (optimizer state, step, rng, non-finite counters) and every process's data-iterator state;
DIR/config.yaml beside them makes the directory self-describing. Orbax writes a step to a temporary
directory and renames it when complete, so a killed save never looks like a checkpoint.

Training runs write RUN/checkpoints/; `r1jax import-hf` writes the same format with params only (step 0),
and `r1jax export-hf` reads the newest step's params."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

from r1jax import config as config_lib
from r1jax import train
from r1jax.config import CheckpointConfig, RunConfig

log = logging.getLogger(__name__)
CONFIG = "config.yaml"
_TRAIN_FIELDS = ("step", "opt_state", "rng", "bad_steps", "skipped_steps")


def check_resume(run_dir: Path, cfg: RunConfig, write: bool = True) -> list:
  """Before a resume: the run's saved config against `cfg` (config/resume.py). A refused change is a
  ConfigError naming every field, and nothing in the run is touched; allowed ones are said, appended to
  RUN/config_history.jsonl and become the run's config."""
  from r1jax.config import resume

  saved = load_config(run_dir)
  allowed = resume.check(saved, cfg, str(run_dir))
  if allowed:
    if jax.process_index() == 0:
      print(f"{run_dir}: resuming with changed settings: " +
            "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in allowed), flush=True)
    if write and jax.process_index() == 0:
      record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": {k: [old, new] for k, old, new in allowed}}
      with open(Path(run_dir) / "config_history.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
      for directory in (Path(run_dir), checkpoint_dir(run_dir)):
        write_config(directory, cfg)
  return allowed


TOKENIZER = "tokenizer"  # an imported checkpoint's tokenizer files (`r1jax import-hf`), beside its params


def tokenizer_dir(path: str | Path) -> Path | None:
  """The tokenizer directory a checkpoint holds, or None."""
  d = checkpoint_dir(path) / TOKENIZER
  return d if (d / "tokenizer.json").is_file() else None


def checkpoint_dir(path: str | Path) -> Path:
  """A run directory or a checkpoint directory -> the checkpoint directory."""
  path = Path(path).absolute()
  return path / "checkpoints" if (path / "checkpoints" / CONFIG).exists() else path


def write_config(directory: Path, cfg: RunConfig):
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))


def load_config(directory: str | Path, overrides=()) -> RunConfig:
  """A run's saved config, then `overrides`; one saved before the model/compute split is read as it meant
  (config.migrate), so older run directories resume, evaluate and export as before."""
  path = checkpoint_dir(directory) / CONFIG
  saved = config_lib.migrate(config_lib.read_yaml(path))
  cfg = config_lib.load_dict(saved, str(path), overrides)
  if overrides:
    from r1jax.config import resume

    fixed = config_lib.load_dict(saved, str(path))
    bad = [f"{k}: the checkpoint has {old!r}, the command says {new!r}" for k, old, new in resume.changes(fixed, cfg)
           if k.startswith("model.")]
    if bad:
      raise config_lib.ConfigError(f"{checkpoint_dir(directory)}: " + "; ".join(bad) + " (a checkpoint's "
                                   "architecture is what it was trained as)")
  return cfg


def gather_process_states(state: dict | None) -> list | None:
  """Every process's JSON-able iterator state, on every process (one small all-gather of bytes)."""
  if state is None:
    return None
  if jax.process_count() == 1:
    return [state]
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  size = int(multihost_utils.process_allgather(np.array([raw.size])).max())
  padded = np.zeros(size, np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(r).rstrip(b"\0")) for r in rows]


class Manager:
  """Save every `every` steps (asynchronously), keep the newest `keep`, restore the newest readable one."""

  def __init__(self, directory: str | Path, cfg: CheckpointConfig = CheckpointConfig()):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                           create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)
    self.every = cfg.every

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def due(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, state, data_states: list | None = None) -> bool:
    """Save `state` (and the data states) as `step`; the write finishes in the background."""
    items = {"params": ocp.args.StandardSave(state.params),
             "train": ocp.args.StandardSave({k: getattr(state, k) for k in _TRAIN_FIELDS})}
    if data_states is not None:
      items["data"] = ocp.args.JsonSave({"processes": data_states})
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

  def save_params(self, params: dict):
    """A params-only checkpoint at step 0 (what `r1jax import-hf` writes)."""
    self._mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)

  def restore_params(self, cfg: RunConfig, mesh, step: int | None = None) -> dict:
    step = self.steps()[-1] if step is None else step
    target = train.abstract_state(cfg, mesh).params
    return self._mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]

  def restore(self, cfg: RunConfig, mesh) -> tuple[object, list | None] | None:
    """(TrainState, data states) of the newest complete, readable checkpoint, placed in the shardings of
    `mesh` (any mesh: 8 devices -> 2, expert axis -> data axis); None if there is none. A step is damaged
    only if an older one loads with the same config: then the newer unreadable steps are moved aside as
    unreadable-STEP (kept, not deleted) and the older one is used. If none loads, nothing is moved: that is a
    mismatch between the run and this code or config, not damage."""
    steps, failed = self.steps(), []
    for step in reversed(steps):
      try:
        restored = self._restore_step(step, cfg, mesh)
      except Exception as e:  # noqa: BLE001  (orbax raises many kinds on a damaged step)
        failed.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
        continue
      for bad, why in failed:
        aside = self._set_aside(bad)
        log.warning("checkpoint %s is unreadable (%s) while step %d loads; moved to %s", self.directory / str(bad),
                    why, step, aside)
      return restored
    if steps:
      raise RuntimeError(f"{self.directory}: no checkpoint of {steps} loads with this config and code (newest: "
                         f"{failed[0][1]}); nothing was moved or changed")
    return None

  def _set_aside(self, step: int) -> Path:
    """Move an unreadable step out of orbax's sight (kept for inspection, not deleted), so the resumed run
    can save that step number again."""
    aside = self.directory / f"unreadable-{step}"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"r1jax checkpoint set aside {step}")
    self._mngr.reload()
    return aside

  def _restore_step(self, step: int, cfg: RunConfig, mesh):
    abstract = train.abstract_state(cfg, mesh)
    train_target = {k: getattr(abstract, k) for k in _TRAIN_FIELDS}
    items = {"params": ocp.args.StandardRestore(abstract.params), "train": ocp.args.StandardRestore(train_target)}
    has_data = (self.directory / str(step) / "data").exists()
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    got = self._mngr.restore(step, args=ocp.args.Composite(**items))
    state = abstract.replace(params=got["params"], **got["train"])
    return state, got["data"]["processes"] if has_data else None

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def save_params(directory: str | Path, params: dict, cfg: RunConfig) -> Path:
  """A params-only checkpoint with its config (each process writes its own shards)."""
  directory = Path(directory).absolute()
  if directory.exists() and any(directory.iterdir()):
    raise FileExistsError(f"{directory} is not empty; choose a new checkpoint directory")
  write_config(directory, cfg)
  mngr = Manager(directory, CheckpointConfig(async_save=False))
  mngr.save_params(params)
  mngr.close()
  return directory


def load_params(directory: str | Path, cfg: RunConfig, mesh) -> dict:
  """The newest checkpoint's params, restored straight into their shardings on `mesh` (sharding.RULES)."""
  mngr = Manager(checkpoint_dir(directory), CheckpointConfig(async_save=False))
  if not mngr.steps():
    raise FileNotFoundError(f"{checkpoint_dir(directory)} holds no checkpoint")
  params = mngr.restore_params(cfg, mesh)
  mngr.close()
  return params
