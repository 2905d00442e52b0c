#!/usr/bin/env bash
# FP8 on one GPU: STAGES (default "tests tune bench") picks the parts, about 3, 2 and 9 minutes on an H200:
#   tests  the GPU-marked FP8 tests (kernel == XLA at blocks 128 and 32 and with each Tiles variant, a kept e4m3
#          weight, one kernel call per saved GEMM under scan + remat, the vmapped expert GEMM, the tiny model as
#          close to fp32 as XLA; TESTS adds files, e.g. tests/test_fp8_quantize_triton.py), log in $OUT/gpu_tests.log;
#   tune   the Mosaic GPU kernel's tile candidates at each V3 GEMM shape and a bench-config expert's two;
#   bench  `r1jax bench fp8`: bf16 vs block-scaled FP8 by XLA, Triton and Mosaic GPU, forward and backward,
#          and the bench-config train step with FP8 off and on: the speed timed interleaved on one state, and
#          STEPS-step loss curves from SEEDS inits on learnable batches at LR with PARAM_DTYPE master weights
#          (final cross-entropies, next to two controls: FP8 off at LR x 1.001, and repeated); the defaults
#          are the measured setup (bench/results/h200_fp8_interleaved_seeds.json, 8 seeds in two calls);
#          BENCH_ARGS=--train-only skips the GEMM and quantiser tables (then about 6 minutes).
# Wheels missing from the GPU image travel in .whl/.
set -uo pipefail
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
STAGES=${STAGES:-tests tune bench} STEPS=${STEPS:-100} LR=${LR:-1e-4} SEEDS=${SEEDS:-3} PARAM_DTYPE=${PARAM_DTYPE:-float32}
if [[ " $STAGES " == *" tests "* ]]; then
  R1JAX_TEST_PLATFORMS=cuda timeout 420 python3 -m pytest -q -m gpu tests/test_fp8_mosaic_gpu.py ${TESTS:-} \
    -p no:cacheprovider --durations=5 > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?"; tail -40 "$OUT/gpu_tests.log"
fi
if [[ " $STAGES " == *" tune "* ]]; then
  timeout 200 python3 - > "$OUT/fp8_tune.json" <<'PY'
import json
from r1jax.bench import fp8_gemms
from r1jax.nn.fp8.kernels.mosaic_gpu import Tiles
shapes = fp8_gemms.V3_SHAPES + ((2560, 2048, 2048), (2560, 1024, 2048))  # + one bench-config expert's gate/up, down
rows = {str(s): fp8_gemms.tune("mosaic_gpu", s) for s in shapes}
for s in shapes:  # per-row b scales (as wgrad's), for the cost of b_blocked's per-tile scale
  rows[str(s)] += [dict(r, b_blocked=False) for r in fp8_gemms.tune("mosaic_gpu", s, [Tiles()], b_blocked=False)]
print(json.dumps(rows, indent=1))
PY
  echo "tune rc=$?"; python3 -c "
import json; d = json.load(open('$OUT/fp8_tune.json'))
for s, rows in d.items(): print(s, [(r['tile_n'], r['stages'], r['k_pair'], r['chain'], r.get('b_blocked', True), round(r.get('tflops', 0)), r.get('error', '')[:300]) for r in rows])"
fi
if [[ " $STAGES " == *" bench "* ]]; then
  timeout 590 python3 -m r1jax.cli bench fp8 model.n_mtp=0 compute.param_dtype="$PARAM_DTYPE" optim.lr="$LR" \
    --config configs/bench_gpu.yaml --steps "$STEPS" --seeds "$SEEDS" ${BENCH_ARGS:-} --json > "$OUT/fp8.json" 2> "$OUT/fp8.err"
  echo "fp8 rc=$?"; tail -3 "$OUT/fp8.err"
  python3 -c "
import json; d = json.load(open('$OUT/fp8.json'))
for r in d.get('gemms', {}).get('results', []): print(r['shape'], r['impl'], {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}, r.get('error', '')[:200])
for r in d.get('quantize', []): print(r)
s = d.get('train_speed', {}); print('error', d['error']) if 'error' in d else None
print('train tok/s off/on', [s.get(k, {}).get('tokens_per_s') for k in ('off', 'on')], 'speedup', d.get('train_speedup'), 'gpu', [s.get(k, {}).get('gpu') for k in ('off', 'on')])
l = d.get('loss', {}); print('final ce', l.get('final_ce'), l.get('on_vs_off'), l.get('first_seed_rel_diff'))"
fi
