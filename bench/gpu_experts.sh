#!/usr/bin/env bash
# Dropless MoE on one GPU (issue 30): the expert layer alone for every expert-GEMM form (`r1jax bench experts`),
# the train step dropless (grouped GEMM) against capacity 1.25 (padded einsum), and the peers, same call.
# STAGES picks what runs (default: tests experts train); `peers` needs ../shared/peers copied to .peers and
# .whl/maxtext carried (../shared/peers/README.md).
set -uo pipefail
rm -rf /tmp/site  # a warm machine keeps the last call's /tmp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
STAGES=${STAGES:-tests experts train}
PEER="model.n_mtp=0 compute.param_dtype=bfloat16 compute.remat=dots"  # HF's setup: bf16 weights, no MTP
bench() { name=$1; overrides=$2; shift 2; timeout 300 python -m r1jax.cli bench train $overrides --config configs/bench_gpu.yaml "$@" --json \
  > "$OUT/train_$name.json" 2> "$OUT/train_$name.err"; echo "$name rc=$? $(tail -c 400 "$OUT/train_$name.json")"; tail -3 "$OUT/train_$name.err"; }
for stage in $STAGES; do case $stage in
  tests) R1JAX_TEST_PLATFORMS=cuda timeout 240 python -m pytest -q -m gpu tests/test_grouped_gemm.py -p no:cacheprovider \
           -x 2>&1 | tail -15 | tee "$OUT/gpu_tests_grouped.txt" ;;
  experts) timeout 300 python -m r1jax.cli bench experts --config configs/bench_gpu.yaml --json > "$OUT/experts.json" \
             2> "$OUT/experts.err"; echo "experts rc=$?"; tail -3 "$OUT/experts.err" ;;
  train) bench dropless_grouped "$PEER compute.capacity_factor=0 compute.expert_gemm=grouped"
         bench capacity "$PEER compute.capacity_factor=1.25" ;;
  peers) timeout 240 python .peers/hf_strong.py train liger --config configs/bench_gpu.yaml > "$OUT/train_hf_liger.json" \
           2> "$OUT/train_hf_liger.err"; echo "hf liger rc=$? $(tail -c 300 "$OUT/train_hf_liger.json")"
         timeout 300 bash .peers/maxtext/gpu.sh tokamax_dropless > "$OUT/maxtext.txt" 2>&1; echo "maxtext rc=$?"; tail -5 "$OUT/maxtext.txt" ;;
esac; done
