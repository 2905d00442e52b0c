"""Parameter checkpoints: an orbax save of the params pytree plus the model config as a YAML of overrides
beside it, so a checkpoint is self-describing (`r1jax import-hf` writes one, `r1jax export-hf` reads one).

Layout: DIR/config.yaml (`model:` section, loadable with config.load) and DIR/params/ (orbax)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import yaml

from r1jax import config as config_lib
from r1jax import model
from r1jax.config import RunConfig
from r1jax.nn import layers

CONFIG, PARAMS = "config.yaml", "params"


def save_params(directory: str | Path, params: dict, cfg: RunConfig) -> Path:
  """Write params (sharded arrays; each process writes its own shards) and the model config."""
  directory = Path(directory).absolute()
  if (directory / PARAMS).exists():
    raise FileExistsError(f"{directory / PARAMS} already exists; choose a new checkpoint directory")
  directory.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    text = yaml.safe_dump({"model": dataclasses.asdict(cfg.model)}, sort_keys=False)
    (directory / CONFIG).write_text(text)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS, params)
  checkpointer.wait_until_finished()
  return directory


def load_config(directory: str | Path, overrides=()) -> RunConfig:
  return config_lib.load(Path(directory) / CONFIG, overrides)


def load_params(directory: str | Path, cfg: RunConfig, mesh) -> dict:
  """Restore params straight into their shardings on `mesh` (from sharding.RULES)."""
  abstract = model.abstract(cfg.model)
  target = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.value.shape, p.value.dtype, sharding=s), abstract,
                        layers.shardings(abstract, mesh), is_leaf=layers.is_param)
  return ocp.StandardCheckpointer().restore(Path(directory).absolute() / PARAMS, target)
