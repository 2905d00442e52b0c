"""Multi-token prediction (V3 report §2.2, eq. 21-25): depth k combines the previous depth's hidden
state with the embedding of token i+k, runs one transformer block, and predicts token i+k+1 through the
shared output head. Depths are sequential, so they run in a Python loop (there is usually one).

Which hidden state depth 1 reads (eq. 21's h^0) the report leaves open; DeepSeek's own inference code has
no MTP. We feed the main model's last hidden state after its final RMSNorm, as the serving engines that
run DeepSeek's released MTP weights do: vLLM (DeepseekV2Model.forward returns the output of `self.norm`,
which both the LM head and the MTP proposer receive) and SGLang (deepseek_nextn reads the hidden states
the logits processor stored, taken after `self.norm`). Which state llama.cpp feeds was not confirmed here.
Matching vLLM and SGLang keeps imported MTP weights usable for speculative decoding (sampler.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.config import ComputeConfig, ModelConfig
from r1jax.nn import block, layers


def init(key, cfg: ModelConfig, compute: ComputeConfig) -> dict:
  k_proj, k_block = jax.random.split(key)
  dt = jnp.dtype(compute.param_dtype)
  return {
      "enorm": layers.ones((cfg.dim,), ("norm",), dt),
      "hnorm": layers.ones((cfg.dim,), ("norm",), dt),
      # Rows [0, D) take the token embedding, rows [D, 2D) the hidden state: the order of DeepSeek's
      # released MTP weights (eh_proj), so imported checkpoints need no permutation.
      "proj": layers.normal(k_proj, (2 * cfg.dim, cfg.dim), (None, "embed"), compute.init_std, dt),
      "block": block.init(k_block, cfg, compute, is_moe=True),
      "norm": layers.ones((cfg.dim,), ("norm",), dt),
  }


def shift_left(x_BxL, k: int, fill=0):
  """x[:, i + k] at position i; the last k positions get `fill`."""
  if k == 0:
    return x_BxL
  pad = jnp.full((x_BxL.shape[0], k), fill, x_BxL.dtype)
  return jnp.concatenate([x_BxL[:, k:], pad], axis=1)


def _input(p: dict, h_BxLxD, next_tokens_BxL, embed_fn, cfg: ModelConfig, compute: ComputeConfig):
  """eq. 21: M [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1})]."""
  e_BxLxD = layers.rms_norm(embed_fn(next_tokens_BxL), p["enorm"], cfg.norm_eps)
  h_norm = layers.rms_norm(h_BxLxD, p["hnorm"], cfg.norm_eps)
  return layers.dense(jnp.concatenate([e_BxLxD, h_norm], axis=-1), p["proj"], compute.fp8.use("mtp_proj"))


def apply(stack: dict, h_BxLxD, tokens_BxL, embed_fn, ctx: block.Context, cfg: ModelConfig, compute: ComputeConfig,
          replay_PxBxLxK=None):
  """Returns (normed states [n_mtp, B, L, D] whose head logits at depth k (1-based) and position i predict
  token i+k+1, stacked stats). `h_BxLxD` is the main model's last state after its final norm (see above).
  """
  states, stats = [], []
  for k in range(1, cfg.n_mtp + 1):
    p = jax.tree.map(lambda a, k=k: a[k - 1], stack)
    replay = None if replay_PxBxLxK is None else replay_PxBxLxK[k - 1]
    h_BxLxD = _input(p, h_BxLxD, shift_left(tokens_BxL, k), embed_fn, cfg, compute)
    h_BxLxD, s = block.apply(p["block"], h_BxLxD, ctx, cfg, compute, is_moe=True, replay_BxLxK=replay)
    states.append(layers.rms_norm(h_BxLxD, p["norm"], cfg.norm_eps))
    stats.append(s)
  return jnp.stack(states), jax.tree.map(lambda *xs: jnp.stack(xs), *stats)


def draft(stack: dict, h_BxTxD, next_tokens_BxT, cache: dict, embed_fn, head_fn, ctx: block.Context,
          cfg: ModelConfig, compute: ComputeConfig):
  """Depth 1 as a draft model for speculative decoding: at slot i, from the main model's state h_i and the
  token t_{i+1}, logits for t_{i+2}. Its block keeps its own KV cache ([n_mtp, ...], depth 1 used).
  Returns (logits_BxTxV, cache)."""
  p = jax.tree.map(lambda a: a[0], stack)
  x_BxTxD = _input(p, h_BxTxD, next_tokens_BxT, embed_fn, cfg, compute)
  x_BxTxD, _, c = block.apply_cached(p["block"], x_BxTxD, jax.tree.map(lambda a: a[0], cache), ctx, cfg, compute,
                                    is_moe=True)
  cache = jax.tree.map(lambda a, new: a.at[0].set(new), cache, c)
  return head_fn(layers.rms_norm(x_BxTxD, p["norm"], cfg.norm_eps)), cache
