"""Generation with a KV cache: a batched prefill, then decoding one token per step (or two with MTP
speculation), compiled once per shape with the cache carried in place. MLA models cache only the kv latent
and the roped shared key and decode in the absorbed form (nn/mla.py). Sampling: temperature, top-k, top-p,
greedy; rows stop at EOS or their own token budget independently. Each prompt's draws come from its own key,
fold_in(key, prompt index), and its t-th token from fold_in(that, t): a row's sample does not depend on its
batch-mates, its row or the step it runs at, which is what lets continuous batching (continuous_batching.py)
reproduce this sampler. The result holds what GRPO needs: tokens, the log-probs of the sampled tokens, the
completion mask, and every fed token's experts (routing replay).

Rows are right-padded: row b's prompt fills cache slots [0, n_b), its completion follows, and slot i holds
position i. `greedy_full_forward` (full forward passes, no cache) is the reference tests compare against.

With compute.fp8 on, decode steps run the same FP8 projections as training (weights quantised per step), but the
absorbed MLA decode multiplies by wkv_b in the compute dtype, where training's decompression runs it in FP8:
the learner recomputes log-probs, and GRPO's truncated importance sampling covers the gap."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import model, sharding
from r1jax.sharding import constrain
from r1jax.config import ComputeConfig, ConfigError, ModelConfig, SamplerConfig

PROMPT_BUCKET = 16  # prompt buffers are padded to a multiple of this, so prompt lengths share compilations


class Rollout(NamedTuple):
  """Prompts and completions in one right-padded buffer of S slots (prompt, completion, padding)."""

  tokens_BxS: jax.Array  # int32
  prompt_len_B: jax.Array  # int32
  completion_len_B: jax.Array  # int32, generated tokens including EOS
  logprobs_BxS: jax.Array  # fp32 log-prob of each generated token under the distribution it was drawn from
  keep_min_BxS: jax.Array  # fp32 tempered logit bounding the top-k/top-p set it was drawn from (-inf: all)
  completion_mask_BxS: jax.Array  # int32, 1 on generated tokens (EOS included)
  truncated_B: jax.Array  # bool: the token budget ran out before EOS
  experts: dict  # {"moe_layers": [N, B, S, K]} experts each fed token was routed to; -1 where none was fed
  accepted_drafts: jax.Array  # int32 per row: MTP drafts accepted (speculative decoding), else 0
  steps: jax.Array  # decode steps run


class DecodeState(NamedTuple):
  cache: dict
  tokens_BxS: jax.Array
  logprobs_BxS: jax.Array
  keep_min_BxS: jax.Array
  experts: dict
  length_B: jax.Array  # cache slots filled: the slot where next_B will be fed
  next_B: jax.Array  # the last generated token, not yet fed
  draft_B: jax.Array  # speculative decoding: MTP's guess of the token after next_B
  done_B: jax.Array
  n_new_B: jax.Array
  accepted_B: jax.Array
  keys_B: jax.Array  # each row's prompt key; its t-th token is drawn with fold_in(keys_B[b], t)
  budget_B: jax.Array  # int32: each row's max new tokens
  step: jax.Array


def truncation_mask(logits_BxV, top_k: int, top_p: float):
  """Tokens sampling may draw: the k most likely (top-k), then the smallest most-likely set whose
  probability reaches top_p (nucleus; Holtzman et al. 2019). Ties at the boundary are all kept."""
  keep_BxV = jnp.ones(logits_BxV.shape, jnp.bool_)
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    keep_BxV = logits_BxV >= kth_B1
  if top_p < 1.0:
    masked = jnp.where(keep_BxV, logits_BxV, -jnp.inf)
    sorted_BxV = jnp.sort(masked, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    n_keep_B = jnp.sum(mass_before_BxV < top_p, axis=-1)  # >= 1: the first token has mass_before 0
    cutoff_B1 = jnp.take_along_axis(sorted_BxV, n_keep_B[:, None] - 1, axis=-1)
    keep_BxV = keep_BxV & (logits_BxV >= cutoff_B1)
  return keep_BxV


def sample(logits_BxV, key, cfg: SamplerConfig):
  """(token_B, logprob_B, keep_min_B): a draw (with one key for the batch, or one key per row) from
  softmax(logits / temperature) restricted to
  truncation_mask, its log-probability under that distribution, and a tempered logit between the set's
  smallest and the largest outside it (-inf when nothing is cut), which is that set for the learner
  (losses.head_logprobs' keep_min_BxL). Temperature 0 is argmax, with the untempered log-probability and no
  set."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  keep_min_B = jnp.full(logits_BxV.shape[:1], -jnp.inf, jnp.float32)
  if cfg.temperature == 0:
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  else:
    z_BxV = logits_BxV / cfg.temperature
    if cfg.top_k or cfg.top_p < 1.0:
      keep_BxV = truncation_mask(z_BxV, cfg.top_k, cfg.top_p)
      # Midway between the smallest kept and the largest dropped logit: the learner's recomputed logits
      # differ in the last bits, and a threshold at the kept logit itself would drop that token half the time.
      lowest_kept_B = jnp.where(keep_BxV, z_BxV, jnp.inf).min(-1)
      highest_dropped_B = jnp.where(keep_BxV, -jnp.inf, z_BxV).max(-1)
      keep_min_B = jnp.where(highest_dropped_B > -jnp.inf, (lowest_kept_B + highest_dropped_B) / 2, -jnp.inf)
      z_BxV = jnp.where(keep_BxV, z_BxV, -jnp.inf)
    draw = lambda k, z: jax.random.categorical(k, z, axis=-1)  # noqa: E731
    token_B = (draw(key, z_BxV) if key.shape == () else jax.vmap(draw)(key, z_BxV)).astype(jnp.int32)
    logp_BxV = jax.nn.log_softmax(z_BxV, axis=-1)
  return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0], keep_min_B


