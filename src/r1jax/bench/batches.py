"""Benchmark batches: random tokens (speed does not depend on the data) or arithmetic progressions (learnable,
so a loss curve measures learning)."""

from __future__ import annotations

import numpy as np

from r1jax.batch import Batch
from r1jax.config import RunConfig


def train_batch(cfg: RunConfig, packed: int = 0, tokens=None) -> Batch:
  """Random tokens (or the given [B, L+1] `tokens`) of train.batch_size x train.seq_len; packed > 0 splits
  each row into that many segments."""
  B, L = cfg.train.batch_size, cfg.train.seq_len
  if tokens is None:
    tokens = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (B, L + 1)).astype(np.int32)
  batch = Batch(tokens[:, :-1], tokens[:, 1:], np.ones((B, L), np.int32))
  if packed:
    seg_L = np.minimum(np.arange(L) * packed // L, packed - 1) + 1
    starts = np.searchsorted(seg_L, seg_L)  # first position of each position's segment
    batch = batch._replace(segment_ids_BxL=np.broadcast_to(seg_L, (B, L)).astype(np.int32),
                           positions_BxL=np.broadcast_to(np.arange(L) - starts, (B, L)).astype(np.int32),
                           token_mask_BxL=np.ones((B, L), np.int32))
  return batch


def progressions(rng: np.random.Generator, B: int, L: int, vocab_size: int) -> np.ndarray:
  """[B, L] int32 arithmetic progressions mod the vocabulary (ids from 3 up: 0-2 stay special), random start
  and stride 1-3 per row: learnable from a row's first two tokens, unlike random tokens, so a loss comparison
  measures learning rather than how fast one fixed batch is memorised."""
  start, stride = rng.integers(3, vocab_size, (B, 1)), rng.integers(1, 4, (B, 1))
  return ((start + stride * np.arange(L)) % (vocab_size - 3) + 3).astype(np.int32)

