#!/usr/bin/env bash
# FP8 on one GPU: the V3 GEMM shapes (bf16 vs block-scaled FP8, XLA and Pallas) and the bench-config train
# step with FP8 off and on, in one call. Wheels missing from the GPU image travel in .whl/.
set -uo pipefail
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
timeout 540 python -m r1jax.cli bench fp8 model.n_mtp=0 model.param_dtype=bfloat16 --config configs/bench_gpu.yaml \
  --json > "$OUT/fp8.json" 2> "$OUT/fp8.err"; echo "fp8 rc=$?"; tail -c 3000 "$OUT/fp8.json"; tail -3 "$OUT/fp8.err"
