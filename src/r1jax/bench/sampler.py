"""`r1jax bench sampler`: generation tokens/s against the bound of reading every weight once per decode step,
and (--skewed N) a length-skewed workload decoded by static batches and by continuous batching."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import numpy as np

from r1jax import continuous_batching, model, sampler, sharding
from r1jax.bench.timing import memory_bandwidth_gbs, tree_bytes
from r1jax.config import RunConfig


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
  the compute dtype (or e4m3 with block scales, model.fp8_weights, under sampler.fp8_weights). Reports
  tokens/s (median of `repeats` timed calls after a warm-up call that compiles), ms per decode step, and the
  bound set by reading every weight once per decode step at the measured memory bandwidth."""
  mcfg, compute = cfg.model, dataclasses.replace(cfg.compute, param_dtype=cfg.compute.dtype)
  scfg = dataclasses.replace(cfg.sampler, max_new_tokens=new_tokens, temperature=0.0, speculative=speculative)
  mesh = sharding.make_mesh(cfg.mesh)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, mcfg.vocab_size, (batch, prompt_len)).tolist()
  with jax.set_mesh(mesh):
    params = model.init(mcfg, compute, jax.random.key(0), mesh)
    if scfg.fp8_weights:  # what continuous_batching.rollout does before sampling
      compute = dataclasses.replace(compute, fp8=dataclasses.replace(compute.fp8, enabled=True))
      params = jax.jit(model.fp8_weights, static_argnames="compute")(params, compute)
    t0 = time.perf_counter()
    out = sampler.generate(params, prompts, mcfg, compute, scfg, eos_id=-1)
    jax.block_until_ready(out.tokens_BxS)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = sampler.generate(params, prompts, mcfg, compute, scfg, eos_id=-1)
      jax.block_until_ready(out.tokens_BxS)
      times.append(time.perf_counter() - t0)
    steps = int(out.steps)
    prefill = sampler.generate(params, prompts, mcfg, compute, dataclasses.replace(scfg, max_new_tokens=1),
                               eos_id=-1)
    jax.block_until_ready(prefill.tokens_BxS)
    t0 = time.perf_counter()
    jax.block_until_ready(sampler.generate(params, prompts, mcfg, compute,
                                           dataclasses.replace(scfg, max_new_tokens=1), eos_id=-1).tokens_BxS)
    prefill_s = time.perf_counter() - t0
  seconds = statistics.median(times)
  decode_step_s = max(seconds - prefill_s, 0.0) / max(steps, 1)
  weight_bytes = tree_bytes(params) - (tree_bytes(params["mtp"]) if "mtp" in params and not speculative else 0)
  bandwidth = memory_bandwidth_gbs() if jax.devices()[0].platform == "gpu" else float("nan")  # CPU: no bound
  bound_step_s = weight_bytes / (bandwidth * 1e9)  # one device: every weight read once per decode step
  return {
      "bench": "sampler", "platform": jax.devices()[0].platform, "devices": jax.device_count(),
      "mesh": dict(mesh.shape), "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
      "speculative": speculative, "fp8_weights": scfg.fp8_weights, "compile_and_first_call_s": first_s,
      "seconds_median": seconds,
      "seconds_all": times, "tokens_per_s": batch * new_tokens / seconds, "decode_steps": steps,
      "mtp_accept_rate": float(np.asarray(out.accepted_drafts).sum() / max(batch * steps, 1)) if speculative else None,
      "prefill_plus_one_token_s": prefill_s, "weight_bytes": weight_bytes,
      "memory_bandwidth_gbs": None if math.isnan(bandwidth) else bandwidth,
      "bound_tokens_per_s": None if math.isnan(bound_step_s) else batch / bound_step_s,
      "ms_per_decode_step": 1e3 * decode_step_s, "bound_ms_per_decode_step": None if math.isnan(bound_step_s)
      else 1e3 * bound_step_s, "fraction_of_bound": None if math.isnan(bound_step_s) else bound_step_s / decode_step_s,
      "cache_values_per_token_per_layer": cache_values_per_token(mcfg),
  }



def skewed_budgets(n: int, mean: int, seed: int = 0) -> np.ndarray:
  """Completion budgets with R1's long tail: lognormal (sigma 1) with mean `mean`, clipped to [4, 8 * mean]."""
  rng = np.random.default_rng(seed)
  draws = rng.lognormal(math.log(mean) - 0.5, 1.0, n)
  return np.clip(np.round(draws), 4, 8 * mean).astype(np.int32)


def bench_skewed(cfg: RunConfig, slots: int, n_prompts: int, prompt_len: int, mean_new: int,
                 repeats: int = 2) -> dict:
  """`n_prompts` random prompts with skewed_budgets (greedy, EOS never stops a row, so each row runs to its
  budget): static batches of `slots` rows in prompt order (each until its longest row ends) against
  continuous batching with `slots` decode slots. Useful tokens/s = generated tokens / wall time; each arm
  timed after a warm-up call with the same shapes (the median of `repeats`)."""
  mcfg, compute = cfg.model, dataclasses.replace(cfg.compute, param_dtype=cfg.compute.dtype)
  scfg = dataclasses.replace(cfg.sampler, temperature=0.0, speculative=False)
  mesh = sharding.make_mesh(cfg.mesh)
  rng = np.random.default_rng(1)
  prompts = rng.integers(3, mcfg.vocab_size, (n_prompts, prompt_len)).tolist()
  budgets = skewed_budgets(n_prompts, mean_new)

  def static():
    outs = [sampler.generate(params, prompts[i:i + slots], mcfg, compute, scfg, eos_id=-1,
                             max_new=budgets[i:i + slots]) for i in range(0, n_prompts, slots)]
    return sum(int(o.steps) for o in jax.block_until_ready(outs))

  def continuous():
    out = continuous_batching.generate(params, prompts, mcfg, compute, scfg, slots=slots, eos_id=-1, max_new=budgets)
    return int(jax.block_until_ready(out).steps)

  arms = {}
  with jax.set_mesh(mesh):
    params = model.init(mcfg, compute, jax.random.key(0), mesh)
    for name, fn in (("static", static), ("continuous", continuous)):
      fn()  # compiles
      times, steps = [], 0
      for _ in range(repeats):
        t0 = time.perf_counter()
        steps = fn()
        times.append(time.perf_counter() - t0)
      seconds = statistics.median(times)
      arms[name] = {"seconds_median": seconds, "seconds_all": times, "decode_steps": steps,
                    "useful_tokens_per_s": float(budgets.sum()) / seconds,
                    "row_utilisation": float(budgets.sum()) / (steps * slots)}
  return {"bench": "sampler_skewed", "platform": jax.devices()[0].platform, "devices": jax.device_count(),
          "slots": slots, "prompts": n_prompts, "prompt_len": prompt_len, "mean_new": mean_new,
          "budgets": {"total": int(budgets.sum()), "max": int(budgets.max()), "median": float(np.median(budgets)),
                      "p90": float(np.percentile(budgets, 90))},
          "arms": arms,
          "continuous_over_static": arms["static"]["seconds_median"] / arms["continuous"]["seconds_median"]}
