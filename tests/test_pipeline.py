"""The R1 pipeline at toy size (every stage a few steps, slow), rejection sampling's filter against the task
checker, stage ordering errors, and `r1jax cost` against the seed's arithmetic."""

import dataclasses
import json
import os

import numpy as np
import pytest

from r1jax import cli, config, tasks
from r1jax.config import ConfigError
from r1jax.rl import pipeline, rewards

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_rejection_keeps_exactly_the_correct_well_formed_finished_samples():
  examples = tasks.make("countdown", 3, seed=1, split="train")
  good = [tasks.cold_start_completion(ex).replace("<think>", "<think>try ", 1) for ex in examples]
  cases = []
  for ex, g in zip(examples, good):
    cases += [(ex, g, True), (ex, g, False),  # correct but cut by the budget (no EOS)
              (ex, g, True),  # a duplicate
              (ex, g.replace("<think>", ""), True),  # badly formed
              (ex, f"<think>x</think><answer>{ex.reference}</answer>", True),  # the bare target is no expression
              (ex, "<think>x</think><answer>1+1</answer>", True)]
  kept = pipeline.keep_correct([c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases])
  assert kept == [{"prompt": ex.prompt, "completion": g} for ex, g in zip(examples, good)]
  for record, ex in zip(kept, examples):  # independently: the checker accepts the answer, the format holds
    answer = rewards.extract_answer(record["completion"])
    assert tasks.countdown_value(answer, ex.metadata["numbers"]) == ex.metadata["target"]
    assert rewards.format_(ex, record["completion"], {}) == 1.0


def test_stage_order_is_checked(tmp_path):
  cfg = config.load(os.path.join(ROOT, "tiny_r1zero.yaml"), ["pipeline.stages=rl"])
  with pytest.raises(ConfigError, match="stage rl needs cold_start"):
    pipeline.run(cfg, tmp_path)
  with pytest.raises(ConfigError, match="unknown stage 'rlhf'"):
    config.load(os.path.join(ROOT, "tiny_r1zero.yaml"), ["pipeline.stages=base,rlhf"])


def test_cost_reproduces_the_seed_figures(capsys):
  v3 = os.path.join(ROOT, "deepseek_v3_671b.yaml")
  assert cli.main(["cost", v3, "--gpu-hours", "2.788e6", "--price", "2", "--json"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert round(r["reported_dollars"]) == 5_576_000
  # 6 x 36.6B active params (37.55B less the 0.93B embedding lookup) x 14.8T tokens = 3.25e24, + attention
  assert 3.2e24 < r["train_flops"] < 3.8e24
  assert 0.3 < r["implied_mfu"] < 0.45  # of H800's dense bf16 peak, 989.4 TFLOP/s
  assert cli.main(["cost", v3, "--gpu", "a100", "--price", "1.35", "--fleet", "50000", "--fleet-hours", "168",
                   "--json"]) == 0
  assert round(json.loads(capsys.readouterr().out)["fleet"]["dollars"]) == 11_340_000


@pytest.mark.slow
def test_toy_pipeline_runs_every_stage_and_reports(tmp_path):
  overrides = ["grpo.task=copy", "data.task_digits=2", "data.task_examples=60", "train.seq_len=40",
               "sampler.max_new_tokens=16", "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.eval_every=100",
               "grpo.eval_prompts=4", "checkpoint.every=100", "pipeline.base_steps=40", "pipeline.r1zero_steps=2",
               "pipeline.cold_start_examples=40", "pipeline.cold_start_steps=120", "pipeline.rl_steps=2",
               "pipeline.rejection_prompts=16", "pipeline.rejection_k=4", "pipeline.min_kept=4",
               "pipeline.sft_steps=60", "pipeline.final_rl_steps=2", "pipeline.distill_steps=3", "pipeline.eval_prompts=4", "pipeline.eval_k=1"]
  cfg = config.load(os.path.join(ROOT, "tiny_r1zero.yaml"), overrides)
  report = pipeline.run(cfg, tmp_path)
  # Determinism: the same config and seed on the same machine gives the same report, metrics and samples, bit for
  # bit (only wall-clock timings differ). The rerun covers the first two stages, an SFT and a GRPO stage with their
  # evals and sampling, which every later stage repeats; it finds its programs in the persistent compilation cache.
  again = pipeline.run(dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, stages=("base", "r1zero"))),
                       tmp_path / "again")
  assert list(again["stages"]) == ["base", "r1zero"]
  for stage in again["stages"]:
    assert json.dumps(again["stages"][stage], sort_keys=True) == json.dumps(report["stages"][stage], sort_keys=True)
  timings = {"time", "data_s", "step_s", "rollout_s"}
  for path in (tmp_path / "again").glob("*/**/metrics.jsonl"):
    first = tmp_path / path.relative_to(tmp_path / "again")
    strip = [{k: v for k, v in json.loads(line).items() if k not in timings} for line in path.read_text().splitlines()]
    assert strip == [{k: v for k, v in json.loads(line).items() if k not in timings}
                     for line in first.read_text().splitlines()], path
  name = "r1zero/grpo/samples.jsonl"
  assert (tmp_path / name).read_text() == (tmp_path / "again" / name).read_text(), name
  assert list(report["stages"]) == list(pipeline.EVALUATED)
  # 120 cold-start steps teach the toy model to copy (greedy eval 4 of 4 on 2 CPUs; rejection keeps 15 of 64 samples
  # at temperature 1). At 30 steps it kept 1 of 64, so any change to the arithmetic could have left none.
  assert report["rejection"]["kept"] > 0
  assert (tmp_path / "report.md").read_text().count("\n| ") == len(pipeline.EVALUATED) + 1
  for stage, start in (("r1zero", "base"), ("rl", "cold_start"), ("final_rl", "sft")):  # each from its parent
    saved = config.load(tmp_path / stage / "grpo" / "config.yaml")
    assert saved.grpo.init == str(pipeline.stage_model_dir(tmp_path, start))
  assert (tmp_path / "report.png").stat().st_size > 0 and (tmp_path / "rejection" / "data.jsonl").exists()
  assert report["distill_samples"]["kept"] > 0  # the student learns from the final model's samples
  assert report["stages"]["distill"]["model"].startswith("gqa")


