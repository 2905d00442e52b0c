"""Digit-task token batches for fast model tests, without a tokenizer: ids are ASCII codes, so any byte-level
vocab (>= 128) holds them."""

import numpy as np

from r1jax.batch import Batch
from r1jax.tasks import digit_answer

PAD, BOS, EOS = 0, 1, 2
SEP = ord("=")
DIGIT0 = ord("0")


def digit_batch(rng: np.random.Generator, task: str, batch_size: int, seq_len: int) -> dict:
  """Rows `BOS d1..dn = a1..an EOS PAD..`; the loss covers the answer and EOS only.

  Returns a Batch of int32 [batch_size, seq_len] tokens, targets (tokens shifted), loss mask and token mask (the
  row's real tokens, so padding is left out of router statistics).
  """
  n = (seq_len - 2) // 2  # BOS + n digits + SEP + n answer digits + EOS = seq_len + 1 tokens at most
  if n < 1:
    raise ValueError(f"train.seq_len={seq_len}: digit tasks need seq_len >= 4")
  rows = np.full((batch_size, seq_len + 1), PAD, np.int32)
  mask = np.zeros((batch_size, seq_len + 1), np.int32)
  real = np.zeros((batch_size, seq_len + 1), np.int32)
  for b in range(batch_size):
    digits = rng.integers(0, 10, n)
    answer = digit_answer(task, digits)
    row = [BOS, *(DIGIT0 + digits), SEP, *(DIGIT0 + answer), EOS]
    rows[b, :len(row)] = row
    real[b, :len(row)] = 1
    mask[b, n + 2:len(row)] = 1  # positions holding answer tokens and EOS
  return Batch(rows[:, :-1], rows[:, 1:], mask[:, 1:], token_mask_BxL=real[:, :-1])
