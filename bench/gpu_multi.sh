#!/usr/bin/env bash
# Expert parallelism across the GPUs of one host (issue: EP on several GPUs). One process drives all local
# GPUs. Correctness first (sharded MoE layer and train steps == 1 GPU, fp32), then weak scaling of the bench
# model at 8 x 2048 per GPU, meshes (expert=N) and (data=2, expert=N/2), with each run's measured all-to-all
# against `r1jax info`'s prediction at the measured link rate. Keep NVLink multicast off (KINDS.md).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
R1JAX_TEST_PLATFORMS=cuda timeout 300 python -m pytest -q -m gpu tests/test_multi_gpu.py -p no:cacheprovider 2>&1 \
  | tail -5 | tee "$OUT/multi_gpu_tests.txt"
PEER="model.n_mtp=0 compute.param_dtype=bfloat16"
run() {  # run NAME GPUS MESH
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $(($2 - 1))) COMMAND=bench PYTHON=python timeout 400 launch/gpu_host.sh train $PEER \
    train.batch_size=$((8 * $2)) --config configs/bench_gpu.yaml --mesh "$3" --json > "$OUT/$1.json" 2> "$OUT/$1.err"
  echo "$1 rc=$?"
}
run ep1 1 data=1
for n in 2 4 8; do
  [ "$n" -le "$N" ] || break
  run "ep$n" "$n" "expert=$n"
  [ "$n" -ge 4 ] && run "dp2_ep$n" "$n" "data=2,expert=$((n / 2))"
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); runs = {p.stem: json.loads(p.read_text()) for p in out.glob("*ep*.json") if p.stat().st_size}
one = runs.get("ep1", {}).get("tokens_per_s_per_device")
for name, r in sorted(runs.items()):
  a = r.get("all_to_all") or {}
  print(f"{name}: {r['tokens_per_s']:.0f} tok/s, {r['tokens_per_s_per_device']:.0f}/GPU, weak-scaling "
        f"{r['tokens_per_s_per_device'] / one:.2f}" if one else name, f"a2a measured {a.get('measured_ms_per_step')} ms"
        f" vs predicted {a.get('predicted_ms_per_step')} ms at {a.get('measured_link_GBps')} GB/s")
PY
