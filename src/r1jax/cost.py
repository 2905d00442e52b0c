"""Training compute from a config: FLOPs per token (6 * active matmul params + attention)."""

from __future__ import annotations

from r1jax.config import ModelConfig


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward QK^T and PV FLOPs per token under a causal mask (each token sees (L+1)/2 keys on average)."""
  qk_dim, v_dim = (cfg.head_dim, cfg.head_dim) if cfg.attention == "gqa" else (cfg.qk_head_dim, cfg.v_head_dim)
  per_layer = 2 * cfg.n_heads * (qk_dim + v_dim) * (seq_len + 1) / 2
  return cfg.n_layers * per_layer


def train_flops_per_token(counts: dict, cfg: ModelConfig, seq_len: int) -> dict:
  """6 * N_active (the seed's arithmetic; embedding lookup is not a matmul) plus 3x forward attention."""
  matmul = 6 * counts["active_without_embedding"]
  attention = 3 * attention_flops_per_token(cfg, seq_len)
  return {"matmul": matmul, "attention": attention, "total": matmul + attention, "seq_len": seq_len}


# Dense peak matmul throughput per GPU in FLOP/s (datasheets, SXM parts, no sparsity). H800 is H100 silicon with
# cut NVLink/FP64: the same tensor-core peaks.
PEAKS = {
    "h800": {"bf16": 989.4e12, "fp8": 1978.9e12},
    "h100": {"bf16": 989.4e12, "fp8": 1978.9e12},
    "h200": {"bf16": 989.4e12, "fp8": 1978.9e12},
    "a100": {"bf16": 312e12},
}


def peak_flops(gpu: str, precision: str = "bf16") -> float:
  if gpu not in PEAKS or precision not in PEAKS[gpu]:
    known = ", ".join(f"{g}:{p}" for g, ps in PEAKS.items() for p in ps)
    raise ValueError(f"no peak for --gpu {gpu} --precision {precision}; known: {known}")
  return PEAKS[gpu][precision]


def gpu_hours(flops: float, peak: float, mfu: float) -> float:
  """GPU-hours to do `flops` at model-FLOPs utilisation `mfu` of `peak` FLOP/s."""
  return flops / (mfu * peak) / 3600


def implied_mfu(flops: float, hours: float, peak: float) -> float:
  """The utilisation a reported GPU-hour budget implies."""
  return flops / (hours * 3600 * peak)


def fleet_dollars(gpus: int, price_per_hour: float, hours: float) -> float:
  """Renting `gpus` for `hours` (e.g. 50,000 A100 at $1.35/h for a 168-hour week: $11.34M)."""
  return gpus * price_per_hour * hours


def report(counts: dict, cfg: ModelConfig, seq_len: int, tokens: float, gpu: str, precision: str, mfu: float,
           price: float, hours: float | None = None) -> dict:
  """Training FLOPs for `tokens` tokens, the GPU-hours and dollars they take at `mfu`, and, given a reported
  GPU-hour figure, its dollars and the MFU it implies."""
  per_token = train_flops_per_token(counts, cfg, seq_len)
  flops = per_token["total"] * tokens
  peak = peak_flops(gpu, precision)
  out = {"tokens": tokens, "flops_per_token": per_token, "train_flops": flops, "gpu": gpu, "precision": precision,
         "peak_flops_per_gpu": peak, "mfu": mfu, "gpu_hours_at_mfu": gpu_hours(flops, peak, mfu),
         "price_per_gpu_hour": price}
  out["dollars_at_mfu"] = out["gpu_hours_at_mfu"] * price
  if hours is not None:
    out.update(reported_gpu_hours=hours, reported_dollars=hours * price, implied_mfu=implied_mfu(flops, hours, peak))
  return out
