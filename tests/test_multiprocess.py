"""Two local processes x 4 CPU devices (jax.distributed + gloo) train exactly like one process with 8.

Select with `-m multiprocess`; it takes a minute or two on two cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from r1jax import config, loop

ROOT = Path(__file__).resolve().parent.parent
# expert=8 makes every MoE all-to-all cross the process boundary; fp32 keeps the comparison tight.
# Unshuffled, unpacked data: process p reads examples p, p+2, ..., so each step's global batch holds the same
# examples as one process's (in another row order, which the losses do not see).
ARGS = ["configs/tiny.yaml", "mesh.data=1", "mesh.expert=8", "compute.dtype=float32", "train.batch_size=8",
        "data.shuffle=false", "data.pack=false"]
STEPS = 3


@pytest.mark.multiprocess
def test_two_processes_give_the_same_losses_as_one(tmp_path):
  env = {**os.environ, "PYTHON": sys.executable, "STEPS": str(STEPS)}
  args = [*ARGS, f"train.run_dir={tmp_path}", "train.name=two"]
  run = subprocess.run([str(ROOT / "launch/multiprocess_cpu.sh"), *args], env=env, cwd=ROOT, timeout=600,
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
  assert "process 1/2: mesh" in run.stdout and "(4 local)" in run.stdout
  two = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
  one = loop.fit(config.load(ROOT / ARGS[0], ARGS[1:] + [f"train.steps={STEPS}"]), tmp_path / "one")  # 1 x 8
  for key in ["loss", "ce", "mtp_loss", "aux_loss", "grad_norm", "expert_load_max_over_mean"]:
    np.testing.assert_allclose([m[key] for m in two], [m[key] for m in one], rtol=1e-5, err_msg=key)
  assert [m["dropped_pairs"] for m in two] == [m["dropped_pairs"] for m in one] == [0] * STEPS

