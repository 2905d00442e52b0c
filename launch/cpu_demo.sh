#!/usr/bin/env bash
# The main job on CPU: R1-Zero on 8 simulated devices. A tiny DeepSeek-V3-shaped model is trained from scratch
# on task text (`reverse 4821` -> `<think>1 2 8 4</think><answer>1284</answer>`) until it answers in format but
# mostly wrong, then GRPO with rule-based rewards raises its eval accuracy (printed every 10 steps).
# Extra arguments are config overrides, e.g. `bash launch/cpu_demo.sh train.steps=120 grpo.task=sort`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
.venv/bin/python -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v "^WARNING: Location" || true
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax}"  # a second run skips compilation
# Each demo run gets its own directory under runs/: base/ and grpo/ (config, checkpoints, metrics.jsonl,
# TensorBoard events, plots), grpo/samples.jsonl (sampled completions with their rewards).
exec .venv/bin/r1jax grpo configs/tiny_r1zero.yaml "train.name=demo-$(date +%Y%m%d-%H%M%S)" "$@"
