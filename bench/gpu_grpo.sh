#!/usr/bin/env bash
# GRPO on one GPU with the bench model: rollout (sampler) and learner tokens/s. The GPU image lacks grain and
# tensorboardX: their wheels travel in .whl/ (see DESIGN.md, GPU runs).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
python -m r1jax.cli bench grpo compute.remat=dots grpo.task=reverse data.task_examples=2000 grpo.prompts_per_step=8 \
  grpo.group_size=8 sampler.max_new_tokens=256 train.seq_len=288 --steps 4 --json | tee "$OUT/grpo.json"
