"""Rotary position embedding with YaRN context extension (YaRN paper, arXiv 2309.00071; V3 report §4.3),
Llama 3.1 frequency scaling, and both pair layouts: DeepSeek's interleaved pairs and Llama/Qwen's halves.

Frequencies are computed once in float64 numpy from static config; only cos/sin of positions are traced.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from r1jax.config import ModelConfig


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature term 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(n_rotations: float, dim: int, base: float, max_pos: int) -> float:
  """The rotary dimension whose wavelength fits `n_rotations` times into `max_pos` tokens."""
  return dim * math.log(max_pos / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def _llama3(freqs: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """Llama 3.1: keep short wavelengths, divide long ones by the factor, blend smoothly in between."""
  wavelen = 2 * math.pi / freqs
  long_wavelen, short_wavelen = cfg.original_seq_len / cfg.low_freq_factor, cfg.original_seq_len / cfg.high_freq_factor
  smooth = (cfg.original_seq_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
  blended = (1 - smooth) * freqs / cfg.rope_factor + smooth * freqs
  scaled = np.where(wavelen > long_wavelen, freqs / cfg.rope_factor, freqs)
  return np.where((wavelen >= short_wavelen) & (wavelen <= long_wavelen), blended, scaled)


def inv_freq(cfg: ModelConfig) -> np.ndarray:
  """[rope_dim / 2] angular frequencies; YaRN blends interpolated (÷ factor) and original ones."""
  dim, base = cfg.rope_dim, cfg.rope_theta
  freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if cfg.rope_scaling == "llama3":
    return _llama3(freqs, cfg)
  if cfg.rope_scaling != "yarn" or cfg.rope_factor <= 1:
    return freqs
  low = max(math.floor(_correction_dim(cfg.beta_fast, dim, base, cfg.original_seq_len)), 0)
  high = min(math.ceil(_correction_dim(cfg.beta_slow, dim, base, cfg.original_seq_len)), dim - 1)
  # A zero-width ramp gets 1e-3 (as DeepSeek's and HF's code do); a clamped, inverted one keeps its sign.
  ramp = np.clip((np.arange(dim // 2) - low) / ((high - low) or 1e-3), 0.0, 1.0)
  keep = 1.0 - ramp  # 1: high-frequency dims keep their frequency; 0: low-frequency dims are interpolated
  return freqs / cfg.rope_factor * (1.0 - keep) + freqs * keep


def cos_sin_scale(cfg: ModelConfig) -> float:
  """Factor on cos/sin: mscale(s, mscale) / mscale(s, mscale_all_dim) (1 for V3, where both are 1)."""
  if cfg.rope_scaling != "yarn":
    return 1.0
  if cfg.mscale and cfg.mscale_all_dim:
    return yarn_get_mscale(cfg.rope_factor, cfg.mscale) / yarn_get_mscale(cfg.rope_factor, cfg.mscale_all_dim)
  return yarn_get_mscale(cfg.rope_factor)


def softmax_scale(cfg: ModelConfig) -> float:
  """1/sqrt(qk_head_dim), times mscale(s, mscale_all_dim)^2 under YaRN (DeepSeek's attention scaling)."""
  scale = cfg.qk_head_dim**-0.5
  if cfg.rope_scaling == "yarn" and cfg.mscale_all_dim:
    scale *= yarn_get_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
  return scale


def cos_sin(positions_BxL, cfg: ModelConfig):
  """cos, sin of shape [B, L, R/2] in fp32."""
  angles = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg), jnp.float32)
  scale = cos_sin_scale(cfg)
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply(x_BxLxHxR, cos_BxLxR2, sin_BxLxR2):
  """Rotate interleaved pairs (x[2i], x[2i+1]) by angle i, as DeepSeek's complex-number RoPE does."""
  x = x_BxLxHxR.astype(jnp.float32).reshape(*x_BxLxHxR.shape[:-1], -1, 2)
  cos, sin = cos_BxLxR2[:, :, None, :], sin_BxLxR2[:, :, None, :]
  re = x[..., 0] * cos - x[..., 1] * sin
  im = x[..., 0] * sin + x[..., 1] * cos
  return jnp.stack([re, im], axis=-1).reshape(x_BxLxHxR.shape).astype(x_BxLxHxR.dtype)


def apply_rotate_half(x_BxLxHxR, cos_BxLxR2, sin_BxLxR2):
  """Rotate pairs (x[i], x[i + R/2]) by angle i: the layout of HF Llama/Qwen checkpoints."""
  x = x_BxLxHxR.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos_BxLxR2[:, :, None, :], sin_BxLxR2[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxLxHxR.dtype)
