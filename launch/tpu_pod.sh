#!/usr/bin/env bash
# A TPU VM pod slice: every worker runs the same command and jax.distributed joins them into one global mesh.
# From your machine:
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#     --command "cd r1jax && COMMAND=pipeline launch/tpu_pod.sh configs/tiny_r1.yaml mesh.fsdp=-1"
# COMMAND: sft (default), grpo or pipeline. The run directory should be on storage all workers share.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m r1jax.cli "${COMMAND:-sft}" "$@"
