"""nn/attention.py: the XLA reference against float64 numpy, every other implementation against the
reference (splash in Pallas interpret mode on CPU; cuDNN on a GPU only), and the implementation choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.config import ConfigError
from r1jax.nn import attention

ON_GPU = jax.default_backend() == "gpu"


def np_attention(q, k, v, scale, allowed_BxLxS):
  """Float64 softmax attention; kv head h // (H / Hkv) serves query head h."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  s = np.einsum("blhd,bshd->bhls", q, k) * scale
  s = np.where(allowed_BxLxS[:, None], s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhls,bshd->blhd", w, v)


def np_allowed(seg_BxL):
  L = seg_BxL.shape[1]
  return np.tril(np.ones((L, L), bool))[None] & (seg_BxL[:, :, None] == seg_BxL[:, None, :])


def _qkv(B, L, H, Hkv, Dk, Dv, S=None, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  S = S or L
  return (jax.random.normal(ks[0], (B, L, H, Dk), dtype), jax.random.normal(ks[1], (B, S, Hkv, Dk), dtype),
          jax.random.normal(ks[2], (B, S, Hkv, Dv), dtype))


def _packed_segments(L):
  """Row 0: three packed examples then padding (segment 0); row 1: one example filling the row."""
  a, b = L // 3, L // 3 + L // 4
  row0 = np.concatenate([np.full(a, 1), np.full(b - a, 2), np.full(L - 8 - b, 3), np.zeros(8)])
  return np.stack([row0, np.ones(L)]).astype(np.int32)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 1), (6, 2)])
def test_xla_reference_matches_float64_on_packed_rows(H, Hkv):
  L = 24
  q, k, v = _qkv(2, L, H, Hkv, 12, 8)
  seg = _packed_segments(L)
  got = attention.xla_attend(q, k, v, 0.3, jnp.asarray(seg))
  np.testing.assert_allclose(got, np_attention(q, k, v, 0.3, np_allowed(seg)), rtol=1e-5, atol=1e-5)
  causal = attention.xla_attend(q, k, v, 0.3)
  np.testing.assert_allclose(causal, np_attention(q, k, v, 0.3, np_allowed(np.zeros((2, L)))), rtol=1e-5, atol=1e-5)


def test_decoding_sees_the_cache_up_to_each_rows_position():
  B, T, S = 3, 2, 10
  q, k, v = _qkv(B, T, 4, 2, 8, 8, S=S)
  start = np.array([0, 4, 8])
  got = attention.attend(q, k, v, attention.Mask(q_start_B=jnp.asarray(start)), scale=0.5)
  allowed = np.arange(S)[None, None] <= (start[:, None] + np.arange(T))[:, :, None]
  np.testing.assert_allclose(got, np_attention(q, k, v, 0.5, allowed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Hkv", [4, 2])
def test_splash_matches_the_reference_in_interpret_mode(Hkv):
  """Splash (the TPU kernel) run by the Pallas interpreter: values and gradients equal the XLA reference
  with packed segments, padding and grouped kv heads, MLA's head dims (qk 192 != v 128)."""
  L = 256
  q, k, v = _qkv(2, L, 4, Hkv, 192, 128, seed=1)
  seg = jnp.asarray(_packed_segments(L))

  def loss(fn, q, k, v):
    return (fn(q, k, v) * jnp.cos(jnp.arange(128.0))).sum()

  splash = lambda q, k, v: attention._splash_attend(q, k, v, 0.07, seg, interpret=True)  # noqa: E731
  ref = lambda q, k, v: attention.xla_attend(q, k, v, 0.07, seg)  # noqa: E731
  np.testing.assert_allclose(splash(q, k, v), ref(q, k, v), rtol=1e-4, atol=1e-5)
  g_splash = jax.grad(loss, argnums=(1, 2, 3))(splash, q, k, v)
  g_ref = jax.grad(loss, argnums=(1, 2, 3))(ref, q, k, v)
  for a, b in zip(g_splash, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_splash_on_a_mesh_runs_per_device_and_matches_the_reference(monkeypatch):
  """Under a mesh splash runs inside shard_map (batch over data and expert, heads over tensor): the kernel
  sees one device's block, and the values equal the reference."""
  from r1jax import sharding
  from r1jax.config import MeshConfig

  L = 128
  q, k, v = _qkv(4, L, 4, 2, 64, 32, seed=3)
  seg = jnp.asarray(np.concatenate([_packed_segments(L)] * 2))
  ref = attention.xla_attend(q, k, v, 0.1, seg)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, expert=2, tensor=2))
  seen, local = [], attention._splash_local
  monkeypatch.setattr(attention, "_splash_local", lambda q, *a, **kw: seen.append(q.shape) or local(q, *a, **kw))
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v, s: attention._splash_attend(q, k, v, 0.1, s, interpret=True))(q, k, v, seg)
  assert seen == [(1, L, 2, 64)]  # 4 rows over data x expert, 4 heads over tensor
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_auto_runs_the_reference_on_cpu_and_explicit_choices_say_why_not():
  q, k, v = _qkv(1, 8, 2, 2, 8, 8)
  assert attention.choose("auto", q, v, decoding=False) == "xla"
  for impl in ("cudnn", "splash"):
    with pytest.raises(ConfigError, match=f"attention_impl='{impl}'.*backend is cpu"):
      attention.attend(q, k, v, attention.Mask(), scale=1.0, impl=impl)
  with pytest.raises(ConfigError, match="expected one of"):
    attention.choose("flash", q, v, decoding=False)


def test_cudnn_is_never_chosen_where_it_would_drop_segment_ids(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "_cudnn", object())
  q, _, v = _qkv(1, 8, 2, 2, 8, 8, dtype=jnp.bfloat16)
  assert attention.choose("auto", q, v, decoding=False) == "cudnn"
  assert attention.choose("auto", q, v, decoding=False, packed=True) == "xla"
  for impl in ("auto", "cudnn", "splash"):  # an explicit choice is for training: a cache is always read by xla
    assert attention.choose(impl, q, v, decoding=True) == "xla"
  with pytest.raises(ConfigError, match="packed segment ids"):
    attention.choose("cudnn", q, v, decoding=False, packed=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_the_reference_on_gpu():
  """bf16 cuDNN flash attention vs the fp32-softmax XLA reference on the same bf16 inputs, MLA's head dims,
  forward and gradients. Tolerance: bf16 outputs (2^-8 relative) and bf16 probabilities inside the
  reference's second matmul."""
  L = 512
  q, k, v = _qkv(2, L, 8, 8, 192, 128, dtype=jnp.bfloat16, seed=2)
  assert attention.choose("auto", q, v, decoding=False) == "cudnn"
  mask = attention.Mask()
  fast = lambda q, k, v: attention.attend(q, k, v, mask, scale=0.07, impl="cudnn")  # noqa: E731
  ref = lambda q, k, v: attention.attend(q, k, v, mask, scale=0.07, impl="xla")  # noqa: E731
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  np.testing.assert_allclose(f32(fast(q, k, v)), f32(ref(q, k, v)), rtol=2e-2, atol=2e-2)
  loss = lambda fn, q, k, v: (fn(q, k, v).astype(jnp.float32) ** 2).sum()  # noqa: E731
  for a, b in zip(jax.grad(loss, argnums=(1, 2, 3))(fast, q, k, v), jax.grad(loss, argnums=(1, 2, 3))(ref, q, k, v)):
    rel = np.linalg.norm(f32(a) - f32(b)) / np.linalg.norm(f32(b))
    assert rel < 2e-2, rel
