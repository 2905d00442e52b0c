"""Chunked head log-probs (losses.head_logprobs) against float64 numpy, and what chunking saves."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import losses, model, train
from r1jax.batch import Batch


def _case(B=2, L=10, D=8, V=50, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B, L, D)).astype(np.float32)
  w = rng.normal(size=(D, V)).astype(np.float32)
  t = rng.integers(0, V, size=(B, L)).astype(np.int32)
  return h, w, t


def _np_logp_entropy(h, w, t, temperature):
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64) / temperature
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return np.take_along_axis(logp, t[..., None], -1)[..., 0], -(np.exp(logp) * logp).sum(-1)


@pytest.mark.parametrize("chunk", [0, 3, 4, 10, 64])
def test_chunked_head_logprobs_match_float64(chunk):
  """Chunks that do not divide L (3, 4) exercise the padding of the last chunk."""
  h, w, t = _case()
  logp, ent = losses.head_logprobs(jnp.asarray(h), lambda x: x @ w, jnp.asarray(t), chunk, 0.7, entropy=True)
  want_logp, want_ent = _np_logp_entropy(h, w, t, 0.7)
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)


def test_chunked_loss_gradients_equal_the_materialised_ones():
  h, w, t = _case(L=12)
  mask = (np.arange(12) % 3 != 0).astype(np.int32)[None].repeat(2, 0)

  def chunked(h, w):
    return losses.masked_nll(losses.head_logprobs(h, lambda x: x @ w, t, 5)[0], mask)[0]

  def full(h, w):
    return losses.cross_entropy(h @ w, t, mask)[0]

  for a, b in zip(jax.grad(chunked, argnums=(0, 1))(h, w), jax.grad(full, argnums=(0, 1))(h, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunking_keeps_the_logits_out_of_memory():
  """XLA's own accounting of the compiled gradient: one [B, L, V] fp32 array is 8 MiB here; chunks of 32
  positions need a small fraction of the unchunked temporaries."""
  h, w, t = _case(B=2, L=1024, D=16, V=1024)

  def temp_bytes(chunk):
    fn = jax.jit(jax.grad(lambda h, w: -losses.head_logprobs(h, lambda x: x @ w, t, chunk)[0].sum(), argnums=(0, 1)))
    return fn.lower(h, w).compile().memory_analysis().temp_size_in_bytes

  full, chunked = temp_bytes(0), temp_bytes(32)
  assert full >= 2 * 1024 * 1024 * 4, full  # at least one [B, L, V] fp32 array
  assert chunked < full / 8, (chunked, full)


def test_train_loss_and_grads_do_not_depend_on_the_chunk(tiny):
  cfg = tiny.model
  params = model.init(cfg, tiny.compute, jax.random.key(0))
  rng = np.random.default_rng(0)
  B, L = 2, 16
  tokens = rng.integers(3, cfg.vocab_size, size=(B, L)).astype(np.int32)
  batch = Batch(tokens, np.roll(tokens, -1, 1), np.ones((B, L), np.int32))
  # jitted: op-by-op the tiny model's gradient takes about a minute on 2 cores
  grad = lambda c: jax.jit(jax.grad(lambda p: train.loss_fn(p, batch, cfg, c)[0]))(params)  # noqa: E731
  loss = lambda c: jax.jit(lambda p: train.loss_fn(p, batch, cfg, c)[0])(params)  # noqa: E731
  one, chunked = dataclasses.replace(tiny.compute, head_chunk=0), dataclasses.replace(tiny.compute, head_chunk=5)
  np.testing.assert_allclose(loss(chunked), loss(one), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad(chunked)), jax.tree.leaves(grad(one))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