def _rows(B):
  return jnp.arange(B)


def _put(x_BxS, slot_B, value_B, active_B):
  """x[b, slot_b] = value_b where active_b (slots past the end are clamped and left unchanged)."""
  slot_B = jnp.minimum(slot_B, x_BxS.shape[1] - 1)
  old_B = x_BxS[_rows(x_BxS.shape[0]), slot_B]
  return x_BxS.at[_rows(x_BxS.shape[0]), slot_B].set(jnp.where(active_B, value_B.astype(x_BxS.dtype), old_B))


def _put_experts(experts: dict, slot_B, router: dict, t: int, active_B):
  """Record the experts the token at decode position t of each row was routed to, at its cache slot."""
  out = {}
  for name, e_NxBxSxK in experts.items():
    new_NxBxK = router[name]["experts"][:, :, t]
    slot = jnp.minimum(slot_B, e_NxBxSxK.shape[2] - 1)
    rows = _rows(e_NxBxSxK.shape[1])
    old_NxBxK = e_NxBxSxK[:, rows, slot]
    out[name] = e_NxBxSxK.at[:, rows, slot].set(jnp.where(active_B[None, :, None], new_NxBxK, old_NxBxK))
  return out


def is_eos(x_B, eos_E):
  """Whether each token is one of the stop ids (a tokenizer may have several: a chat model's end of turn and
  its end of text)."""
  return (x_B[:, None] == eos_E[None]).any(-1)


def split_rows(x, axis: int = 0):
  """x with its rows (dimension `axis`) split over the batch axes, the other dimensions whole."""
  return constrain(x, *[None] * axis, "batch", *[None] * (x.ndim - axis - 1))


def laid_out(st: DecodeState) -> DecodeState:
  """Every per-row array split over the batch axes (caches and experts behind their layers axis), so each
  compiled call returns the layout the next one was compiled for: one compilation per shape, not per caller."""
  layered = lambda x: split_rows(x, 1)  # noqa: E731
  fields = {f: split_rows(getattr(st, f)) for f in DecodeState._fields
            if f not in ("cache", "experts", "keys_B", "step")}
  return st._replace(cache=jax.tree.map(layered, st.cache), experts=jax.tree.map(layered, st.experts), **fields)


