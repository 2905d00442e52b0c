"""`r1jax bench fp8`: FP8 against bf16, the GEMMs and quantisers alone (fp8_gemms.py) and the train step with
compute.fp8 off and on (ab.py): speed timed interleaved on one state, loss curves over seeds."""

from __future__ import annotations

import dataclasses
import math

import jax

from r1jax import config, sharding, train
from r1jax.bench import ab, fp8_gemms
from r1jax.bench.batches import train_batch
from r1jax.config import ConfigError, RunConfig


def bench_fp8(cfg: RunConfig, steps: int = 10, gemms: bool = True, seeds: int = 1, first_seed: int = 0,
              arms: dict[str, list[str]] | None = None) -> dict:
  """FP8 against bf16: the V3 671B GEMM shapes at 4096 tokens (fp8_gemms.bench_gemms, GPU only: TFLOP/s, ratio to
  bf16, error vs fp32) and the quantisations (fp8_gemms.bench_quantize: XLA vs the one-pass kernel), unless
  `gemms` is off; then the train step with compute.fp8 off and on (ab.py): the speed timed interleaved on one
  state with GPU clock and power, and `steps`-step loss curves (>= 100 for the issue's 1% bar) from `seeds`
  inits (from `first_seed` on, so calls can pool seeds) on fresh learnable batches, each ending in the mean of
  its last 10 steps, next to two controls on the first seed: FP8 off at lr x 1.001, and FP8 off repeated (the
  backend's own run-to-run noise). Parts whose input dims are not whole blocks stay bf16 (attention off then).
  `arms`: more FP8-on configurations ({name: overrides}, parse_arms) timed in the same interleaved speed run."""
  if seeds < 1 or steps < 1:
    raise ValueError(f"bench fp8: steps ({steps}) and seeds ({seeds}) must be at least 1")
  out = {"bench": "fp8", "platform": jax.devices()[0].platform}
  if out["platform"] == "gpu" and gemms:  # 4096 x 7168 x 18432 GEMMs: not for a CPU
    out["gemms"] = fp8_gemms.bench_gemms()
    out["quantize"] = fp8_gemms.bench_quantize()
  on = dataclasses.replace(cfg.compute.fp8, enabled=True)
  try:
    dataclasses.replace(cfg.compute, fp8=on).validate_for(cfg.model)
  except ConfigError:  # some attention input dim is not whole blocks
    on = dataclasses.replace(on, attention=False)
  with_fp8 = lambda fp8_cfg: dataclasses.replace(cfg, compute=dataclasses.replace(cfg.compute, fp8=fp8_cfg))  # noqa: E731
  cfgs = {"off": with_fp8(dataclasses.replace(on, enabled=False)), "on": with_fp8(on).validate()}
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
    compiled = {"off": ab.compile_arm(cfgs["off"], state, batch, mesh)}
    try:  # a failure here is reported in the JSON next to the measurements above, not lost with them
      for name, c in [("on", cfgs["on"]), ("off_lr_x1.001", cfgs["off_lr_x1.001"]), *extra.items()]:
        compiled[name] = ab.compile_arm(c, state, batch, mesh)
      out["compile_s"] = {k: a.compile_s for k, a in compiled.items()}
      out["xla_temp_gib"] = {k: a.xla_temp_gib for k, a in compiled.items()}
      timed = ["off", "on", *extra]
      speed, state = ab.speed({k: compiled[k] for k in timed}, state, batch)
      del state
      for name in timed:
        speed[name]["tokens_per_s"] = tokens / speed[name]["step_s_median"]
      out["train_speed"] = speed
      out["train_speedup"] = speed["on"]["speedup_vs_off"]
      seed_list = list(range(first_seed, first_seed + seeds))
      ce = {name: [ab.loss_curve(compiled[name], mesh, seed, steps) for seed in seed_list] for name in ("off", "on")}
      ce["off_lr_x1.001"] = [ab.loss_curve(compiled["off_lr_x1.001"], mesh, first_seed, steps)]
      # The off run once more, unchanged: a GPU step is not bitwise deterministic (its scatter-adds), and the
      # dynamics amplify that; 0 where the backend is deterministic (bench/results/h200_fp8_loss_repeats.json).
      ce["off_repeat"] = [ab.loss_curve(compiled["off"], mesh, first_seed, steps)]
      final = {k: [ab.final_ce(c) for c in v] for k, v in ce.items()}
      rel = lambda k: abs(final[k][0] - final["off"][0]) / final["off"][0]  # noqa: E731
      out["loss"] = {"steps": steps, "seeds": seed_list, "lr": cfg.optim.lr, "uniform": math.log(cfg.model.vocab_size),
                     "final_ce": final, "on_vs_off": ab.compare_finals(final["off"], final["on"]),
                     "first_seed_rel_diff": {k: rel(k) for k in ("on", "off_lr_x1.001", "off_repeat")}, "ce": ce}
    except Exception as e:  # noqa: BLE001
      out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
  out["fp8"] = dataclasses.asdict(on)
  if extra:
    out["arms"] = arms
  return out

