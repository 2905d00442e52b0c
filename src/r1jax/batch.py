"""The one batch type every step reads: data (SFT), rollouts (GRPO) and the benchmarks build it, train and
rl.grpo consume it. Rows are split over the batch axes; optional fields are None when a batch kind has none."""

from __future__ import annotations

from typing import Any, NamedTuple


class Batch(NamedTuple):
  """B rows of L positions. SFT batches fill the first three fields and, when packed, the next three; GRPO
  batches (one right-padded sequence per row) add what the sampler and the reward gave."""

  tokens_BxL: Any  # int32 inputs
  targets_BxL: Any  # int32 next tokens
  loss_mask_BxL: Any  # 1 where the target is trained on (the completion and EOS)
  token_mask_BxL: Any = None  # 1 on real tokens, which router statistics count (None: all)
  positions_BxL: Any = None  # positions within each packed sequence (None: 0..L-1)
  segment_ids_BxL: Any = None  # packed sequences, contiguous runs of one id (None: one per row)
  sampler_logp_BxL: Any = None  # GRPO: the sampler's log-prob of each target
  advantages_B: Any = None  # GRPO: each row's group advantage
  routes_BxNxLxK: Any = None  # GRPO routing replay: the sampler's experts per MoE layer
  ref_logp_BxL: Any = None  # GRPO with a KL term: the frozen reference's log-prob of each target
  sampler_keep_min_BxL: Any = None  # GRPO: the smallest tempered logit the sampler could draw (-inf: any)

  @classmethod
  def of(cls, arrays: dict) -> Batch:
    """From a mapping of the fields' short names (tokens, targets, loss_mask, token_mask, positions,
    segment_ids, sampler_logp, advantages, routes, ref_logp, sampler_keep_min), as grain's dict batches carry them."""
    unknown = set(arrays) - set(SHORT_NAMES)
    if unknown:
      raise KeyError(f"batch keys {sorted(unknown)}: expected some of {list(SHORT_NAMES)}")
    return cls(**{SHORT_NAMES[k]: v for k, v in arrays.items()})


# The fields by their short names (grain's dict batches and older callers use them).
SHORT_NAMES = {"tokens": "tokens_BxL", "targets": "targets_BxL", "loss_mask": "loss_mask_BxL",
               "token_mask": "token_mask_BxL", "positions": "positions_BxL", "segment_ids": "segment_ids_BxL",
               "sampler_logp": "sampler_logp_BxL", "advantages": "advantages_B", "routes": "routes_BxNxLxK",
               "ref_logp": "ref_logp_BxL", "sampler_keep_min": "sampler_keep_min_BxL"}
