#!/usr/bin/env bash
# Training throughput on one GPU, r1jax vs HF transformers in the same call (bench config, batch 8 x 2048),
# and the GPU-only attention tests. Wheels missing from the GPU image travel in .whl/ (DESIGN.md, GPU runs).
# STAGES picks what runs (default: all): tests peer r1jax fp32 dots packed long (longfull, batch16 on request).
set -uo pipefail
rm -rf /tmp/site  # a warm machine keeps the last call's /tmp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
STAGES=${STAGES:-tests peer r1jax fp32 dots packed long}
# The peer's setup: bf16 weights and Adam moments, no MTP (HF's DeepseekV3 has none).
PEER="model.n_mtp=0 compute.param_dtype=bfloat16"
# An 80 GB budget on any card: the H200's 141 GiB pool is capped at 79 GiB, an H100 keeps its own 0.95 (JAX's default 0.75).
total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
CAP=$(python3 -c "print(round(min(0.95, 79 * 1024 / $total), 3))")
# bench NAME "OVERRIDES" [FLAGS...]  (section.field=value overrides precede the --flags)
bench() { name=$1; overrides=$2; shift 2; timeout 300 python -m r1jax.cli bench train $overrides --config configs/bench_gpu.yaml "$@" --json \
  > "$OUT/train_$name.json" 2> "$OUT/train_$name.err"; echo "$name rc=$? $(tail -c 600 "$OUT/train_$name.json")"; }
for stage in $STAGES; do case $stage in
  tests) R1JAX_TEST_PLATFORMS=cuda timeout 300 python -m pytest -q -m gpu tests/test_attention.py -p no:cacheprovider \
           2>&1 | tail -5 | tee "$OUT/gpu_tests.txt" ;;
  peer) timeout 300 python bench/hf_peer.py train --config configs/bench_gpu.yaml > "$OUT/train_hf.json" \
          2> "$OUT/train_hf.err"; echo "hf rc=$? $(cat "$OUT/train_hf.json")" ;;
  r1jax) bench r1jax "$PEER" ;;
  fp32) bench fp32_master_mtp "" ;;
  dots) bench dots "$PEER compute.remat=dots" ;;
  packed) bench packed4 "$PEER" --packed 4 ;;
  # Long context on an 80 GB budget (CAP above), remat of dots.
  long) for L in ${LONG:-65536 131072}; do XLA_PYTHON_CLIENT_MEM_FRACTION=$CAP bench "long$L" \
          "$PEER compute.remat=dots train.batch_size=1 train.seq_len=$L model.max_seq_len=$L" --steps 3; done ;;
  # The same with full remat (each layer's input kept, the layer recomputed): what 131,072 tokens need.
  longfull) for L in ${LONG:-65536 131072}; do XLA_PYTHON_CLIENT_MEM_FRACTION=$CAP bench "long${L}_full" \
          "$PEER compute.remat=full train.batch_size=1 train.seq_len=$L model.max_seq_len=$L" --steps 3; done ;;
  batch16) bench batch16 "$PEER compute.remat=dots train.batch_size=16" ;;
esac; done