def _draw_keys(keys_B, n_B):
  """The key of each row's next token: fold_in(row key, tokens it has generated)."""
  return jax.vmap(jax.random.fold_in)(keys_B, n_B)


def prefill(params, tokens_BxP, prompt_len_B, live_B, index_B, budget_B, key, S: int, eos_E, cfg: ModelConfig,
             compute: ComputeConfig, scfg: SamplerConfig) -> DecodeState:
  """Run the prompts (row b: prompt number index_B[b], budget_B[b] new tokens at most) through the model at
  slots [0, P) and draw each row's first token."""
  B, P = tokens_BxP.shape
  cache = model.init_cache(cfg, compute, B, S)
  real_BxP = jnp.arange(P)[None] < prompt_len_B[:, None]
  zeros_B = jnp.zeros(B, jnp.int32)
  out = model.decode(params, cache, tokens_BxP, zeros_B, cfg, compute, real_BxP)
  last_B = prompt_len_B - 1
  keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, index_B)
  first_B, logp_B, keep_min_B = sample(out.logits_BxTxV[_rows(B), last_B], _draw_keys(keys_B, zeros_B), scfg)
  tokens_BxS = jnp.zeros((B, S), jnp.int32).at[:, :P].set(tokens_BxP)
  tokens_BxS = _put(tokens_BxS, prompt_len_B, first_B, jnp.ones(B, jnp.bool_))
  logprobs_BxS = _put(jnp.zeros((B, S), jnp.float32), prompt_len_B, logp_B, jnp.ones(B, jnp.bool_))
  keep_min_BxS = _put(jnp.full((B, S), -jnp.inf, jnp.float32), prompt_len_B, keep_min_B, jnp.ones(B, jnp.bool_))
  experts = {}
  for name, stats in out.router.items():
    e_NxBxPxK = jnp.where(real_BxP[None, :, :, None], stats["experts"], -1)
    experts[name] = jnp.full((*e_NxBxPxK.shape[:2], S, e_NxBxPxK.shape[-1]), -1, jnp.int32).at[:, :, :P].set(e_NxBxPxK)
  draft_B, cache = zeros_B, out.cache
  if scfg.speculative:  # MTP over the prompt (fills its cache), drafting the token after the first one
    next_BxP = jnp.concatenate([tokens_BxP[:, 1:], tokens_BxP[:, :1]], axis=1).at[_rows(B), last_B].set(first_B)
    draft_logits, cache = model.mtp_draft(params, cache, out.hidden_BxTxD, next_BxP, zeros_B, cfg, compute)
    draft_B = jnp.argmax(draft_logits[_rows(B), last_B], axis=-1).astype(jnp.int32)
  done_B = is_eos(first_B, eos_E) | (budget_B <= 1) | ~live_B  # rows padding the batch never run
  return laid_out(DecodeState(cache, tokens_BxS, logprobs_BxS, keep_min_BxS, experts, prompt_len_B, first_B, draft_B,
                             done_B, jnp.ones(B, jnp.int32), zeros_B, keys_B, budget_B, jnp.zeros((), jnp.int32)))


def _step(params, st: DecodeState, eos_E, cfg: ModelConfig, compute: ComputeConfig, scfg: SamplerConfig) -> DecodeState:
  """Feed each active row's last token, draw the next one."""
  active_B = ~st.done_B
  out = model.decode(params, st.cache, st.next_B[:, None], st.length_B, cfg, compute, active_B[:, None])
  new_B, logp_B, keep_min_B = sample(out.logits_BxTxV[:, 0], _draw_keys(st.keys_B, st.n_new_B), scfg)
  slot_B = st.length_B + 1
  n_new_B = st.n_new_B + active_B
  return st._replace(
      cache=out.cache, tokens_BxS=_put(st.tokens_BxS, slot_B, new_B, active_B),
      logprobs_BxS=_put(st.logprobs_BxS, slot_B, logp_B, active_B),
      keep_min_BxS=_put(st.keep_min_BxS, slot_B, keep_min_B, active_B),
      experts=_put_experts(st.experts, st.length_B, out.router, 0, active_B),
      length_B=st.length_B + active_B, next_B=jnp.where(active_B, new_B, st.next_B),
      done_B=st.done_B | (active_B & (is_eos(new_B, eos_E) | (n_new_B >= st.budget_B))),
      n_new_B=n_new_B, step=st.step + 1)


