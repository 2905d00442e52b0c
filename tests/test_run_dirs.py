"""Run directories a user can trust: a mismatched --resume changes nothing, a stop exits non-zero and no stage
builds on an unfinished one, one writer per run directory, and bad command-line input fails in one line
before anything compiles."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1jax import checkpoint, cli, config, data, loop, run_lock
from r1jax.config import ConfigError
from r1jax.config import resume as config_resume
from r1jax.rl import pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny.yaml"
R1ZERO = ROOT / "configs/tiny_r1zero.yaml"


def _sft(run, *args):
  return ["sft", str(TINY), "train.steps=2", "checkpoint.every=1", f"train.run_dir={run}", "train.name=s",
          "mesh.data=8", "checkpoint.async_save=false", *args]


def _steps(path: Path) -> list[int]:
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_refuses_an_architecture_change_and_touches_nothing(tmp_path, capsys):
  run = tmp_path / "s"
  assert cli.main([*_sft(tmp_path), "--resume"]) == 0  # --resume of a run that does not exist yet: said, then fresh
  assert "holds no checkpoint yet; starting from step 0" in capsys.readouterr().out
  before = sorted(p.name for p in (run / "checkpoints").iterdir())
  assert cli.main([*_sft(tmp_path, "model.dim=64", "train.steps=4"), "--resume"]) == cli.EXIT["config error"]
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "model.dim: run has 128, command says 64" in err[0], err
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing renamed, nothing dropped
  # A safe change (learning rate, more steps) resumes, is said, and is recorded in the run's config history.
  assert cli.main([*_sft(tmp_path, "optim.lr=0.002", "train.steps=3"), "--resume"]) == 0
  assert _steps(run / "metrics.jsonl") == [1, 2, 3]
  history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
  assert history[-1]["changes"]["optim.lr"] == [0.01, 0.002] and config.load(run / "config.yaml").optim.lr == 0.002


def test_resume_classifies_every_section():
  saved = config.load(TINY)
  allowed = ["optim.lr=0.001", "train.steps=9", "mesh.data=2", "checkpoint.every=3", "compute.remat=full",
             "grpo.lr=0.001", "sampler.temperature=0.7", "data.eval_source=task:copy"]
  refused = ["model.n_layers=2", "compute.param_dtype=bfloat16", "data.seed=1", "data.source=task:reverse",
             "train.batch_size=8", "train.seq_len=16", "train.seed=3", "grpo.task=sort", "grpo.group_size=4"]
  for override in allowed:
    assert [c[0] for c in config_resume.check(saved, config.load(TINY, [override]), "r")] == [override.split("=")[0]]
  for override in refused:
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
      config_resume.check(saved, config.load(TINY, [override]), "r")


def _stop_at_once(monkeypatch):
  """As if SIGTERM arrived during the first step: the loop saves that step and stops."""
  import contextlib
  import signal

  monkeypatch.setattr(loop, "_stop_signals", contextlib.contextmanager(lambda: (yield [signal.SIGTERM])))


R1Z = ["grpo.task=copy", "data.task_digits=2", "data.task_examples=60", "train.seq_len=40", "sampler.max_new_tokens=8",
       "grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.base_steps=3", "train.steps=1", "grpo.eval_prompts=4",
       "grpo.zero_variance=count", "checkpoint.async_save=false"]


def test_a_stop_exits_75_and_no_stage_builds_on_an_unfinished_one(tmp_path, monkeypatch, capsys):
  argv = ["grpo", str(R1ZERO), *R1Z, f"train.run_dir={tmp_path}", "train.name=g"]
  with monkeypatch.context() as m:
    _stop_at_once(m)
    assert cli.main(argv) == cli.EXIT["stopped"] == 75
  assert "stopped by a signal at step 1 of 3" in capsys.readouterr().err
  run = tmp_path / "g"
  assert not (run / "grpo").exists()  # GRPO never started from the 1-step base
  # A GRPO directory beside an unfinished base (as older versions left it) is set aside, kept, and redone.
  (run / "grpo" / "checkpoints" / "9").mkdir(parents=True)
  assert cli.main([*argv, "--resume"]) == 0
  out = capsys.readouterr().out
  assert "built on an unfinished base: moved to grpo.stale-1" in out and (run / "grpo.stale-1/checkpoints/9").is_dir()
  assert _steps(run / "base/metrics.jsonl") == [1, 2, 3] and checkpoint.Manager(run / "grpo/checkpoints").steps() == [1]


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
  run = tmp_path / "s"
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from r1jax import run_lock; "
                             f"run_lock.acquire(__import__('pathlib').Path({str(run)!r})); print('held', flush=True); "
                             "time.sleep(60)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert cli.main(_sft(tmp_path)) == cli.EXIT["run directory in use"]
    err = capsys.readouterr().err
    assert f"in use by pid {holder.pid} on " in err and not (run / "checkpoints").exists()
  finally:
    holder.kill()
    holder.wait()
  # The holder is dead now (killed, its lock file left behind): the next command takes the lock over.
  path = run_lock.acquire(run)
  assert "took over the lock of pid" in capsys.readouterr().out
  with pytest.raises(run_lock.RunLocked, match=f"in use by pid {os.getpid()}"):
    run_lock.acquire(run)  # our own, live
  run_lock.release(path)
  assert not path.exists()
  path.write_text(json.dumps({"host": "another-host", "pid": 1, "started": "then"}))
  with pytest.raises(run_lock.RunLocked, match="on another-host"):
    run_lock.acquire(run)  # a pid on another host cannot be checked from here: never taken over


def _ckpt_dir(tmp_path) -> Path:
  """A checkpoint directory with only its config (enough for the commands to fail before loading weights)."""
  directory = tmp_path / "ckpt"
  checkpoint.write_config(directory, config.load(R1ZERO))
  return directory


@pytest.mark.parametrize("argv, code, message", [
    (["eval", "{ckpt}", "--n", "0"], 2, "argument --n: 0 must be at least 1"),
    (["eval", "{ckpt}", "--k", "0"], 2, "argument --k: 0 must be at least 1"),
    (["pipeline", str(R1ZERO), "--seeds", "0"], 2, "argument --seeds: 0 must be at least 1"),
    (["sft", str(TINY), "--resume", "train.steps=x"], 2, "train.steps"),  # an override after a flag is still one
    (["sft", str(TINY), "--resum"], 2, "unrecognized arguments: --resum"),
    (["generate", "{ckpt}", "--prompts", "{empty}"], 2, "no prompts (the file is empty)"),
    (["generate", "{ckpt}", "model.dim=64", "--prompt", "x"], 2, "model.dim: the checkpoint has 128, the command says 64"),
    (["export-hf", "{ckpt}", "{hf}"], 2, "already holds a model"),
    (["pipeline", str(R1ZERO), "pipeline.stages=base,final_rl", "train.run_dir={tmp}"], 2, "stage final_rl needs sft"),
])
def test_bad_command_line_input_fails_in_one_line(tmp_path, capsys, argv, code, message):
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  fill = {"ckpt": str(_ckpt_dir(tmp_path)), "empty": str(tmp_path / "empty.jsonl"), "hf": str(tmp_path / "hf"),
          "tmp": str(tmp_path / "runs")}
  t0 = time.perf_counter()
  try:
    got = cli.main([a.format(**fill) for a in argv])
  except SystemExit as e:  # argparse's own errors
    got = e.code
  err = capsys.readouterr().err.strip().splitlines()
  assert got == code and message in err[-1], err
  assert not any("Traceback" in line for line in err) and time.perf_counter() - t0 < 30
  assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoints"))


def test_a_bad_jsonl_line_deep_in_the_file_fails_before_training(tmp_path):
  lines = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(2000)]
  lines[1733] = '{"prompt": "q", "completion": 7}'
  path = tmp_path / "big.jsonl"
  path.write_text("\n".join(lines) + "\n")
  cfg = config.load(TINY, [f"data.source={path}", "train.seq_len=16"])
  with pytest.raises(data.DataError, match=f"{path}:1734: 'completion' must be a string"):
    data.make_dataset(cfg)


def test_the_stage_graph_is_checked_before_any_stage_trains(tmp_path):
  cfg = config.load(R1ZERO, ["pipeline.stages=base,cold_start,sft"])
  with pytest.raises(ConfigError, match="stage sft needs rejection"):
    pipeline.run(cfg, tmp_path)
  assert not any(tmp_path.iterdir())
