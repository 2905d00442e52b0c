"""Benchmarks with JSON output. Each reports what it measured, the physical bound it is compared with and
how that bound was obtained; nothing here is asserted by tests (tests check correctness, not speed)."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import config, model, sampler, sharding
from r1jax.config import ConfigError, RunConfig


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def median_seconds(fn, *args, repeats: int, warmup: int = 1, calls: int = 1) -> float:
  """Median wall time of one fn(*args) over `repeats` samples after `warmup` (which includes compilation).
  A sample times `calls` back-to-back launches and one final sync, divided by `calls`: for sub-millisecond
  kernels this hides the host's dispatch and sync round trip (tens of microseconds) behind device work."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls - 1):
      fn(*args)
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times)


def memory_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 10) -> float:
  """Device memory bandwidth from a large device-to-device copy (bytes read + bytes written)."""
  return 2 * n_bytes / median_seconds(jax.jit(lambda a: a + 1.0), jnp.ones(n_bytes // 4, jnp.float32),
                                      repeats=repeats) / 1e9


def cache_values_per_token(cfg) -> dict:
  """Values cached per token and layer: MLA's latent + rope key vs a full per-head key/value cache."""
  if cfg.attention == "gqa":
    full = 2 * cfg.n_kv_heads * cfg.head_dim
    return {"cached": full, "full_per_head": full, "ratio": 1.0}
  cached = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  full = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  return {"cached": cached, "full_per_head": full, "ratio": cached / full}


def bench_sampler(cfg: RunConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
                  speculative: bool = False) -> dict:
  """Greedy generation of `new_tokens` per row (EOS never stops a row) from random prompts, with weights in
  the compute dtype. Reports tokens/s (median of `repeats` timed calls after a warm-up call that compiles),
  and the bound set by reading every weight once per decode step at the measured memory bandwidth."""
  mcfg = dataclasses.replace(cfg.model, param_dtype=cfg.model.dtype)
  scfg = dataclasses.replace(cfg.sampler, max_new_tokens=new_tokens, temperature=0.0, speculative=speculative)
  mesh = sharding.make_mesh(cfg.mesh)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, mcfg.vocab_size, (batch, prompt_len)).tolist()
  with jax.set_mesh(mesh):
    params = model.init(mcfg, jax.random.key(0), mesh)
    t0 = time.perf_counter()
    out = sampler.generate(params, prompts, mcfg, scfg, eos_id=-1)
    jax.block_until_ready(out.tokens_BxS)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = sampler.generate(params, prompts, mcfg, scfg, eos_id=-1)
      jax.block_until_ready(out.tokens_BxS)
      times.append(time.perf_counter() - t0)
    steps = int(out.steps)
    prefill = sampler.generate(params, prompts, mcfg, dataclasses.replace(scfg, max_new_tokens=1), eos_id=-1)
    jax.block_until_ready(prefill.tokens_BxS)
    t0 = time.perf_counter()
    jax.block_until_ready(sampler.generate(params, prompts, mcfg, dataclasses.replace(scfg, max_new_tokens=1),
                                           eos_id=-1).tokens_BxS)
    prefill_s = time.perf_counter() - t0
  seconds = statistics.median(times)
  weight_bytes = _tree_bytes(params) - (_tree_bytes(params["mtp"]) if "mtp" in params and not speculative else 0)
  bandwidth = memory_bandwidth_gbs() if jax.devices()[0].platform == "gpu" else float("nan")  # CPU: no bound
  bound_step_s = weight_bytes / (bandwidth * 1e9)  # one device: every weight read once per decode step
  return {
      "bench": "sampler", "platform": jax.devices()[0].platform, "devices": jax.device_count(),
      "mesh": dict(mesh.shape), "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
      "speculative": speculative, "compile_and_first_call_s": first_s, "seconds_median": seconds,
      "seconds_all": times, "tokens_per_s": batch * new_tokens / seconds, "decode_steps": steps,
      "mtp_accept_rate": float(np.asarray(out.accepted_drafts).sum() / max(batch * steps, 1)) if speculative else None,
      "prefill_plus_one_token_s": prefill_s, "weight_bytes": weight_bytes,
      "memory_bandwidth_gbs": None if math.isnan(bandwidth) else bandwidth,
      "bound_tokens_per_s": None if math.isnan(bound_step_s) else batch / bound_step_s,
      "cache_values_per_token_per_layer": cache_values_per_token(mcfg),
  }