def _speculative_step(params, st: DecodeState, eos_E, cfg: ModelConfig, compute: ComputeConfig,
                      scfg: SamplerConfig) -> DecodeState:
  """Greedy with an MTP draft (V3 report §5.4.3): feed [next, draft] at slots [n, n+1]; the main model's
  argmax a after `next` is always kept, and its argmax b after the draft too when draft == a. Equals plain
  greedy decoding token for token; garbage left at slot n+1 by a rejected draft is overwritten next step."""
  active_B = ~st.done_B
  out = model.decode(params, st.cache, jnp.stack([st.next_B, st.draft_B], 1), st.length_B, cfg, compute,
                     jnp.stack([active_B, active_B], 1))
  logp_Bx2xV = jax.nn.log_softmax(out.logits_BxTxV, axis=-1)
  ab_Bx2 = jnp.argmax(out.logits_BxTxV, axis=-1).astype(jnp.int32)
  lp_Bx2 = jnp.take_along_axis(logp_Bx2xV, ab_Bx2[..., None], axis=-1)[..., 0]
  a_B, b_B = ab_Bx2[:, 0], ab_Bx2[:, 1]
  n1_B = st.n_new_B + 1
  accept_B = active_B & (a_B == st.draft_B) & ~is_eos(a_B, eos_E) & (n1_B < st.budget_B)
  tokens, logprobs = st.tokens_BxS, st.logprobs_BxS
  tokens, logprobs = _put(tokens, st.length_B + 1, a_B, active_B), _put(logprobs, st.length_B + 1, lp_Bx2[:, 0], active_B)
  tokens, logprobs = _put(tokens, st.length_B + 2, b_B, accept_B), _put(logprobs, st.length_B + 2, lp_Bx2[:, 1], accept_B)
  experts = _put_experts(st.experts, st.length_B, out.router, 0, active_B)
  experts = _put_experts(experts, st.length_B + 1, out.router, 1, accept_B)
  draft_logits, cache = model.mtp_draft(params, out.cache, out.hidden_BxTxD, ab_Bx2, st.length_B, cfg, compute)
  drafts_Bx2 = jnp.argmax(draft_logits, axis=-1).astype(jnp.int32)
  n_new_B = st.n_new_B + active_B + accept_B
  last_B = jnp.where(accept_B, b_B, a_B)
  done_B = st.done_B | (active_B & (is_eos(last_B, eos_E) | (n_new_B >= st.budget_B)))
  return st._replace(
      cache=cache, tokens_BxS=tokens, logprobs_BxS=logprobs, experts=experts,
      length_B=st.length_B + active_B + accept_B, next_B=jnp.where(active_B, last_B, st.next_B),
      draft_B=jnp.where(accept_B, drafts_Bx2[:, 1], drafts_Bx2[:, 0]), done_B=done_B, n_new_B=n_new_B,
      accepted_B=st.accepted_B + accept_B, step=st.step + 1)


def decode_chunk(params, st: DecodeState, eos_E, min_done, cfg: ModelConfig, compute: ComputeConfig,
                  scfg: SamplerConfig) -> DecodeState:
  """Up to scfg.steps_per_call decode steps, stopping early once `min_done` rows are done (all of them for a
  static batch; a few for continuous batching, whose freed rows take new prompts)."""
  step_fn = _speculative_step if scfg.speculative else _step
  stop_at = st.step + scfg.steps_per_call
  return jax.lax.while_loop(lambda s: (s.step < stop_at) & (s.done_B.sum() < min_done),
                            lambda s: laid_out(step_fn(params, s, eos_E, cfg, compute, scfg)), st)


