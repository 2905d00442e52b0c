"""R1-Zero end to end on the tiny model (slow): a base SFT stage on task text, then GRPO must raise eval
accuracy; the trained model then serves the sampler tests that need a model that has learned something
(MTP speculative decoding with accepted drafts, `r1jax generate` and `r1jax eval` on a run directory)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from r1jax import checkpoint, cli, config, sampler, sharding, tokenizer
from r1jax.rl import pipeline, rollouts

pytestmark = pytest.mark.slow
ROOT = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_r1zero.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """tiny_r1zero.yaml as the demo runs it, with 40 GRPO steps instead of 80 (about 2 minutes on 2 cores), and
  eval on 256 problems (one problem is 0.004)."""
  run_dir = tmp_path_factory.mktemp("r1zero") / "run"
  cfg = config.load(ROOT, ["train.steps=40", "grpo.eval_every=40", "checkpoint.every=40", "grpo.eval_prompts=256"])
  history = pipeline.r1_zero(cfg, run_dir)
  return cfg, run_dir, history


# Measured before these thresholds were set, with this fixture's config on seeds 0-3 (256 eval problems):
#   on-policy accuracy, mean of steps 21-40 minus mean of steps 1-20: +0.034, +0.008, +0.050, +0.059
#   greedy eval accuracy, after minus before:                        -0.016, +0.066, +0.012, +0.039
# So 40 GRPO steps from this weak base (eval 0.05-0.13) raise the accuracy of the policy's own samples on every
# seed, by little, and do not move greedy eval accuracy measurably (+0.025, spread 0.035). The test asserts what
# the measurements support and no more: a rise in on-policy accuracy, and no eval loss beyond the measured spread.
# The large RL effect is the R1 pipeline's final RL stage (docs/rl.md: from SFT's 0.5-0.9 to >= 0.9 on 3 seeds).
ON_POLICY_GAIN = 0.0  # every measured seed above it (minimum +0.008)
EVAL_DROP = 0.05  # the lowest measured change, -0.016, less about one spread


def test_grpo_raises_accuracy(run):
  cfg, run_dir, history = run
  before = json.loads((run_dir / "grpo" / "eval_before.json").read_text())["accuracy"]
  after = history[-1]["eval_accuracy"]
  acc = [m["reward_accuracy"] for m in history]
  half = len(acc) // 2
  assert np.mean(acc[half:]) > np.mean(acc[:half]) + ON_POLICY_GAIN, acc
  assert after >= before - EVAL_DROP, (before, after)
  assert all(np.isfinite(m["loss"]) for m in history) and history[-1]["skipped_steps"] == 0
  samples = [json.loads(line) for line in (run_dir / "grpo" / "samples.jsonl").read_text().splitlines()]
  assert samples and {"prompt", "completion", "accuracy", "format", "total"} <= set(samples[0])
  for name in ("reward_mean", "reward_accuracy", "clip_frac", "entropy", "tis_mean", "replay_mismatch_frac",
               "expert_load_max_over_mean", "completion_len_mean", "truncated_frac", "data_s", "step_s"):
    assert name in history[-1], name
  assert (run_dir / "grpo" / "plots").is_dir() and (run_dir / "base" / "checkpoints").is_dir()


def test_mtp_drafts_are_accepted_and_exact(run):
  """The trained MTP module drafts the next-but-one token: greedy output is unchanged, fewer steps run."""
  cfg, run_dir, _ = run
  tok = tokenizer.load(cfg.data.tokenizer)
  mesh = sharding.make_mesh(cfg.mesh)
  examples = rollouts.task_examples(cfg, "eval", 16)
  prompts = [[tok.bos_id, *tok.encode(ex.prompt)] for ex in examples]
  greedy = dataclasses.replace(cfg.sampler, temperature=0.0)
  with jax.set_mesh(mesh):
    params = checkpoint.load_params(run_dir / "grpo", cfg, mesh)
    plain = sampler.generate(params, prompts, cfg.model, cfg.compute, greedy, eos_id=tok.eos_id, pad_id=tok.pad_id)
    spec = sampler.generate(params, prompts, cfg.model, cfg.compute, dataclasses.replace(greedy, speculative=True),
                            eos_id=tok.eos_id, pad_id=tok.pad_id)
  assert sampler.completions(spec) == sampler.completions(plain)
  accepted = np.asarray(spec.accepted_drafts).sum()
  generated = np.asarray(spec.completion_len_B).sum()
  print(f"MTP drafts accepted: {accepted} of {generated} tokens; steps {int(spec.steps)} vs {int(plain.steps)}")
  assert accepted / generated > 0.2, (accepted, generated)  # measured: see the README
  assert int(spec.steps) < int(plain.steps)


def test_generate_and_eval_commands_on_the_run(run, capsys):
  cfg, run_dir, _ = run
  assert cli.main(["generate", str(run_dir / "grpo"), "sampler.temperature=0", "--prompt", "reverse 1234\n"]) == 0
  out, err = capsys.readouterr()
  assert "<answer>" in out and "tokens/s" in err
  assert cli.main(["eval", str(run_dir / "grpo"), "--n", "16", "--k", "2"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["task"] == "reverse" and 0 <= result["accuracy"] <= 1 and "pass@2" in result
