"""The training machinery shared by SFT, GRPO and the pipeline: gradient accumulation, non-finite steps,
checkpoints (resume after SIGTERM, a different mesh, a damaged newest step) and a run directory."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from r1jax import checkpoint, cli, config, data, loop, sharding, train
from r1jax.batch import Batch
from r1jax.config import MeshConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny.yaml"


def _cfg(*overrides):
  return config.load(TINY, ["compute.dtype=float32", *overrides])


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_accumulating_micro_batches_equals_one_large_batch():
  """Packed rows with padding, 4 micro-batches of 4 rows vs one step on all 16: each loss term is divided by
  the whole batch's units (tokens, MTP tokens, sequences), so the sums agree to fp32 rounding."""
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, expert=2))
  base = _cfg()
  local = next(data.make_iterator(base))
  assert local["token_mask"].min() == 0 and local["segment_ids"].max() >= 2  # padded and packed
  results = {}
  with jax.set_mesh(mesh):
    batch = data.assemble(local, mesh)
    for k in (1, 4):
      cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, grad_accum=k))
      state = train.init_state(cfg, jax.random.key(0), mesh)
      state, metrics = train.jit_sft_step(state, batch, mesh)(state, batch)
      results[k] = jax.device_get((state.params, metrics))
  for key in ("loss", "ce", "mtp_loss", "aux_loss", "grad_norm", "tokens"):
    np.testing.assert_allclose(results[4][1][key], results[1][1][key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), results[4][0], results[1][0])


