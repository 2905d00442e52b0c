"""`r1jax bench train`: the jitted SFT step as `r1jax sft` runs it: tokens/s, MFU, memory against r1jax info's
estimate, and on an expert-parallel mesh the all-to-all against its prediction."""

from __future__ import annotations

import math
import statistics
import time
from typing import Literal

import jax
import numpy as np

from r1jax import cost, memory, model, sharding, train
from r1jax.bench.all_to_all import bench_all_to_all
from r1jax.bench.batches import progressions, train_batch
from r1jax.bench.timing import matmul_peak_tflops
from r1jax.config import RunConfig
from r1jax.nn import expert_ffn


def bench_train(cfg: RunConfig, steps: int = 10, warmup: int = 2, packed: int = 0,
                data: Literal["random", "progressions"] = "random") -> dict:
  """The jitted SFT step (train.jit_sft_step, as `r1jax sft` runs it) on one batch of random tokens every
  step, or on a fresh batch of `progressions` each step (all placed on the device before timing), one
  sequence per row (as `data.pack=false` gives; packed > 0 adds segment ids as packing does): compile time, the
  median of `steps` timed steps after `warmup`, tokens/s, model FLOPs/token (cost.py), MFU against a bf16
  matmul peak measured in the same process, peak device memory, XLA's memory analysis next to
  `r1jax info`'s activation (+ gradient) estimate, and on an expert-parallel mesh the measured all-to-all
  against its prediction (bench_all_to_all)."""
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
  fused = memory.fused_attention(cfg.compute, platform, sizes["context"], packed > 0)
  estimate = (memory.activation_bytes(cfg.model, cfg.compute, sizes, cfg.train.batch_size, cfg.train.seq_len,
                                      fused)
              + memory.state_bytes(cfg, sizes)["grads"] + memory.expert_tile_bytes(cfg, sizes))
  temp = None if analysis is None else int(analysis.temp_size_in_bytes)
  return {
      "bench": "train", "platform": platform, "device_kind": jax.devices()[0].device_kind,
      "devices": jax.device_count(), "mesh": sizes, "batch": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
      "packed_segments_per_row": packed, "remat": cfg.compute.remat, "attention_impl": cfg.compute.attention_impl,
      "n_mtp": cfg.model.n_mtp, "param_dtype": cfg.compute.param_dtype, "compile_s": compile_s,
      "capacity_factor": cfg.compute.capacity_factor, "expert_gemm": expert_ffn.gemm_impl(cfg.compute),
      "grouped_kernel": (expert_ffn.grouped_kernel(cfg.compute)
                         if expert_ffn.gemm_impl(cfg.compute) == "grouped" else None),
      "step_s_median": seconds, "step_s_all": times, "tokens_per_s": tokens / seconds,
      "model_flops_per_token": flops["total"], "matmul_peak_tflops": None if math.isnan(peak) else peak,
      "mfu": None if math.isnan(peak) else flops["total"] * tokens / seconds / (peak * 1e12),
      "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
      "xla_temp_gib": None if temp is None else temp / 2**30,
      "info_activations_plus_grads_gib": estimate / 2**30,
      "estimate_over_xla_temp": None if not temp else estimate / temp, "data": data, "losses": losses, "ce": ces,
      "tokens_per_s_per_device": tokens / seconds / jax.device_count(), "all_to_all": a2a,
  }

