"""One train step under several configurations (FP8 off and on, say), compared fairly: each compiled once and
run from the same state, timed interleaved so that drift (clocks under a power cap, heat) falls on every arm
alike, next to the GPU's clock and power; and loss curves over seeds, so a loss gap is read against the
spread that seeds and the backend's non-determinism give without any change."""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from r1jax import train
from r1jax.bench.batches import progressions, train_batch
from r1jax.config import RunConfig


@dataclasses.dataclass
class Arm:
  """A configuration's train step, compiled once; runs from any state of the same shapes (the state's static
  model and compute configs and optimizer are swapped for this arm's, its arrays are untouched)."""
  cfg: RunConfig
  tx: Any
  step: Any
  compile_s: float
  xla_temp_gib: float | None

  def bind(self, state: train.TrainState) -> train.TrainState:
    return state.replace(cfg=self.cfg.model, compute=self.cfg.compute, tx=self.tx)

  def __call__(self, state, batch):
    return self.step(self.bind(state), batch)


def compile_arm(cfg: RunConfig, state: train.TrainState, batch, mesh) -> Arm:
  tx = train.make_optimizer(cfg.optim, cfg.model)  # one object per arm: it is part of the state's treedef
  bound = state.replace(cfg=cfg.model, compute=cfg.compute, tx=tx)
  t0 = time.perf_counter()
  step = train.jit_sft_step(bound, batch, mesh).lower(bound, batch).compile()
  analysis = step.memory_analysis()
  temp = None if analysis is None else analysis.temp_size_in_bytes / 2**30
  return Arm(cfg, tx, step, time.perf_counter() - t0, temp)


def interleaved_seconds(steps: dict[str, Callable[[], Any]], rounds: int, per_round: int):
  """Each arm's blocking step times, interleaved: every round runs `per_round` steps of each arm in turn, the
  order reversed every other round (A B B A ...). Returns ({arm: [seconds]}, [(arm, round, t_start, t_end)])
  with wall-clock windows for matching telemetry samples."""
  times = {name: [] for name in steps}
  windows = []
  names = list(steps)
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      t_start = time.time()
      for _ in range(per_round):
        t0 = time.perf_counter()
        jax.block_until_ready(steps[name]())
        times[name].append(time.perf_counter() - t0)
      windows.append((name, r, t_start, time.time()))
  return times, windows


class GpuTelemetry:
  """The local GPUs' SM clock (MHz, mean over GPUs), board power (W, summed) and clock-event reasons (bits
  OR-ed), sampled every `period_s` on a thread through NVML (nvidia-ml-py, in GPU images; not a dependency).
  Without NVML or an NVIDIA GPU it samples nothing and `unavailable` says why."""

  def __init__(self, period_s: float = 0.05):
    self.period_s, self.samples, self.unavailable = period_s, [], None
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    if jax.devices()[0].platform != "gpu":
      self.unavailable = "no GPU"
      return self
    try:
      import pynvml

      pynvml.nvmlInit()
      self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as e:  # noqa: BLE001  (telemetry is an annotation; its absence is reported, not fatal)
      self.unavailable = f"NVML: {type(e).__name__}: {e}"
      return self
    self._nvml = pynvml
    # renamed from ...ThrottleReasons in newer nvidia-ml-py
    self._reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    nv = self._nvml
    while not self._stop.wait(self.period_s):
      clocks = [nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM) for h in self._handles]
      watts = sum(nv.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1e3
      reasons = 0
      for h in self._handles:
        reasons |= self._reasons(h)
      self.samples.append((time.time(), sum(clocks) / len(clocks), watts, reasons))

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._nvml.nvmlShutdown()

  def summary(self, windows: list[tuple[float, float]]) -> dict | None:
    """Mean SM clock and power over the samples inside the (t_start, t_end) windows, and the reasons seen
    (NVML's bits: 0x4 software power cap, 0x20 software thermal slowdown, 0x40 hardware thermal)."""
    inside = [s for s in self.samples if any(a <= s[0] <= b for a, b in windows)]
    if not inside:
      return None if self.unavailable is None else {"unavailable": self.unavailable}
    reasons = 0
    for s in inside:
      reasons |= s[3]
    return {"sm_mhz_mean": statistics.fmean(s[1] for s in inside), "power_w_mean": statistics.fmean(s[2] for s in inside),
            "clock_event_reasons": hex(reasons), "samples": len(inside)}


def speed(arms: dict[str, Arm], state, batch, rounds: int = 6, per_round: int = 5,
          warmup: int = 2) -> tuple[dict, train.TrainState]:
  """Step time of every arm on one carried state and batch, interleaved (interleaved_seconds): each arm's
  median, the ratio of medians to the first arm (> 1: faster), the same ratio per round (its spread is the
  measurement's), and GPU telemetry per arm. Returns the state too (it is donated)."""
  holder = {"state": state}

  def runner(arm):
    def run():
      holder["state"], metrics = arm(holder["state"], batch)
      return holder["state"], metrics
    return run

  steps = {name: runner(arm) for name, arm in arms.items()}
  for run in steps.values():
    for _ in range(warmup):
      jax.block_until_ready(run())
  with GpuTelemetry() as telemetry:
    times, windows = interleaved_seconds(steps, rounds, per_round)
  def round_medians(ts):
    return [statistics.median(ts[r * per_round:(r + 1) * per_round]) for r in range(rounds)]

  base = next(iter(arms))
  base_rounds = round_medians(times[base])
  out = {"rounds": rounds, "steps_per_round": per_round}
  for name, ts in times.items():
    out[name] = {"step_s_median": statistics.median(ts), "step_s_all": ts,
                 "speedup_vs_" + base: statistics.median(times[base]) / statistics.median(ts),
                 "speedup_per_round": [b / t for b, t in zip(base_rounds, round_medians(ts))],
                 "gpu": telemetry.summary([(a, b) for n, _, a, b in windows if n == name])}
  return out, holder["state"]


def loss_curve(arm: Arm, mesh, seed: int, steps: int) -> list[float]:
  """Cross-entropy per step of `steps` steps from the init of `seed` on fresh batches of arithmetic
  progressions drawn from `seed` (batches.progressions: learnable, so the curve measures learning)."""
  cfg = arm.cfg
  B, L, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
  rng = np.random.default_rng(seed)
  state = arm.bind(train.init_state(cfg, jax.random.key(seed), mesh))
  ces = []
  for _ in range(steps):
    batch = train_batch(cfg, tokens=progressions(rng, B, L + 1, V))
    state, metrics = arm(state, jax.device_put(batch, train.batch_shardings(batch, mesh)))
    ces.append(float(metrics["ce"]))
  return ces


def final_ce(ces: list[float], last: int = 10) -> float:
  return float(np.mean(ces[-last:]))


def compare_finals(base: list[float], other: list[float]) -> dict:
  """Final losses of two arms over the same seeds: the relative gap of the means, the per-seed (paired)
  relative gaps with their mean and standard error, and the base arm's spread across seeds (sample std over
  its mean): a gap is resolved only where it exceeds these."""
  base, other = np.asarray(base, np.float64), np.asarray(other, np.float64)
  paired = (other - base) / base
  n = len(base)
  return {"mean_base": float(base.mean()), "mean_other": float(other.mean()),
          "rel_diff_of_means": float((other.mean() - base.mean()) / base.mean()),
          "paired_rel_diff": paired.tolist(), "paired_rel_diff_mean": float(paired.mean()),
          "paired_rel_diff_sem": float(paired.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
          "base_seed_rel_std": float(base.std(ddof=1) / base.mean()) if n > 1 else None}
