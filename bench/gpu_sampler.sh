#!/usr/bin/env bash
# Sampler benchmark on one GPU (issue 31), r1jax and the HF transformers peer in the same call. STAGES picks
# what runs (default: all): perlayer (bf16 decode from per-layer weights, the default), perlayer_grouped (its MoE
# through the grouped GEMM instead of the padded einsum), stacked (the layer scan over stacked weights), fp8
# (e4m3 weights), skewed (continuous batching vs static batches, long-tailed budgets), peer (HF generate).
set -uo pipefail
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
STAGES=${STAGES:-perlayer perlayer_grouped stacked fp8 skewed peer}
run() { name=$1; shift; timeout 240 python -m r1jax.cli bench sampler "$@" --config configs/bench_gpu.yaml --json \
  > "$OUT/sampler_$name.json" 2> "$OUT/sampler_$name.err"; echo "$name rc=$? $(tail -c 500 "$OUT/sampler_$name.json")"; tail -2 "$OUT/sampler_$name.err"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for stage in $STAGES; do case $stage in
  perlayer) run perlayer ;;
  perlayer_grouped) run perlayer_grouped compute.expert_gemm=grouped ;;
  stacked) run stacked sampler.per_layer_weights=false ;;
  fp8) run fp8 sampler.fp8_weights=true ;;
  skewed) run skewed --skewed ${SKEWED:-512} --batch 64 --new-tokens 192 ;;
  peer) timeout 240 python bench/hf_peer.py sampler --config configs/bench_gpu.yaml > "$OUT/hf_sampler.json" \
          2> "$OUT/hf_sampler.err"; echo "hf rc=$? $(tail -c 300 "$OUT/hf_sampler.json")" ;;
esac; done