def bench_rl_demo(cfg: RunConfig, run_dir, target: float = 0.8) -> dict:
  """The R1-Zero demo end to end (base SFT stage, then GRPO; rl/pipeline.py) in `run_dir`: eval accuracy
  against wall-clock time from the start (compilation included), the time to reach `target`, and the
  GRPO stage's rollout vs learner time. Draws RUN/accuracy_vs_time.png."""
  import json
  from pathlib import Path

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from r1jax.rl import pipeline

  run_dir = Path(run_dir)
  t0 = time.time()
  pipeline.r1_zero(cfg, run_dir)
  total_s = time.time() - t0
  rows = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
  before = json.loads((run_dir / "grpo" / "eval_before.json").read_text())["accuracy"]
  base_end = rows[0]["time"] - rows[0]["data_s"] - rows[0]["step_s"]  # when GRPO's first step began
  curve = [(base_end - t0, before, 0)] + [(r["time"] - t0, r["eval_accuracy"], r["step"]) for r in rows
                                           if "eval_accuracy" in r]
  reached = next((t for t, acc, _ in curve if acc >= target), None)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([t / 60 for t, _, _ in curve], [a for _, a, _ in curve], marker="o")
  ax.axhline(target, color="gray", lw=0.8, ls="--")
  ax.axvline((base_end - t0) / 60, color="gray", lw=0.8, ls=":")
  ax.set(xlabel="wall-clock minutes (base SFT stage, then GRPO)", ylabel="eval accuracy (greedy)",
         title=f"R1-Zero on {cfg.grpo.task}: {jax.device_count()} {jax.devices()[0].platform} devices")
  fig.tight_layout()
  fig.savefig(run_dir / "accuracy_vs_time.png", dpi=100)
  return {"bench": "rl-demo", "task": cfg.grpo.task, "platform": jax.devices()[0].platform,
          "devices": jax.device_count(), "total_s": total_s, "base_stage_s": base_end - t0,
          "curve": [{"seconds": t, "eval_accuracy": a, "grpo_step": s} for t, a, s in curve],
          "target": target, "seconds_to_target": reached,
          "grpo_rollout_s": sum(r["data_s"] for r in rows), "grpo_learner_s": sum(r["step_s"] for r in rows),
          "plot": str(run_dir / "accuracy_vs_time.png")}


def bench_grpo(cfg: RunConfig, steps: int = 4) -> dict:
  """GRPO steps of a fresh model (no checkpoints): the rollout (sampler + rewards + batch) and the learner
  (train.jit_step of rl.grpo.grpo_step) timed apart, as tokens/s: generated tokens per rollout second, and
  real (prompt + completion) tokens per learner second. The first step (compilation) is reported apart."""
  import functools

  from r1jax import train
  from r1jax.rl import grpo, rollouts

  mesh = sharding.make_mesh(cfg.mesh)
  step_fn = functools.partial(grpo.grpo_step, gcfg=cfg.grpo, temperature=cfg.sampler.temperature,
                              norm_len=cfg.sampler.max_new_tokens)
  rows = []
  with jax.set_mesh(mesh):
    state = train.init_state(cfg, jax.random.key(0), mesh)
    source = rollouts.RolloutSource(cfg, mesh)
    step_jit = None
    for _ in range(steps):
      t0 = time.perf_counter()
      batch, info = source.next_batch(state)
      jax.block_until_ready(batch)
      t1 = time.perf_counter()
      step_jit = step_jit or train.jit_step(step_fn, state, batch, mesh)
      state, metrics = step_jit(state, batch)
      jax.block_until_ready(metrics)
      t2 = time.perf_counter()
      generated = float(np.asarray(batch["loss_mask"]).sum())
      real = float(np.asarray(batch["token_mask"]).sum())
      rows.append({"rollout_s": t1 - t0, "learner_s": t2 - t1, "generated_tokens": generated, "real_tokens": real})
  timed = rows[1:] or rows
  med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
  return {"bench": "grpo", "platform": jax.devices()[0].platform, "devices": jax.device_count(),
          "rows": cfg.grpo.prompts_per_step * cfg.grpo.group_size, "seq_len": cfg.train.seq_len,
          "max_new_tokens": cfg.sampler.max_new_tokens, "first_step": rows[0], "steps": rows,
          "rollout_tokens_per_s": med("generated_tokens") / med("rollout_s"),
          "learner_tokens_per_s": med("real_tokens") / med("learner_s"),
          "rollout_s_median": med("rollout_s"), "learner_s_median": med("learner_s")}


