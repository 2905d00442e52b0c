"""bench/ab.py's bookkeeping: the interleaved order, the seed statistics, telemetry off a GPU. Its train-step
arms run in tests/test_fp8_model.py (the FP8 training parity)."""

import math
import statistics

import jax.numpy as jnp
import pytest

from r1jax.bench import ab


def test_interleaving_alternates_the_order_every_round():
  calls = []
  steps = {name: (lambda name=name: calls.append(name) or jnp.zeros(())) for name in ("a", "b", "c")}
  times, windows = ab.interleaved_seconds(steps, rounds=4, per_round=2)
  forward, backward = ["a"] * 2 + ["b"] * 2 + ["c"] * 2, ["c"] * 2 + ["b"] * 2 + ["a"] * 2
  assert calls == forward + backward + forward + backward
  assert {k: len(v) for k, v in times.items()} == {"a": 8, "b": 8, "c": 8}
  assert [(n, r) for n, r, _, _ in windows] == [(n, r) for r in range(4) for n in ("abc" if r % 2 == 0 else "cba")]
  assert all(t0 <= t1 for _, _, t0, t1 in windows)


def test_seed_statistics_against_the_textbook_formulas():
  base, other = [4.0, 5.0, 6.0], [4.2, 4.9, 6.3]
  got = ab.compare_finals(base, other)
  paired = [(o - b) / b for b, o in zip(base, other)]
  assert got["rel_diff_of_means"] == pytest.approx((statistics.fmean(other) - 5.0) / 5.0)
  assert got["paired_rel_diff"] == pytest.approx(paired)
  assert got["paired_rel_diff_mean"] == pytest.approx(statistics.fmean(paired))
  assert got["paired_rel_diff_sem"] == pytest.approx(statistics.stdev(paired) / math.sqrt(3))
  assert got["base_seed_rel_std"] == pytest.approx(1.0 / 5.0)  # stdev of 4, 5, 6 is 1
  one = ab.compare_finals([4.0], [4.4])
  assert one["paired_rel_diff_sem"] is None and one["rel_diff_of_means"] == pytest.approx(0.1)


def test_final_ce_is_the_mean_of_the_last_ten():
  assert ab.final_ce([100.0] * 5 + list(range(10))) == pytest.approx(4.5)


def test_telemetry_off_a_gpu_says_why_and_measures_nothing():
  with ab.GpuTelemetry(period_s=0.001) as t:
    pass
  assert t.samples == [] and t.summary([(0.0, math.inf)]) == {"unavailable": "no GPU"}


def test_speed_threads_one_state_through_every_arm():
  """Fake arms that count their calls on the carried state: warm-up and timed steps of both arms all advance
  the one state, and each arm's report covers rounds x steps_per_round samples."""
  arms = {"off": lambda s, b: (s + 1, {}), "on": lambda s, b: (s + 100, {})}
  out, state = ab.speed(arms, jnp.zeros((), jnp.int32), None, rounds=2, per_round=3, warmup=1)
  assert int(state) == (1 + 6) * 1 + (1 + 6) * 100
  assert len(out["off"]["step_s_all"]) == len(out["on"]["step_s_all"]) == 6
  assert out["off"]["speedup_vs_off"] == 1.0 and len(out["on"]["speedup_per_round"]) == 2
  assert out["on"]["gpu"] == {"unavailable": "no GPU"}


def test_bench_fp8_arms_parse_and_refuse_clashes():
  """`bench fp8 --arm NAME:overrides`: the overrides split on commas; a missing part or a name the bench
  already uses is a one-line ConfigError naming the flag."""
  from r1jax.cli.bench import parse_arms
  from r1jax.config import ConfigError

  assert parse_arms(["a:compute.fp8.attention=false,compute.fp8.dense_mlp=false", "b:optim.lr=2e-4"]) == {
      "a": ["compute.fp8.attention=false", "compute.fp8.dense_mlp=false"], "b": ["optim.lr=2e-4"]}
  for bad in (["a"], [":optim.lr=1"], ["a:"], ["on:optim.lr=1"], ["a:optim.lr=1", "a:optim.lr=2"]):
    with pytest.raises(ConfigError, match="--arm"):
      parse_arms(bad)
