"""Two local processes x 4 CPU devices (jax.distributed + gloo) train exactly like one process with 8.

Select with `-m multiprocess`; it takes a minute or two on two cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from r1jax import config, demo

ROOT = Path(__file__).resolve().parent.parent
# expert=8 makes every MoE all-to-all cross the process boundary; fp32 keeps the comparison tight.
ARGS = ["configs/tiny.yaml", "mesh.data=1", "mesh.expert=8", "model.dtype=float32", "train.batch_size=8"]
STEPS = 3


@pytest.mark.multiprocess
def test_two_processes_give_the_same_losses_as_one(tmp_path):
  out = tmp_path / "metrics.jsonl"
  env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "STEPS": str(STEPS)}
  run = subprocess.run([str(ROOT / "launch/multiprocess_cpu.sh"), *ARGS], env=env, cwd=ROOT, timeout=600,
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
  assert "process 1/2: mesh" in run.stdout and "(4 local)" in run.stdout
  two = [json.loads(line) for line in out.read_text().splitlines()]
  one = demo.run_sft(config.load(ROOT / ARGS[0], ARGS[1:] + [f"train.steps={STEPS}"]))  # this process: 8 devices
  for key in ["loss", "ce", "mtp_loss", "aux_loss", "grad_norm", "expert_load_max_over_mean"]:
    np.testing.assert_allclose([m[key] for m in two], [m[key] for m in one], rtol=1e-5, err_msg=key)
  assert [m["dropped_pairs"] for m in two] == [m["dropped_pairs"] for m in one] == [0] * STEPS
  assert two[-1]["router_bias_replicas_equal"] == one[-1]["router_bias_replicas_equal"] == 1.0