# Compiled once per (shapes, configs); the decode state is donated, so its cache is updated in place.
prefill_jit = jax.jit(prefill, static_argnames=("S", "cfg", "compute", "scfg"))
decode_chunk_jit = jax.jit(decode_chunk, static_argnames=("cfg", "compute", "scfg"), donate_argnums=1)
_per_layer_jit = jax.jit(model.per_layer)


def decode_weights(params: dict, scfg: SamplerConfig) -> dict:
  """The weights decode reads: each layer's in arrays of its own (model.per_layer) under
  sampler.per_layer_weights, else the stacked ones as they are."""
  return _per_layer_jit(params) if scfg.per_layer_weights else params


def mesh_of(params):
  s = jax.tree.leaves(params)[0].sharding
  return s.mesh if isinstance(s, jax.sharding.NamedSharding) else None


def budgets(prompts: list, scfg: SamplerConfig, max_new: Sequence[int] | None) -> np.ndarray:
  """Each prompt's token budget: `max_new` (one per prompt) or sampler.max_new_tokens for all."""
  if max_new is None:
    return np.full(len(prompts), scfg.max_new_tokens, np.int32)
  out = np.asarray(max_new, np.int32)
  if out.shape != (len(prompts),) or out.min(initial=1) < 1:
    raise ConfigError(f"generate: max_new needs one positive budget per prompt ({len(prompts)}), got {out.shape} "
                      f"with minimum {out.min(initial=1)}")
  return out


def prompt_buffer(prompts: list[list[int]], n_rows: int, pad_id: int, max_seq_len: int, max_new: int):
  lengths = np.array([len(p) for p in prompts] + [1] * (n_rows - len(prompts)), np.int32)
  if lengths.min() < 1:
    raise ConfigError("generate: every prompt needs at least one token (e.g. BOS)")
  P = min(-(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET, max_seq_len)
  S = P + max_new + 1  # +1: a speculative step may write one slot past the budget
  if int(lengths.max()) + max_new + 1 > max_seq_len:
    raise ConfigError(f"prompt ({int(lengths.max())} tokens) + sampler.max_new_tokens={max_new} + 1 (a draft "
                      f"slot) exceeds model.max_seq_len={max_seq_len}")
  S = min(S, max_seq_len)
  buf = np.full((n_rows, P), pad_id, np.int32)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  return buf, lengths, S


def generate(params: dict, prompts: list[list[int]], cfg: ModelConfig, compute: ComputeConfig, scfg: SamplerConfig, *,
             eos_id: int | Sequence[int], pad_id: int = 0, key=None, max_new: Sequence[int] | None = None,
             on_chunk: Callable[[int], None] | None = None) -> Rollout:
  """Sample a completion for every prompt (lists of token ids) until one of the eos ids or the budget
  (sampler.max_new_tokens, or `max_new[i]` for prompt i), all prompts in one static batch. On a mesh (taken
  from the params' shardings) rows are split over the batch axes, and the batch is padded to a multiple of
  them with dummy rows that are dropped again. `on_chunk(tokens_so_far)` is called between chunks."""
  if scfg.speculative and not cfg.n_mtp:
    raise ConfigError("sampler.speculative=true needs an MTP module (model.n_mtp >= 1)")
  compute = dataclasses.replace(compute, capacity_factor=scfg.capacity_factor)  # sampler.capacity_factor: see config
  params = decode_weights(params, scfg)
  mesh = mesh_of(params)
  multiple = 1 if mesh is None else sharding.batch_size_multiple(mesh)
  n_rows = max(1, math.ceil(len(prompts) / multiple)) * multiple
  budget = budgets(prompts, scfg, max_new)
  buf, lengths, S = prompt_buffer(prompts, n_rows, pad_id, cfg.max_seq_len, int(budget.max()))
  key = jax.random.key(0) if key is None else key
  live = np.arange(n_rows) < len(prompts)
  rows = {"tokens": buf, "lengths": lengths, "live": live, "index": np.arange(n_rows, dtype=np.int32),
          "budget": np.concatenate([budget, np.ones(n_rows - len(prompts), np.int32)])}
  put = sharding.global_batch(rows, mesh) if mesh is not None else jax.tree.map(jnp.asarray, rows)
  eos = jnp.asarray(np.atleast_1d(np.asarray(eos_id, np.int32)))
  st = prefill_jit(params, put["tokens"], put["lengths"], put["live"], put["index"], put["budget"], key, S=S,
                    eos_E=eos, cfg=cfg, compute=compute, scfg=scfg)
  lengths_dev = put["lengths"]
  while True:
    done = bool(jax.device_get(st.done_B.all()))  # a sum of one bool per row: replicated, any process
    if on_chunk is not None:
      on_chunk(int(jax.device_get(st.n_new_B.sum())))
    if done:
      break
    st = decode_chunk_jit(params, st, eos, np.int32(n_rows), cfg=cfg, compute=compute, scfg=scfg)
  n, prompt_len_B = len(prompts), lengths_dev
  slots_BxS = jnp.arange(S)[None]
  completion_BxS = (slots_BxS >= prompt_len_B[:, None]) & (slots_BxS < prompt_len_B[:, None] + st.n_new_B[:, None])
  last_B = st.tokens_BxS[_rows(n_rows), prompt_len_B + st.n_new_B - 1]
  return Rollout(st.tokens_BxS[:n], prompt_len_B[:n], st.n_new_B[:n], st.logprobs_BxS[:n], st.keep_min_BxS[:n],
                 completion_BxS[:n].astype(jnp.int32), ~is_eos(last_B, eos)[:n],
                 {k: v[:, :n] for k, v in st.experts.items()}, st.accepted_B[:n], st.step)


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) global array as one numpy array on every process."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def completions(rollout: Rollout) -> list[list[int]]:
  """Each row's generated ids (EOS included), on the host."""
  tokens, start, n = to_host(rollout.tokens_BxS), to_host(rollout.prompt_len_B), to_host(rollout.completion_len_B)
  return [tokens[b, start[b]:start[b] + n[b]].tolist() for b in range(tokens.shape[0])]


