"""Joining a multi-process run: one JAX process per host (or per group of local devices), all joined by
`jax.distributed` into one global mesh. Must run before anything else touches jax's backends."""

from __future__ import annotations

import os

# Launchers that start one process per host and tell it so; jax.distributed reads the rest from them.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_NUM_PROCESSES")


def cluster_detected() -> bool:
  """True under a multi-process launcher jax.distributed can auto-detect (SLURM, Open MPI, MPICH, a
  multi-host TPU slice) or when JAX_COORDINATOR_ADDRESS is set."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # set on every worker of a multi-host TPU slice
    return True
  return any(os.environ.get(v, "1").isdigit() and int(os.environ.get(v, "1")) > 1 for v in _CLUSTER_SIZE_VARS)


def fake_cpu_devices(n: int):
  """Run on `n` simulated CPU devices per process with gloo collectives (tests, the CPU demo)."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
      + [f"--xla_force_host_platform_device_count={n}"])
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               cpu_devices: int = 0) -> bool:
  """Join the run when one is described (explicitly, or by the cluster's environment); returns whether it did.

  A single process with no cluster around it stays a plain single-process run.
  """
  if cpu_devices:
    fake_cpu_devices(cpu_devices)
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if not (explicit or cluster_detected()):
    return False
  import jax

  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return True
