#!/usr/bin/env bash
# The main job on CPU: the R1 pipeline on 8 simulated devices (configs/tiny_r1.yaml, ~6 min on 2 cores). A tiny
# DeepSeek-V3-shaped model learns a task from scratch (`reverse 4821` -> `<think>1 2 8 4</think><answer>1284
# </answer>`) through R1's stages: base, R1-Zero, cold start, RL, rejection sampling, SFT, final RL, and
# distillation into a dense GQA student; then a report of every stage's eval accuracy (report.md, .png).
# Extra arguments are config overrides, e.g. `bash launch/cpu_demo.sh grpo.task=sort`. The shorter R1-Zero demo
# alone: `.venv/bin/r1jax grpo configs/tiny_r1zero.yaml` (~3.5 min).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
.venv/bin/python -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v "^WARNING: Location" || true
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax}"  # a second run skips compilation
# Each demo run gets its own directory under runs/, one subdirectory per stage (config, checkpoints,
# metrics.jsonl, TensorBoard events, plots; GRPO stages also samples.jsonl), and the report.
exec .venv/bin/r1jax pipeline configs/tiny_r1.yaml "train.name=demo-$(date +%Y%m%d-%H%M%S)" "$@"