@functools.partial(jax.jit, static_argnames=("cfg", "compute"))
def _full_forward_argmax(params, tokens_BxL, last_B, cfg: ModelConfig, compute: ComputeConfig):
  L = tokens_BxL.shape[1]
  mask_BxL = (jnp.arange(L)[None] <= last_B[:, None]).astype(jnp.int32)
  logits = model.apply(params, tokens_BxL, cfg, compute, token_mask_BxL=mask_BxL).logits_BxLxV
  return jnp.argmax(jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0], axis=-1)


def greedy_full_forward(params: dict, prompts: list[list[int]], cfg: ModelConfig, compute: ComputeConfig,
                        max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int = 0) -> list[list[int]]:
  """Each prompt's greedy continuation (up to and including EOS, at most max_new_tokens ids), recomputing
  the whole sequence for every token: the reference for the cached sampler."""
  lengths = np.array([len(p) for p in prompts])
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  L = int(lengths.max()) + max_new_tokens
  if L > cfg.max_seq_len:
    raise ConfigError(f"prompt + max_new_tokens = {L} tokens exceeds model.max_seq_len={cfg.max_seq_len}")
  buf = np.full((len(prompts), L), pad_id, np.int32)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  done = np.zeros(len(prompts), bool)
  out = [[] for _ in prompts]
  for t in range(max_new_tokens):
    ids = np.asarray(_full_forward_argmax(params, jnp.asarray(buf), jnp.asarray(lengths - 1 + t), cfg, compute))
    for i in np.flatnonzero(~done):
      buf[i, lengths[i] + t] = ids[i]
      out[i].append(int(ids[i]))
      done[i] = ids[i] in np.atleast_1d(eos_id)
    if done.all():
      break
  return out
