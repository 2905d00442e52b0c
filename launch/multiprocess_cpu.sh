#!/usr/bin/env bash
# Two local JAX processes x 4 fake CPU devices, joined by jax.distributed on 127.0.0.1 with gloo
# collectives, train a few steps of the tiny model on one 8-device mesh whose expert axis spans both.
# Usage: launch/multiprocess_cpu.sh [CONFIG [section.field=value ...]]
# Env: PYTHON (default python), NPROC (2), DEVICES (4 per process), STEPS (3), PORT (a free one).
# The run directory comes from the config (train.run_dir/train.name); process 0 writes it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ $# -eq 0 ]; then set -- configs/tiny.yaml mesh.data=1 mesh.expert=8; fi
NPROC=${NPROC:-2}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < NPROC; i++)); do
  "$PYTHON" -m r1jax.cli sft --process-id "$i" --num-processes "$NPROC" --coordinator "127.0.0.1:$PORT" \
    --cpu-devices "${DEVICES:-4}" "$@" "train.steps=${STEPS:-3}" &
  pids+=($!)
done
# If one process fails the others would wait on it forever: stop them.
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    status=1
    for other in "${pids[@]}"; do kill "$other" 2>/dev/null || true; done
  fi
done
exit $status
