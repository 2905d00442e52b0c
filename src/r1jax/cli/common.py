"""What every command shares: logging set-up, one-line errors, multi-process arguments, and the training
commands' run: join a jax.distributed run if asked, train, report a stop or a bad record in one line."""

from __future__ import annotations

import importlib
import logging
import sys

from r1jax import config as config_lib


def setup_logging():
  """Show r1jax's own INFO lines (MTP, FP8, tied head) without other libraries' chatter."""
  logger = logging.getLogger("r1jax")
  if not logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("r1jax: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # a library may have configured the root logger too; print once
  logger.setLevel(logging.INFO)


# Exit status of every command: scripts and schedulers tell a finished run from a stopped or failed one.
EXIT = {"finished": 0, "crashed": 1, "config error": 2, "diverged": 3, "data error": 4, "run directory in use": 5,
        "stopped": 75}  # 75 is sysexits' EX_TEMPFAIL: try again (here: with --resume)


def fail(message: str, code: int = EXIT["config error"]) -> int:
  """Print one line to stderr; the exit status."""
  print(f"r1jax: {message}", file=sys.stderr)
  return code


def multiprocess_args(p):
  multi = p.add_argument_group("multi-process runs (TPU pods, SLURM, Open MPI and JAX_COORDINATOR_ADDRESS are "
                               "detected; elsewhere give all three)")
  multi.add_argument("--coordinator", help="host:port of process 0")
  multi.add_argument("--num-processes", type=int)
  multi.add_argument("--process-id", type=int)
  multi.add_argument("--cpu-devices", type=int, default=0, help="simulated CPU devices per process (0: real devices)")


def run_training(args, train_fn: str, outputs: str, **kwargs) -> int:
  """A training command (sft, grpo, pipeline): `train_fn(cfg, run_dir, resume=, **kwargs)`, named
  "module:function" and imported after the config loads (a config error never waits for jax), in the run
  directory."""
  cfg = config_lib.load(args.config, args.overrides)
  from r1jax import distributed  # before jax initialises its backends

  joined = distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.cpu_devices)
  from r1jax import data, loop

  module, name = train_fn.split(":")
  train_fn = getattr(importlib.import_module(module), name)

  import jax

  from r1jax import run_lock

  run_dir = loop.run_directory(cfg, args.config)
  try:
    with run_lock.hold(run_dir, enabled=jax.process_index() == 0):
      train_fn(cfg, run_dir, resume=args.resume, **kwargs)
  except run_lock.RunLocked as e:
    return fail(str(e), EXIT["run directory in use"])
  except loop.Interrupted as e:
    return fail(str(e), EXIT["stopped"])
  except loop.TrainingStopped as e:
    return fail(str(e), EXIT["diverged"])
  except data.DataError as e:  # a bad record: `file:line: reason`, no traceback
    return fail(f"data error: {e}", EXIT["data error"])
  finally:
    if joined:
      jax.distributed.shutdown()
  print(f"run directory: {run_dir} ({outputs})")
  return EXIT["finished"]


def parse_mesh(text: str) -> dict[str, int]:
  """`data=1,fsdp=8,expert=32` -> sizes of all four axes (missing ones are 1)."""
  from r1jax.sharding import AXES

  sizes = dict.fromkeys(AXES, 1)
  for item in filter(None, text.split(",")):
    name, _, value = item.partition("=")
    if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise config_lib.ConfigError(f"--mesh {text!r}: expected axis=size items with axes {list(AXES)}, sizes >= 1")
    sizes[name.strip()] = int(value)
  return sizes
