#!/usr/bin/env bash
# One GPU host: one process drives all local GPUs; the mesh comes from the config (e.g. mesh.expert=8).
# Usage: [COMMAND=sft|grpo|pipeline|bench] launch/gpu_host.sh ARGS...
#   launch/gpu_host.sh configs/bench_gpu.yaml mesh.data=1 mesh.expert=8               # SFT, expert=8
#   COMMAND=bench launch/gpu_host.sh train --config configs/bench_gpu.yaml --mesh data=2,expert=4 --json
# Several hosts: run launch/multi_host.sh on each (or under SLURM / Open MPI, which jax.distributed detects).
# NVLink multicast stays off (a program that uses it can take a shared host's GPUs out of service).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec "${PYTHON:-.venv/bin/python}" -m r1jax.cli "${COMMAND:-sft}" "$@"
