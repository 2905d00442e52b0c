"""`r1jax bench sampler`: generation tokens/s against the bound of reading every weight once per decode step."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import numpy as np

from r1jax import model, sampler, sharding
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
  the compute dtype. Reports tokens/s (median of `repeats` timed calls after a warm-up call that compiles),
  and the bound set by reading every weight once per decode step at the measured memory bandwidth."""
  mcfg, compute = cfg.model, dataclasses.replace(cfg.compute, param_dtype=cfg.compute.dtype)
  scfg = dataclasses.replace(cfg.sampler, max_new_tokens=new_tokens, temperature=0.0, speculative=speculative)
  mesh = sharding.make_mesh(cfg.mesh)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, mcfg.vocab_size, (batch, prompt_len)).tolist()
  with jax.set_mesh(mesh):
    params = model.init(mcfg, compute, jax.random.key(0), mesh)
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
  weight_bytes = tree_bytes(params) - (tree_bytes(params["mtp"]) if "mtp" in params and not speculative else 0)
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

