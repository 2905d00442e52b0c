"""FP8 weights for sampling (model.fp8_weights, sampler.fp8_weights): one-byte e4m3 weights with block scales
made once from the learner's, read by decode: the same GEMMs as FP8 decode from the master weights, close to
the dequantised weights' decode, and what rollouts use when the config asks."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import config, continuous_batching, model
from r1jax.config import SamplerConfig
from r1jax.nn import fp8

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")


def _case(path):
  run = config.load(os.path.join(ROOT, path), ["compute.dtype=float32", "compute.fp8.block=16"])
  fp8_on = dataclasses.replace(run.compute, fp8=dataclasses.replace(run.compute.fp8, enabled=True))
  return run.model, run.compute, fp8_on, model.init(run.model, run.compute, jax.random.key(1))


def _prefill_logits(params, cfg, compute):
  tokens = jax.random.randint(jax.random.key(0), (4, 24), 3, cfg.vocab_size)
  cache = model.init_cache(cfg, compute, 4, 32)
  return model.decode(params, cache, tokens, jnp.zeros(4, jnp.int32), cfg, compute).logits_BxTxV


@pytest.mark.parametrize("path", ["tiny.yaml", "tiny_dense_student.yaml"])
def test_fp8_weights_decode(path):
  """Every FP8-run matmul weight but MLA's wkv_b (read in the compute dtype by the absorbed decode) becomes e4m3
  + scales (1 byte + 4 / block^2 per weight). Decode from them:
  - equals FP8 decode from the master weights (fp8.dot quantises them to the same tiles) to fp32 rounding: the
    kept weights' projections run as separate GEMMs where the master's are joined (layers.dense_many);
  - vs the dequantised weights' decode without FP8 the difference is the activations' 1x128 e4m3 rounding
    (RMS 2^-4 / sqrt(3) = 3.6% of each GEMM input): bounded by 4x that over the GEMMs in series (0.15;
    measured 0.067 MLA + MoE, 0.031 GQA)."""
  cfg, compute, fp8_on, params = _case(path)
  kept = model.fp8_weights(params, fp8_on)
  flat = jax.tree_util.tree_flatten_with_path(kept, is_leaf=fp8.weights.is_quantized)[0]
  quantized = {jax.tree_util.keystr(p): w for p, w in flat if fp8.weights.is_quantized(w)}
  assert quantized and all(model.fp8_part(p) is not None for p, w in flat if fp8.weights.is_quantized(w))
  for w in quantized.values():
    assert w.q_KxN.dtype == jnp.float8_e4m3fn and w.scale_KbxNb.shape[-2] == w.shape[-2] // 16
  got = _prefill_logits(kept, cfg, fp8_on)
  from_master = _prefill_logits(params, cfg, fp8_on)
  assert not any("wkv_b" in p for p in quantized)
  np.testing.assert_allclose(got, from_master, rtol=0, atol=1e-5 * float(jnp.abs(from_master).max()))
  dequantised = _prefill_logits(fp8.weights.dequantize_tree(kept, jnp.float32), cfg, compute)
  assert float(jnp.linalg.norm(got - dequantised) / jnp.linalg.norm(dequantised)) < 0.15


def test_rollouts_from_fp8_weights():
  """sampler.fp8_weights: rollouts decode from e4m3 weights made from the learner's (fp8 enabled for the sampler
  alone); with greedy decoding that is model.fp8_weights' decode, token for token."""
  cfg, compute, fp8_on, params = _case("tiny_dense_student.yaml")
  prompts = [[1, 5, 9, 3], [1, 4], [1, 8, 8, 6, 2]]
  scfg = SamplerConfig(max_new_tokens=6, temperature=0.0, fp8_weights=True)
  got = continuous_batching.rollout(params, prompts, cfg, compute, scfg, eos_id=-1)
  plain = dataclasses.replace(scfg, fp8_weights=False)
  want = continuous_batching.rollout(model.fp8_weights(params, fp8_on), prompts, cfg, fp8_on, plain, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(got.tokens_BxS), np.asarray(want.tokens_BxS))
  np.testing.assert_array_equal(np.asarray(got.logprobs_BxS), np.asarray(want.logprobs_BxS))
