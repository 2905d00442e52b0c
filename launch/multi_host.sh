#!/usr/bin/env bash
# One process per host on a TPU pod slice or a multi-host GPU cluster, all joined into one global mesh.
# On TPU pods run it on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd r1jax && launch/multi_host.sh CONFIG k=v"
# `r1jax sft|grpo|pipeline` detect TPU pods, SLURM and Open MPI; elsewhere pass COORDINATOR=host:port NPROC=n
# RANK=i. COMMAND picks the subcommand (default sft).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
if [ -n "${COORDINATOR:-}" ]; then
  args=(--coordinator "$COORDINATOR" --num-processes "$NPROC" --process-id "$RANK")
fi
exec "${PYTHON:-.venv/bin/python}" -m r1jax.cli "${COMMAND:-sft}" "${args[@]}" "$@"
