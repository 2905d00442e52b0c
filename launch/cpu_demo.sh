#!/usr/bin/env bash
# The main job on CPU: 8 simulated devices, a short SFT run of the tiny DeepSeek-V3-shaped model.
# Extra arguments are config overrides, e.g. `bash launch/cpu_demo.sh train.steps=100 mesh.expert=2`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
.venv/bin/python -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v "^WARNING: Location" || true
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
# Each demo run gets its own run directory under runs/ (config, checkpoints, metrics.jsonl, events, plots).
exec .venv/bin/r1jax sft configs/tiny.yaml "train.name=demo-$(date +%Y%m%d-%H%M%S)" "$@"
