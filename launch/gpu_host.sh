#!/usr/bin/env bash
# One GPU host: one process drives all local GPUs; the mesh comes from the config (e.g. mesh.expert=8).
# Usage: [COMMAND=sft|grpo|pipeline] launch/gpu_host.sh CONFIG [section.field=value ...]
# Several hosts: run launch/multi_host.sh on each (or under SLURM / Open MPI, which jax.distributed detects).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m r1jax.cli "${COMMAND:-sft}" "$@"