def matmul_peak_tflops(n: int = 8192, repeats: int = 20) -> float:
  """The bf16 matmul throughput this device reaches on an n x n x n product (the MFU denominator)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  return 2 * n**3 / median_seconds(jax.jit(lambda x: x @ x), a, repeats=repeats, calls=10) / 1e12


def train_batch(cfg: RunConfig, packed: int = 0, tokens=None) -> dict:
  """Random tokens (or the given [B, L+1] `tokens`) of train.batch_size x train.seq_len; packed > 0 splits
  each row into that many segments."""
  B, L = cfg.train.batch_size, cfg.train.seq_len
  if tokens is None:
    tokens = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (B, L + 1)).astype(np.int32)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((B, L), np.int32)}
  if packed:
    seg_L = np.minimum(np.arange(L) * packed // L, packed - 1) + 1
    batch["segment_ids"] = np.broadcast_to(seg_L, (B, L)).astype(np.int32)
    starts = np.searchsorted(seg_L, seg_L)  # first position of each position's segment
    batch["positions"] = np.broadcast_to(np.arange(L) - starts, (B, L)).astype(np.int32)
    batch["token_mask"] = np.ones((B, L), np.int32)
  return batch


def progressions(rng: np.random.Generator, B: int, L: int, vocab_size: int) -> np.ndarray:
  """[B, L] int32 arithmetic progressions mod the vocabulary (ids from 3 up: 0-2 stay special), random start
  and stride 1-3 per row: learnable from a row's first two tokens, unlike random tokens, so a loss comparison
  measures learning rather than how fast one fixed batch is memorised."""
  start, stride = rng.integers(3, vocab_size, (B, 1)), rng.integers(1, 4, (B, 1))
  return ((start + stride * np.arange(L)) % (vocab_size - 3) + 3).astype(np.int32)


def bench_train(cfg: RunConfig, steps: int = 10, warmup: int = 2, packed: int = 0,
                data: Literal["random", "progressions"] = "random") -> dict:
  """The jitted SFT step (train.jit_sft_step, as `r1jax sft` runs it) on one batch of random tokens every
  step, or on a fresh batch of `progressions` each step (all placed on the device before timing), one
  sequence per row (as `data.pack=false` gives; packed > 0 adds segment ids as packing does): compile time, the
  median of `steps` timed steps after `warmup`, tokens/s, model FLOPs/token (cost.py), MFU against a bf16
  matmul peak measured in the same process, peak device memory, XLA's memory analysis next to
  `r1jax info`'s activation (+ gradient) estimate, and on an expert-parallel mesh the measured all-to-all
  against its prediction (bench_all_to_all)."""
  from r1jax import cost, memory, train

  mesh = sharding.make_mesh(cfg.mesh)
  B, L, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
  rng = np.random.default_rng(0)
  batches = ([train_batch(cfg, packed)] if data == "random" else
             [train_batch(cfg, packed, progressions(rng, B, L + 1, V)) for _ in range(warmup + steps)])
  with jax.set_mesh(mesh):
    state = train.init_state(cfg, jax.random.key(0), mesh)
    batches = [jax.device_put(b, train.batch_shardings(b, mesh)) for b in batches]
    t0 = time.perf_counter()
    compiled = train.jit_sft_step(state, batches[0], mesh).lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    times, losses, ces = [], [], []
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batches[i % len(batches)])
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
      losses.append(float(metrics["loss"]))
      ces.append(float(metrics["ce"]))
    a2a = bench_all_to_all(cfg, mesh) if mesh.shape["expert"] > 1 else None
  analysis = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats() or {}
  seconds = statistics.median(times)
  tokens = cfg.train.batch_size * cfg.train.seq_len
  flops = cost.train_flops_per_token(model.param_count(cfg.model), cfg.model, cfg.train.seq_len)
  platform = jax.devices()[0].platform
  peak = matmul_peak_tflops() if platform == "gpu" else float("nan")
  sizes = sharding.axis_sizes(cfg.mesh, jax.device_count())
  # XLA's temporaries hold the gradients and the FP8 expert tiles as well as the activations
  fused = platform == "tpu" or (platform == "gpu" and not packed)  # what nn/attention.py's auto picks here
  estimate = (memory.activation_bytes(cfg.model, sizes, cfg.train.batch_size, cfg.train.seq_len, fused)
              + memory.state_bytes(cfg, sizes)["grads"] + memory.expert_tile_bytes(cfg, sizes))
  temp = None if analysis is None else int(analysis.temp_size_in_bytes)
  return {
      "bench": "train", "platform": platform, "device_kind": jax.devices()[0].device_kind,
      "devices": jax.device_count(), "mesh": sizes, "batch": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
      "packed_segments_per_row": packed, "remat": cfg.model.remat, "attention_impl": cfg.model.attention_impl,
      "n_mtp": cfg.model.n_mtp, "param_dtype": cfg.model.param_dtype, "compile_s": compile_s,
      "step_s_median": seconds, "step_s_all": times, "tokens_per_s": tokens / seconds,
      "model_flops_per_token": flops["total"], "matmul_peak_tflops": None if math.isnan(peak) else peak,
      "mfu": None if math.isnan(peak) else flops["total"] * tokens / seconds / (peak * 1e12),
      "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
      "xla_temp_gib": None if temp is None else temp / 2**30,
      "info_activations_plus_grads_gib": estimate / 2**30,
      "estimate_over_xla_temp": None if not temp else estimate / temp, "data": data, "losses": losses, "ce": ces,
      "tokens_per_s_per_device": tokens / seconds / jax.device_count(), "all_to_all": a2a,
  }


def parse_arms(texts) -> dict[str, list[str]]:
  """`NAME:section.field=value[,section.field=value]` per text -> {NAME: overrides} (bench fp8 --arm)."""
  arms = {}
  for text in texts:
    name, sep, overrides = text.partition(":")
    if not sep or not name or not overrides or name in arms or name in ("off", "on", "off_lr_x1.001"):
      raise ConfigError(f"--arm {text!r}: expected NAME:section.field=value[,...] with a new NAME")
    arms[name] = overrides.split(",")
  return arms


def bench_fp8(cfg: RunConfig, steps: int = 10, gemms: bool = True, seeds: int = 1, first_seed: int = 0,
              arms: dict[str, list[str]] | None = None) -> dict:
  """FP8 against bf16: the V3 671B GEMM shapes at 4096 tokens (fp8_bench.bench_gemms, GPU only: TFLOP/s, ratio to
  bf16, error vs fp32) and the quantisations (fp8_bench.bench_quantize: XLA vs the one-pass kernel), unless
  `gemms` is off; then the train step with model.fp8 off and on (train_ab): the speed timed interleaved on one
  state with GPU clock and power, and `steps`-step loss curves (>= 100 for the issue's 1% bar) from `seeds`
  inits (from `first_seed` on, so calls can pool seeds) on fresh learnable batches, each ending in the mean of
  its last 10 steps, next to two controls on the first seed: FP8 off at lr x 1.001, and FP8 off repeated (the
  backend's own run-to-run noise). Parts whose input dims are not whole blocks stay bf16 (attention off then).
  `arms`: more FP8-on configurations ({name: overrides}, parse_arms) timed in the same interleaved speed run."""
  from r1jax import fp8_bench, train, train_ab

  if seeds < 1 or steps < 1:
    raise ValueError(f"bench fp8: steps ({steps}) and seeds ({seeds}) must be at least 1")
  out = {"bench": "fp8", "platform": jax.devices()[0].platform}
  if out["platform"] == "gpu" and gemms:  # 4096 x 7168 x 18432 GEMMs: not for a CPU
    out["gemms"] = fp8_bench.bench_gemms()
    out["quantize"] = fp8_bench.bench_quantize()
  on = dataclasses.replace(cfg.model.fp8, enabled=True)
  try:
    dataclasses.replace(cfg.model, fp8=on).validate()
  except ConfigError:  # some attention input dim is not whole blocks
    on = dataclasses.replace(on, attention=False)
  cfgs = {"off": dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fp8=dataclasses.replace(on, enabled=False))),
          "on": dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fp8=on)).validate()}
  # The control: FP8 off with the learning rate nudged by 0.1%, a perturbation with no FP8 in it
  # (bench/results/cpu2_fp8_loss_calibration.json).
  cfgs["off_lr_x1.001"] = dataclasses.replace(cfgs["off"], optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr * 1.001))
  extra = {name: config.apply_overrides(cfgs["on"], overrides) for name, overrides in (arms or {}).items()}
  mesh = sharding.make_mesh(cfg.mesh)
  tokens = cfg.train.batch_size * cfg.train.seq_len
  with jax.set_mesh(mesh):
    state = train.init_state(cfgs["off"], jax.random.key(0), mesh)
    batch = train_batch(cfg)  # random tokens: the speed does not depend on the data
    batch = jax.device_put(batch, train.batch_shardings(batch, mesh))
    compiled = {"off": train_ab.compile_arm(cfgs["off"], state, batch, mesh)}
    try:  # a failure here is reported in the JSON next to the measurements above, not lost with them
      for name, c in [("on", cfgs["on"]), ("off_lr_x1.001", cfgs["off_lr_x1.001"]), *extra.items()]:
        compiled[name] = train_ab.compile_arm(c, state, batch, mesh)
      out["compile_s"] = {k: a.compile_s for k, a in compiled.items()}
      out["xla_temp_gib"] = {k: a.xla_temp_gib for k, a in compiled.items()}
      timed = ["off", "on", *extra]
      speed, state = train_ab.speed({k: compiled[k] for k in timed}, state, batch)
      del state
      for name in timed:
        speed[name]["tokens_per_s"] = tokens / speed[name]["step_s_median"]
      out["train_speed"] = speed
      out["train_speedup"] = speed["on"]["speedup_vs_off"]
      seed_list = list(range(first_seed, first_seed + seeds))
      ce = {name: [train_ab.loss_curve(compiled[name], mesh, seed, steps) for seed in seed_list] for name in ("off", "on")}
      ce["off_lr_x1.001"] = [train_ab.loss_curve(compiled["off_lr_x1.001"], mesh, first_seed, steps)]
      # The off run once more, unchanged: a GPU step is not bitwise deterministic (its scatter-adds), and the
      # dynamics amplify that; 0 where the backend is deterministic (bench/results/h200_fp8_loss_repeats.json).
      ce["off_repeat"] = [train_ab.loss_curve(compiled["off"], mesh, first_seed, steps)]
      final = {k: [train_ab.final_ce(c) for c in v] for k, v in ce.items()}
      rel = lambda k: abs(final[k][0] - final["off"][0]) / final["off"][0]  # noqa: E731
      out["loss"] = {"steps": steps, "seeds": seed_list, "lr": cfg.optim.lr, "uniform": math.log(cfg.model.vocab_size),
                     "final_ce": final, "on_vs_off": train_ab.compare_finals(final["off"], final["on"]),
                     "first_seed_rel_diff": {k: rel(k) for k in ("on", "off_lr_x1.001", "off_repeat")}, "ce": ce}
    except Exception as e:  # noqa: BLE001
      out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
  out["fp8"] = dataclasses.asdict(on)
  if extra:
    out["arms"] = arms
  return out


def bench_all_to_all(cfg: RunConfig, mesh, repeats: int = 20, link_probe_bytes: int = 1 << 26) -> dict:
  """The MoE exchange on `mesh`, measured apart from the layer: one all-to-all of a layer's [E, C, D]
  dispatch buffer per device over the expert axes (expert_parallel's own exchange), timed; the link rate
  from a large all-to-all; and memory.all_to_all's prediction of bytes and time at that rate."""
  from jax.sharding import PartitionSpec as P

  from r1jax import memory
  from r1jax.nn import expert_parallel as ep

  sizes = {a: int(mesh.shape[a]) for a in sharding.AXES}
  B, L = cfg.train.batch_size, cfg.train.seq_len
  predicted = memory.all_to_all(cfg.model, sizes, B, L, link_GBps=1.0)  # bytes; time rescaled below
  n_ep = sizes["expert"]
  E, D = cfg.model.n_routed_experts, cfg.model.dim
  dt = jnp.dtype(cfg.model.dtype)
  all_axes = tuple(a for a in sharding.AXES if sizes[a] > 1) or None
  exp_axes = ep.Axes.from_rules().exp

  def exchange_seconds(rows: int) -> float:
    split = jax.sharding.NamedSharding(mesh, P(all_axes))
    x = jax.jit(lambda: jnp.zeros((mesh.size * E, rows, D), dt), out_shardings=split)()  # made in place
    fn = jax.jit(jax.shard_map(lambda b: ep._exchange(b, exp_axes), mesh=mesh, in_specs=P(all_axes),
                               out_specs=P(all_axes)))
    return median_seconds(fn, x, repeats=repeats)

  leaves = (n_ep - 1) / n_ep
  layer_s = exchange_seconds(predicted["capacity"])
  probe_rows = max(1, link_probe_bytes // (E * D * dt.itemsize))
  link_GBps = E * probe_rows * D * dt.itemsize * leaves / exchange_seconds(probe_rows) / 1e9 if n_ep > 1 else None
  n_ex = predicted["exchanges_per_layer"] * predicted["moe_layers"]
  out = {"expert_axis": n_ep, "capacity": predicted["capacity"], "bytes_per_exchange": predicted["bytes_per_exchange"],
         "bytes_per_step": predicted["bytes_per_step"], "measured_ms_per_exchange": 1e3 * layer_s,
         "measured_ms_per_step": 1e3 * layer_s * n_ex, "measured_link_GBps": link_GBps}
  if link_GBps:
    out["predicted_ms_per_step"] = 1e3 * predicted["bytes_per_step"] / (link_GBps * 1e9)
  return out
