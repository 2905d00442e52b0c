"""nn/blockwise.py: flash attention's algorithm in plain JAX against float64 numpy (forward) and the XLA
reference's autodiff (gradients), at block sizes that divide L, do not, and exceed it; what it keeps for the
backward pass; and that auto takes it under context parallelism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import sharding
from r1jax.config import MeshConfig
from r1jax.nn import attention, blockwise
from test_attention import _packed_segments, _qkv, np_allowed, np_attention


def _weighted(fn):
  """A loss whose cotangent differs per output element (a plain sum would hide transposed-index bugs)."""
  def loss(q, k, v):
    o = fn(q, k, v).astype(jnp.float32)
    return (o**2 * jnp.arange(1.0, o.shape[-1] + 1.0)).sum()

  return loss


@pytest.mark.parametrize("H,Hkv,L,block", [(4, 4, 24, 8), (4, 1, 24, 5), (6, 2, 37, 8), (4, 2, 24, 64)])
@pytest.mark.parametrize("packed", [False, True])
def test_blockwise_matches_float64_and_the_reference_gradients(H, Hkv, L, block, packed):
  """fp32 inputs: the online softmax reorders sums of at most L terms, so outputs agree with float64 to ~1e-6
  (asserted at 1e-5, the XLA reference's own tolerance) and gradients with the reference's autodiff to 1e-5."""
  q, k, v = _qkv(2, L, H, Hkv, 12, 8, seed=L + block)
  seg = _packed_segments(L) if packed else np.zeros((2, L), np.int32)
  seg_j = jnp.asarray(seg) if packed else None
  got = blockwise.attend(q, k, v, 0.3, seg_j, block=block)
  np.testing.assert_allclose(got, np_attention(q, k, v, 0.3, np_allowed(seg)), rtol=1e-5, atol=1e-5)
  fast = jax.grad(_weighted(lambda q, k, v: blockwise.attend(q, k, v, 0.3, seg_j, block=block)), argnums=(0, 1, 2))
  ref = jax.grad(_weighted(lambda q, k, v: attention.xla_attend(q, k, v, 0.3, seg_j)), argnums=(0, 1, 2))
  for a, b, name in zip(fast(q, k, v), ref(q, k, v), "qkv"):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()), err_msg=f"d{name}")


def test_blockwise_in_bf16_is_as_close_to_the_reference_as_bf16_allows():
  """bf16 inputs, MLA's head dims: both paths round probabilities to bf16 before the second matmul (blockwise
  unnormalised, the reference normalised), so they differ by a few bf16 ulps (2^-8 relative)."""
  q, k, v = _qkv(2, 64, 4, 4, 192, 128, dtype=jnp.bfloat16, seed=5)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  fast = lambda q, k, v: blockwise.attend(q, k, v, 0.07, block=16)  # noqa: E731
  ref = lambda q, k, v: attention.xla_attend(q, k, v, 0.07)  # noqa: E731
  np.testing.assert_allclose(f32(fast(q, k, v)), f32(ref(q, k, v)), rtol=2e-2, atol=2e-2)
  for a, b in zip(jax.grad(_weighted(fast), argnums=(0, 1, 2))(q, k, v),
                  jax.grad(_weighted(ref), argnums=(0, 1, 2))(q, k, v)):
    assert a.dtype == b.dtype == jnp.bfloat16
    rel = np.linalg.norm(f32(a) - f32(b)) / np.linalg.norm(f32(b))
    assert rel < 2e-2, rel


def test_blockwise_keeps_no_score_matrix():
  """XLA's temporaries for the gradient at L = 2048, two heads: the reference holds [H, L, L] fp32 scores and
  probabilities (32 MiB each, 97 MiB measured); blockwise holds [H, L, 64] blocks (5.3 MiB measured). Bound:
  a quarter of one score matrix."""
  L, H = 2048, 2
  q, k, v = _qkv(1, L, H, H, 16, 16)
  grad = jax.jit(jax.grad(lambda q, k, v: blockwise.attend(q, k, v, 0.2, block=64).sum(), argnums=(0, 1, 2)))
  temp = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  assert temp < H * L * L * 4 / 4, temp / 2**20


def test_auto_takes_blockwise_under_context_parallelism():
  q, _, v = _qkv(2, 32, 4, 4, 8, 8)
  assert attention.choose("auto", q, v, decoding=False) == "xla"
  assert attention.choose("blockwise", q, v, decoding=False) == "blockwise"
  assert attention.choose("blockwise", q, v, decoding=True) == "xla"  # a cache is always read by xla
  with jax.set_mesh(sharding.make_mesh(MeshConfig(data=2, context=4))):
    assert attention.choose("auto", q, v, decoding=False) == "blockwise"
    assert attention.choose("auto", q, v, decoding=False, packed=True) == "blockwise"


def test_keys_must_be_the_queries_positions():
  q, k, v = _qkv(1, 8, 2, 2, 8, 8, S=12)
  with pytest.raises(ValueError, match="L=8, S=12"):
    blockwise.attend(q, k, v, 1.0)
