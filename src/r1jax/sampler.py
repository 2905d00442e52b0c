"""Generation. For now greedy decoding by full forward passes over a fixed-size buffer (one compilation per
prompt batch shape): the reference that the KV-cache sampler (MLA latent cache, absorbed decode) must match."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import model
from r1jax.config import ConfigError, ModelConfig


def greedy_full_forward(params: dict, prompts: list[list[int]], cfg: ModelConfig, max_new_tokens: int,
                        eos_id: int, pad_id: int = 0) -> list[list[int]]:
  """Each prompt's greedy continuation (up to and including EOS, at most max_new_tokens ids)."""
  lengths = np.array([len(p) for p in prompts])
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  L = int(lengths.max()) + max_new_tokens
  if L > cfg.max_seq_len:
    raise ConfigError(f"prompt + max_new_tokens = {L} tokens exceeds model.max_seq_len={cfg.max_seq_len}")
  buf = np.full((len(prompts), L), pad_id, np.int32)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p

  @jax.jit
  def next_tokens(params, tokens_BxL, last_B):
    mask_BxL = (jnp.arange(L)[None] <= last_B[:, None]).astype(jnp.int32)
    logits = model.apply(params, tokens_BxL, cfg, token_mask_BxL=mask_BxL).logits_BxLxV
    return jnp.argmax(jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0], axis=-1)

  done = np.zeros(len(prompts), bool)
  out = [[] for _ in prompts]
  for t in range(max_new_tokens):
    ids = np.asarray(next_tokens(params, jnp.asarray(buf), jnp.asarray(lengths - 1 + t)))
    for i in np.flatnonzero(~done):
      buf[i, lengths[i] + t] = ids[i]
      out[i].append(int(ids[i]))
      done[i] = ids[i] == eos_id
    if done.all():
      break
  return out


def read_prompts(path: str | Path) -> list[str]:
  """Prompts from a JSONL file of {"prompt": str} records; a bad line is an error naming file:line."""
  prompts = []
  for n, line in enumerate(Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
      raise ConfigError(f"{path}:{n}: expected an object with a string \"prompt\"")
    prompts.append(record["prompt"])
  return prompts
