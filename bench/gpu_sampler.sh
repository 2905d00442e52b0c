#!/usr/bin/env bash
# Sampler benchmark on one GPU: r1jax (dropless and capacity 1.25) and the HF transformers peer, same call.
# Run from the repository root on the GPU image (jax, torch, transformers installed; no pip install needed).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for cf in 0 1.25; do
  python -m r1jax.cli bench sampler sampler.capacity_factor=$cf --config configs/bench_gpu.yaml --json \
    | tee "$OUT/sampler_cf$cf.json"
done
python -m r1jax.cli bench sampler sampler.capacity_factor=0 --config configs/bench_gpu.yaml --speculative --json \
  | tee "$OUT/sampler_spec.json"
python bench/hf_peer.py sampler --config configs/bench_gpu.yaml | tee "$OUT/hf_sampler.json"