def test_seeds_summary_is_each_stages_mean_min_and_max():
  accuracy = {"base": [0.1, 0.3, 0.2], "final_rl": [0.9, 1.0, 0.95]}
  reports = {s: {"stages": {stage: {"model": "m", "accuracy": v[i], "format": 1.0, "pass@4": v[i] + 0.01}
                            for stage, v in accuracy.items()}, "rejection": {"kept": 10 + i}, "distill_samples": None}
             for i, s in enumerate((5, 6, 7))}
  summary = pipeline.summarize(reports, 4)
  assert summary["seeds"] == [5, 6, 7] and summary["kept"] == {"rejection": [10, 11, 12], "distill_samples": []}
  for stage, values in accuracy.items():
    row = summary["stages"][stage]["accuracy"]
    assert row["per_seed"] == values and row["min"] == min(values) and row["max"] == max(values)
    np.testing.assert_allclose(row["mean"], np.mean(values), rtol=1e-12)
  table = pipeline.seeds_table({**summary, "task": "reverse", "eval_prompts": 128})
  assert "| final_rl | m | 0.950 [0.900, 1.000] |" in table


def test_a_seed_refused_at_rejection_sampling_is_named_and_the_others_summarised(tmp_path, monkeypatch):
  """A seed whose rl stage kept too few samples stops (TooFewSamples); the others finish, the summary and
  seeds.md name the stopped seed, and the command still fails once everything is written."""
  def fake_run(cfg, run_dir, resume=False):
    if cfg.train.seed == 1:
      raise pipeline.TooFewSamples("rejection sampling kept 1 of 4096 samples")
    return {"stages": {"final_rl": {"model": "m", "accuracy": 1.0, "format": 1.0}}, "rejection": {"kept": 300},
            "distill_samples": None}

  monkeypatch.setattr(pipeline, "run", fake_run)
  cfg = config.load(os.path.join(ROOT, "tiny_r1.yaml"))
  with pytest.raises(pipeline.TooFewSamples, match=r"^1 of 3 seeds stopped at rejection sampling: seed 1"):
    pipeline.run_seeds(cfg, tmp_path, seeds=3)
  summary = json.loads((tmp_path / "seeds.json").read_text())
  assert summary["seeds"] == [0, 2] and list(summary["failed"]) == ["1"]
  assert "Seed 1 stopped, not in the table: rejection sampling kept 1 of 4096" in (tmp_path / "seeds.md").read_text()


def test_an_unfinished_stage_resumes_inside_itself(tmp_path):
  """A stage stopped at step 4 of 8 (as SIGTERM leaves it: a checkpoint at 4) continues from 4 on rerun;
  without --resume the pipeline refuses to overwrite it."""
  overrides = ["pipeline.stages=base", "grpo.task=copy", "data.task_digits=2", "data.task_examples=60",
               "train.seq_len=32", "checkpoint.every=2", "pipeline.eval_prompts=4", "pipeline.eval_k=1"]
  cfg = config.load(os.path.join(ROOT, "tiny_r1zero.yaml"), [*overrides, "pipeline.base_steps=4"])
  pipeline.run(cfg, tmp_path)
  longer = config.load(os.path.join(ROOT, "tiny_r1zero.yaml"), [*overrides, "pipeline.base_steps=8"])
  with pytest.raises(ConfigError, match="already holds checkpoints"):
    pipeline.run(longer, tmp_path)
  pipeline.run(longer, tmp_path, resume=True)
  steps = [json.loads(line)["step"] for line in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, 9))  # 1-4 from the first run, 5-8 from the resumed one, each once


def test_grpo_with_a_kl_reference_from_a_checkpoint(tmp_path):
  """The reference's weights outlive the donated train state: two GRPO steps with k3 KL from a base stage."""
  overrides = ["grpo.task=copy", "data.task_digits=2", "data.task_examples=60", "train.seq_len=40",
               "sampler.max_new_tokens=12", "grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.base_steps=2",
               "train.steps=2", "grpo.kl_beta=0.05", "grpo.eval_prompts=4", "grpo.zero_variance=count"]
  history = pipeline.r1_zero(config.load(os.path.join(ROOT, "tiny_r1zero.yaml"), overrides), tmp_path)
  assert len(history) == 2 and all("kl" in m and m["kl"] >= 0 for m in history)


def test_bad_grpo_settings_fail_before_training(tmp_path):
  cfg = config.load(os.path.join(ROOT, "tiny_r1zero.yaml"), ["grpo.rewards=acuracy:1.0"])
  with pytest.raises(ConfigError, match="acuracy"):
    pipeline.r1_zero(cfg, tmp_path)
  cfg = config.load(os.path.join(ROOT, "tiny_r1zero.yaml"), ["sampler.temperature=0"])
  with pytest.raises(ConfigError, match="sampler.temperature=0"):
    pipeline.r1_zero(cfg, tmp_path)
  assert not any(tmp_path.iterdir())  # nothing was trained or written
