"""MLA against a float64 numpy attention with explicitly decompressed keys/values; YaRN against its
formulas (YaRN paper §3; DeepSeek-V3 inference precompute_freqs_cis)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.nn import attention, layers, mla, rope


def np_rms(x, w, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_yarn_freqs(dim, base, factor, orig, beta_fast, beta_slow):
  """Written from the YaRN paper: wavelengths shorter than orig/beta_fast keep their frequency, longer
  than orig/beta_slow are divided by the factor, linear blend in between (by dimension index)."""
  freqs = np.array([base ** (-2 * i / dim) for i in range(dim // 2)])
  def dim_for(rotations):  # the dimension index whose frequency completes `rotations` turns in orig
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))
  lo, hi = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), dim - 1)
  out = []
  for i, f in enumerate(freqs):
    t = min(max((i - lo) / max(hi - lo, 1e-3), 0.0), 1.0)  # 0 -> keep, 1 -> interpolate
    out.append(f * (1 - t) + (f / factor) * t)
  return np.array(out)


def np_rope_complex(x, positions, freqs, scale):
  """Interleaved pairs as complex numbers times e^{i p f} (DeepSeek's view_as_complex)."""
  z = x[..., 0::2] + 1j * x[..., 1::2]
  rot = np.exp(1j * positions[..., None] * freqs)[:, :, None, :] * scale
  z = z * rot
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def np_mla(p, x, positions, seg, cfg):
  """Float64 MLA with per-head keys/values decompressed from the latent (no absorption)."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  B, L, _ = x.shape
  H, Dn, Dr, Dv, R = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  if cfg.q_lora_rank:
    q = np_rms(x @ p["wq_a"], p["q_norm"], cfg.norm_eps) @ p["wq_b"]
  else:
    q = x @ p["wq"]
  q = q.reshape(B, L, H, Dn + Dr)
  freqs = np_yarn_freqs(Dr, cfg.rope_theta, cfg.rope_factor, cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow) \
      if cfg.rope_scaling == "yarn" else cfg.rope_theta ** (-np.arange(0, Dr, 2) / Dr)
  m = lambda s, ms: 1.0 if s <= 1 else 0.1 * ms * math.log(s) + 1.0  # noqa: E731
  cs = m(cfg.rope_factor, cfg.mscale) / m(cfg.rope_factor, cfg.mscale_all_dim) if cfg.rope_scaling == "yarn" else 1.0
  q_pe = np_rope_complex(q[..., Dn:], positions, freqs, cs)
  kv_a = x @ p["wkv_a"]
  c_kv = np_rms(kv_a[..., :R], p["kv_norm"], cfg.norm_eps)
  k_pe = np_rope_complex(kv_a[..., None, R:], positions, freqs, cs)  # one rope key shared by heads
  kv = (c_kv @ p["wkv_b"]).reshape(B, L, H, Dn + Dv)
  k = np.concatenate([kv[..., :Dn], np.broadcast_to(k_pe, (B, L, H, Dr))], -1)
  qf = np.concatenate([q[..., :Dn], q_pe], -1)
  scale = (Dn + Dr) ** -0.5
  if cfg.rope_scaling == "yarn":
    scale *= m(cfg.rope_factor, cfg.mscale_all_dim) ** 2
  s = np.einsum("bqhd,bkhd->bhqk", qf, k) * scale
  allowed = np.tril(np.ones((L, L), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  s = np.where(allowed[:, None], s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", a, kv[..., Dn:]).reshape(B, L, H * Dv)
  return o @ p["wo"]


@pytest.mark.parametrize("variant", ["tiny", "no_q_lora", "no_yarn", "yarn_mscale_0.707"])
def test_mla_matches_float64_numpy(tiny, variant):
  cfg = tiny.model
  cfg = {"tiny": cfg, "no_q_lora": dataclasses.replace(cfg, q_lora_rank=0),
         "no_yarn": dataclasses.replace(cfg, rope_scaling="none"),
         "yarn_mscale_0.707": dataclasses.replace(cfg, mscale=0.707, mscale_all_dim=0.707)}[variant]
  key_p, key_x = jax.random.split(jax.random.key(1))
  p = layers.unbox(mla.init(key_p, cfg, tiny.compute))
  p = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), p)  # non-unit norms
  B, L = 2, 96  # longer than original_seq_len=64: exercises the YaRN range
  x = np.asarray(jax.random.normal(key_x, (B, L, cfg.dim)))
  positions = np.broadcast_to(np.arange(L), (B, L)).copy()
  positions[1] = np.concatenate([np.arange(40), np.arange(L - 40)])  # packed: two segments
  seg = np.zeros((B, L), np.int32)
  seg[1, 40:] = 1
  cos, sin = rope.cos_sin(jnp.asarray(positions), cfg)
  got = mla.apply(p, jnp.asarray(x, jnp.float32), cos, sin, attention.Mask(jnp.asarray(seg)), cfg, tiny.compute)
  ref = np_mla(p, x, positions, seg, cfg)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4, atol=2e-5)  # fp32 matmuls vs float64


def test_yarn_frequencies_and_mscale(tiny):
  v3 = dataclasses.replace(tiny.model, qk_rope_head_dim=64, rope_factor=40.0, original_seq_len=4096,
                           rope_theta=10000.0)
  got = rope.inv_freq(v3)
  np.testing.assert_allclose(got, np_yarn_freqs(64, 10000.0, 40.0, 4096, 32, 1), rtol=1e-12)
  base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
  assert got[0] == base[0] and np.isclose(got[-1], base[-1] / 40)  # extremes: kept / interpolated
  # V3: softmax scale = qk_head_dim^-1/2 * (0.1 ln 40 + 1)^2, cos/sin unscaled (mscale == mscale_all_dim).
  assert math.isclose(rope.softmax_scale(v3), (v3.qk_head_dim ** -0.5) * (0.1 * math.log(40) + 1) ** 2)
  assert rope.cos_sin_scale(v3) == 1.0
  plain = dataclasses.replace(v3, rope_scaling="none")
  np.testing.assert_allclose(rope.inv_freq(plain), base, rtol=1e-12)
  assert rope.softmax_scale(plain) == v3.qk_head_dim ** -0.5


def test_rope_is_relative():
  """q·k after RoPE depends only on the position difference."""
  from r1jax.config import ModelConfig
  cfg = ModelConfig(qk_rope_head_dim=16, rope_scaling="none")
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(1, 1, 1, 16)), rng.normal(size=(1, 1, 1, 16))
  def dot(pq, pk):
    cq, sq = rope.cos_sin(jnp.array([[pq]]), cfg)
    ck, sk = rope.cos_sin(jnp.array([[pk]]), cfg)
    return float((rope.apply(jnp.asarray(q), cq, sq) * rope.apply(jnp.asarray(k), ck, sk)).sum())
  assert math.isclose(dot(3, 1), dot(12, 10), rel_tol=1e-5)
  assert not math.isclose(dot(3, 1), dot(3, 2), rel_tol=1e-3)
