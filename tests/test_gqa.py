"""Grouped-query attention and the dense-student presets: GQA against a float64 numpy reference, RoPE layouts
and Llama 3.1 frequencies against independent formulas, sharded forward against the 1-device one."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import config, model, sharding
from r1jax.nn import attention, gqa, layers, rope

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture(scope="module")
def student_run():
  return config.load(CONFIGS / "tiny_dense_student.yaml", ["compute.dtype=float32"])


@pytest.fixture(scope="module")
def student(student_run):
  return student_run.model


@pytest.fixture(scope="module")
def compute(student_run):
  return student_run.compute


def _random_params(cfg, compute, seed=0, scale=0.1):
  """Random values for every parameter from abstract shapes (no model.init compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (scale * rng.normal(size=p.value.shape)).astype(p.value.dtype) + (p.value.ndim == 1),
                      model.abstract(cfg, compute), is_leaf=layers.is_param)


def _reference_gqa(p, x, cfg, positions):
  """float64: repeat each key/value head for its query heads, rotate halves, causal softmax."""
  f = lambda a: np.asarray(a, np.float64)  # noqa: E731
  B, L, _ = x.shape
  H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  q = (f(x) @ f(p["wq"]) + f(p["bq"])).reshape(B, L, H, Dh)
  k = (f(x) @ f(p["wk"]) + f(p["bk"])).reshape(B, L, K, Dh)
  v = (f(x) @ f(p["wv"]) + f(p["bv"])).reshape(B, L, K, Dh)
  angles = positions[..., None] * cfg.rope_theta ** (-np.arange(0, Dh, 2) / Dh)
  cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]

  def rotate(t):
    t1, t2 = t[..., :Dh // 2], t[..., Dh // 2:]
    return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

  q, k = rotate(q), np.repeat(rotate(k), H // K, axis=2)
  v = np.repeat(v, H // K, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Dh)
  s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, L, H * Dh) @ f(p["wo"])


def test_gqa_matches_numpy_reference(student, compute):
  p = _random_params(student, compute)["dense_layers"]
  p = jax.tree.map(lambda a: a[0], p)["attn"]
  B, L = 2, 12
  x = np.random.default_rng(1).normal(size=(B, L, student.dim)).astype(np.float32)
  positions = np.broadcast_to(np.arange(L), (B, L))
  cos, sin = rope.cos_sin(jnp.asarray(positions), student)
  mask = attention.Mask()
  got = gqa.apply(p, jnp.asarray(x), cos, sin, mask, student, compute)
  np.testing.assert_allclose(np.asarray(got), _reference_gqa(p, x, student, positions), atol=2e-5, rtol=1e-5)


def test_rotate_half_is_interleaved_rope_in_another_layout():
  """The layouts differ only by a fixed permutation of the rotated dims (what the MLA importer relies on)."""
  R = 8
  x = np.random.default_rng(0).normal(size=(2, 5, 3, R)).astype(np.float32)
  angles = np.random.default_rng(1).uniform(-3, 3, size=(2, 5, R // 2)).astype(np.float32)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  perm = np.stack([np.arange(R // 2), np.arange(R // 2) + R // 2], -1).reshape(-1)  # interleaved <- halves
  halves = rope.apply_rotate_half(jnp.asarray(x), cos, sin)
  interleaved = rope.apply(jnp.asarray(x[..., perm]), cos, sin)
  np.testing.assert_allclose(np.asarray(interleaved), np.asarray(halves)[..., perm], atol=1e-6)


def test_llama3_frequencies_match_independent_formula():
  cfg = config.load(CONFIGS / "llama3_1_8b.yaml").model
  got = rope.inv_freq(cfg)
  for i, f in enumerate(500000.0 ** (-np.arange(0, 128, 2) / 128)):
    wavelength = 2 * math.pi / f
    if wavelength < 8192 / 4:  # high frequencies: unchanged
      want = f
    elif wavelength > 8192 / 1:  # low frequencies: interpolated by the factor
      want = f / 8
    else:
      t = (8192 / wavelength - 1) / (4 - 1)
      want = (1 - t) * f / 8 + t * f
    assert got[i] == pytest.approx(want, rel=1e-12), i


@pytest.mark.parametrize("name,total", [("qwen2_5_1_5b", 1_543_714_304), ("llama3_1_8b", 8_030_261_248)])
def test_student_presets_match_published_parameter_counts(name, total):
  counts = model.param_count(config.load(CONFIGS / f"{name}.yaml").model)
  assert abs(counts["total"] - total) / total < 0.01
  assert counts["parts"]["routed_experts"] == 0 and counts["active"] == counts["total"]


def test_gqa_config_validation():
  with pytest.raises(config.ConfigError, match="model.n_kv_heads"):
    config.load(CONFIGS / "tiny_dense_student.yaml", ["model.n_kv_heads=3"])
  with pytest.raises(config.ConfigError, match="model.head_dim"):
    config.load(CONFIGS / "tiny_dense_student.yaml", ["model.head_dim=0"])
  with pytest.raises(config.ConfigError, match="model.high_freq_factor"):
    config.load(CONFIGS / "llama3_1_8b.yaml", ["model.high_freq_factor=0.5"])


def test_sharded_student_matches_one_device(student, compute):
  params = _random_params(student, compute)
  tokens = np.random.default_rng(2).integers(0, student.vocab_size, (4, 16))
  fwd = jax.jit(lambda p, t: model.apply(p, t, student, compute).logits_BxLxV)
  want = np.asarray(fwd(params, tokens))
  mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=1, expert=1, tensor=4))
  shardings = model.param_shardings(student, compute, mesh)
  assert shardings["dense_layers"]["attn"]["wk"].spec == sharding.spec("layers", "embed", "kv_heads")
  with jax.set_mesh(mesh):
    placed = jax.device_put(params, shardings)
    got = np.asarray(fwd(placed, tokens))
  np.testing.assert_allclose(got, want, atol=1e-5)
