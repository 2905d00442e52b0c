"""Multi-process training: one process per host joined by `jax.distributed`, one global mesh over all
of their devices. The code path of a TPU-pod or multi-GPU launch; on CPU (launch/multiprocess_cpu.sh)
each process gets fake devices and the collectives run over gloo."""

from __future__ import annotations

import argparse
import json
import os
import sys


def train_steps(cfg, steps: int) -> list[dict]:
  """`steps` SFT steps on a digit task; every process builds the same global batch and feeds its shards.

  Returns per-step metrics (floats), plus whether every local replica of the router bias is identical.
  """
  import jax
  import numpy as np

  from r1jax import demo, sharding

  mesh = sharding.make_mesh(cfg.mesh)
  history = []
  with jax.set_mesh(mesh):
    for _, state, metrics in demo.sft_steps(cfg, mesh, steps):
      history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    if "moe_layers" in state.params:
      bias = state.params["moe_layers"]["ffn"]["router"]["bias"]
      shards = [np.asarray(s.data) for s in bias.addressable_shards]
      history[-1]["bias_replicas_equal"] = float(all(np.array_equal(shards[0], s) for s in shards))
  return history


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("config")
  parser.add_argument("overrides", nargs="*", help="section.field=value")
  # Leave these out on TPU pods and SLURM/Open MPI GPU clusters: jax.distributed detects them.
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--coordinator", help="host:port of process 0")
  parser.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices per process (0: real devices)")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out", help="process 0 writes the per-step metrics here as JSON")
  args = parser.parse_args(argv)
  if args.cpu_devices:  # before jax initialises its backends
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        + [f"--xla_force_host_platform_device_count={args.cpu_devices}"])
  import jax

  from r1jax import config

  if args.cpu_devices:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  cfg = config.load(args.config, args.overrides)
  jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                             process_id=args.process_id)
  print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} {jax.devices()[0].platform} devices", flush=True)
  history = train_steps(cfg, args.steps)
  for i, m in enumerate(history, 1):
    print(f"process {jax.process_index()} step {i} loss {m['loss']:.6f} dropped {m.get('dropped_tokens', 0):g}",
          flush=True)
  if args.out and jax.process_index() == 0:
    with open(args.out, "w") as f:
      json.dump(history, f)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