def test_non_finite_step_is_skipped_and_counted():
  cfg = _cfg()
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  good = next(data.make_iterator(cfg))
  bad = {**good, "loss_mask": good["loss_mask"].astype(np.float32)}
  bad["loss_mask"][0, np.flatnonzero(good["loss_mask"][0])[0]] = np.inf  # the loss becomes inf
  good = {**good, "loss_mask": good["loss_mask"].astype(np.float32)}
  with jax.set_mesh(mesh):
    state = train.init_state(cfg, jax.random.key(0), mesh)
    step = jax.jit(train.sft_step)
    before = jax.device_get(state)
    state, m = step(state, Batch.of(bad))
    assert not np.isfinite(m["loss"]) and m["bad_steps"] == 1 and m["skipped_steps"] == 1
    after = jax.device_get(state)
    for name, x in _flat(before.params).items():  # params, router biases and Adam state untouched
      np.testing.assert_array_equal(_flat(after.params)[name], x, err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
    assert int(after.step) == 1
    state, m = step(state, Batch.of(good))
    assert np.isfinite(m["loss"]) and m["bad_steps"] == 0 and m["skipped_steps"] == 1


def test_run_stops_after_max_bad_steps_with_last_good_checkpoint(tmp_path, monkeypatch):
  cfg = _cfg("train.steps=8", "train.max_bad_steps=2", "checkpoint.every=2", "checkpoint.async_save=false")
  real = data.assemble
  calls = []

  def poisoned(local, mesh):  # from the 4th batch on, every loss is inf
    calls.append(1)
    if len(calls) >= 4:
      local = {**local, "loss_mask": local["loss_mask"] * np.float32(np.inf)}
    return real(local, mesh)

  monkeypatch.setattr(data, "assemble", poisoned)
  with pytest.raises(loop.TrainingStopped, match=r"step 5: .*non-finite 2 steps in a row.*last good checkpoint is 2"):
    loop.fit(cfg, tmp_path / "run")
  assert sorted(int(p.name) for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit()) == [2]


def _cli(run_dir, *args, steps):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  cmd = [sys.executable, "-m", "r1jax.cli", "sft", str(TINY), f"train.steps={steps}", f"train.run_dir={run_dir}",
         "train.name=run", "checkpoint.every=100", "mesh.data=2", "mesh.expert=4", *args]
  return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(run_dir):
  return [json.loads(line)["loss"] for line in (Path(run_dir) / "run/metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_then_resume_equals_a_straight_run(tmp_path):
  """2N steps straight vs SIGTERM after N steps of the real CLI process, then --resume: the same losses at
  every step and the same final parameters, bit for bit (data order included)."""
  N = 8
  straight = _cli(tmp_path / "straight", steps=2 * N)
  out = straight.communicate(timeout=300)[0]  # first, so that the other runs find its programs in the compile cache
  assert straight.returncode == 0, out[-3000:]
  killed = _cli(tmp_path / "killed", steps=2 * N)
  jsonl = tmp_path / "killed/run/metrics.jsonl"
  deadline = time.time() + 300
  while not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= N) and time.time() < deadline:
    time.sleep(0.2)
  killed.send_signal(signal.SIGTERM)
  out = killed.communicate(timeout=300)[0]
  assert killed.returncode == cli.EXIT["stopped"], out[-3000:]  # a stopped run is not a finished one
  assert "stop signal: saved step" in out and "stopped by a signal at step" in out
  stopped_at = len(_losses(tmp_path / "killed"))
  assert N <= stopped_at < 2 * N, stopped_at
  resumed = _cli(tmp_path / "killed", "--resume", steps=2 * N)
  out = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0 and f"resumed from step {stopped_at}" in out, out[-3000:]
  assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")  # bit-exact, every step once
  cfg = checkpoint.load_config(tmp_path / "straight/run")
  mesh = sharding.make_mesh(cfg.mesh)
  a = checkpoint.load_params(tmp_path / "straight/run", cfg, mesh)
  b = checkpoint.load_params(tmp_path / "killed/run", cfg, mesh)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
  # The run directory: metrics JSONL, TensorBoard events and PNG curves.
  run = tmp_path / "straight/run"
  assert len(_losses(tmp_path / "straight")) == 2 * N
  assert any((run / "events").iterdir())
  assert (run / "plots/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _train(cfg, mesh, steps, state=None, iterator=None):
  iterator = iterator or data.make_iterator(cfg)
  with jax.set_mesh(mesh):
    state = state or train.init_state(cfg, jax.random.key(0), mesh)
    losses = []
    for _ in range(steps):
      batch = data.assemble(next(iterator), mesh)
      state, m = train.jit_sft_step(state, batch, mesh)(state, batch)
      losses.append(float(m["loss"]))
  return state, iterator, losses


def test_restore_onto_a_different_mesh_gives_the_same_next_loss(tmp_path):
  cfg = _cfg("checkpoint.async_save=false")
  big = sharding.make_mesh(MeshConfig(data=1, expert=8))  # 8 devices, experts split 8 ways
  small = sharding.make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])  # 2 devices, experts whole
  state, iterator, _ = _train(cfg, big, 2)
  mngr = checkpoint.Manager(tmp_path, cfg.checkpoint)
  mngr.save(2, state, checkpoint.gather_process_states(iterator.get_state()))
  mngr.wait()
  _, _, next_big = _train(cfg, big, 1, state, iterator)
  with jax.set_mesh(small):
    restored, data_states = mngr.restore(cfg, small)
  assert restored.params["moe_layers"]["ffn"]["experts"]["w_gate"].sharding.mesh.size == 2
  again = data.make_iterator(cfg)
  again.set_state(data_states[0])
  _, _, next_small = _train(cfg, small, 1, restored, again)
  np.testing.assert_allclose(next_small, next_big, rtol=1e-5)


def test_damaged_newest_checkpoint_falls_back_by_name(tmp_path, caplog):
  cfg = _cfg("checkpoint.async_save=false")
  mesh = sharding.make_mesh(MeshConfig(data=8))
  state, iterator, _ = _train(cfg, mesh, 1)
  mngr = checkpoint.Manager(tmp_path, cfg.checkpoint)
  for step in (1, 2):
    mngr.save(step, state.replace(step=state.step * 0 + step), [iterator.get_state()])
  mngr.wait()
  for f in (tmp_path / "2" / "params").rglob("*"):  # truncate every data file of the newest step
    if f.is_file() and f.stat().st_size > 64:
      f.write_bytes(f.read_bytes()[:16])
  with caplog.at_level(logging.WARNING, logger="r1jax.checkpoint"), jax.set_mesh(mesh):
    resumed = checkpoint.Manager(tmp_path, cfg.checkpoint)
    restored, _ = resumed.restore(cfg, mesh)
    assert int(restored.step) == 1
    assert any(str(tmp_path / "2") in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    # the damaged step is kept aside, and the resumed run can write step 2 again
    assert (tmp_path / "unreadable-2").is_dir() and resumed.steps() == [1]
    resumed.save(2, restored.replace(step=restored.step + 1), [iterator.get_state()])
    resumed.wait()
    assert resumed.steps() == [1, 2] and int(resumed.restore(cfg, mesh)[0].step) == 2
    for f in (tmp_path / "1" / "params").rglob("*"):  # nothing readable left: an error, not a fresh start
      if f.is_file() and f.stat().st_size > 64:
        f.write_bytes(f.read_bytes()[:16])
    (tmp_path / "2").rename(tmp_path / "moved")
    with pytest.raises(RuntimeError, match="no checkpoint of .1. loads"):
      checkpoint.Manager(tmp_path, cfg.checkpoint).restore(cfg, mesh)
    assert (tmp_path / "1").is_dir()  # with no older step to load, nothing is called damaged or moved


def test_existing_run_without_resume_is_refused(tmp_path, capsys):
  run = tmp_path / "runs"
  assert cli.main(["sft", str(TINY), "train.steps=1", f"train.run_dir={run}", "train.name=x", "mesh.data=8"]) == 0
  capsys.readouterr()
  assert cli.main(["sft", str(TINY), "train.steps=1", f"train.run_dir={run}", "train.name=x", "mesh.data=8"]) == 2
  assert "already holds checkpoints" in capsys.readouterr().err
