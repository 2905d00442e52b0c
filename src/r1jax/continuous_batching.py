"""Continuous batching for rollouts: a fixed number of decode slots, and when a row finishes (EOS or its
budget) the next prompt takes its slot, so the batch stays full while completion lengths vary by 10x and more
(R1's do). A static batch instead decodes until its longest row ends, most of its rows idle.

Between decode chunks the host reads which slots are done; one compiled call then copies the finished rows
into the output buffers and prefills the next prompts into their slots: a prefill of as many rows as are
refilled, rounded up to slots/8, /4, /2 or all of them, scattered into the state. A chunk ends early once
`slots // 8` more rows are done, so freed slots wait at most that long. Every shape is fixed by (slots, the
refill size, prompt bucket, S): at most four refill compilations, none per prompt. Prompt i draws from
fold_in(key, i) (sampler.py), so its tokens, log-probs, kept sets and experts are those of sampler.generate for
the same key, whichever slot and step it runs at."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import model, sampler, sharding
from r1jax.config import ComputeConfig, ConfigError, ModelConfig, SamplerConfig
from r1jax.sampler import (DecodeState, Rollout, budgets, decode_chunk_jit, decode_weights, is_eos, laid_out, mesh_of,
                           prefill, prefill_jit, prompt_buffer, split_rows)

REFILL_FRACTION = 8  # a decode chunk stops once slots // REFILL_FRACTION more rows are done


def _scatter_rows(slot_R, new: DecodeState, old: DecodeState) -> DecodeState:
  """`old` with row r of `new` in row slot_R[r] (a slot past the end: dropped); caches and experts carry a
  leading layers axis."""
  by_row = lambda n, o: o.at[slot_R].set(n, mode="drop")  # noqa: E731
  by_layer = lambda n, o: o.at[:, slot_R].set(n, mode="drop")  # noqa: E731
  keys = jax.random.wrap_key_data(by_row(jax.random.key_data(new.keys_B), jax.random.key_data(old.keys_B)),
                                  impl=jax.random.key_impl(new.keys_B))
  rows = {f: by_row(getattr(new, f), getattr(old, f)) for f in DecodeState._fields
          if f not in ("cache", "experts", "keys_B", "step")}
  return laid_out(DecodeState(cache=jax.tree.map(by_layer, new.cache, old.cache),
                              experts=jax.tree.map(by_layer, new.experts, old.experts), keys_B=keys, step=old.step,
                              **rows))


def refill_sizes(B: int, multiple: int) -> list[int]:
  """The prefill batch sizes a refill may take: B/8, B/4, B/2 and B, each rounded up to the mesh's batch multiple."""
  return sorted({min(B, max(multiple, -(-(B >> k) // multiple) * multiple)) for k in range(4)})


def _laid_out(out: dict) -> dict:
  """Output rows over the batch axes where they divide N (else whole): one layout for every call."""
  return {**{k: split_rows(v) for k, v in out.items() if k != "experts"},
          "experts": {k: split_rows(v, 1) for k, v in out["experts"].items()}}


def _outputs(st: DecodeState, N: int) -> dict:
  """Empty output buffers for N prompts, shaped like the state's rows."""
  S = st.tokens_BxS.shape[1]
  return _laid_out({"tokens": jnp.zeros((N, S), jnp.int32), "logprobs": jnp.zeros((N, S), jnp.float32),
          "keep_min": jnp.full((N, S), -jnp.inf, jnp.float32), "n_new": jnp.zeros(N, jnp.int32),
          "experts": {k: jnp.full((v.shape[0], N, *v.shape[2:]), -1, jnp.int32) for k, v in st.experts.items()}})


def _harvest(out: dict, st: DecodeState, dest_B) -> dict:
  """Copy row b of the state to output row dest_B[b] (dest N: not copied)."""
  put = lambda o, x: o.at[dest_B].set(x, mode="drop")  # noqa: E731
  return _laid_out({"tokens": put(out["tokens"], st.tokens_BxS), "logprobs": put(out["logprobs"], st.logprobs_BxS),
          "keep_min": put(out["keep_min"], st.keep_min_BxS), "n_new": put(out["n_new"], st.n_new_B),
          "experts": {k: v.at[:, dest_B].set(st.experts[k], mode="drop") for k, v in out["experts"].items()}})


def _swap(params, st: DecodeState, out: dict, dest_B, slot_R, tokens_RxP, prompt_len_R, live_R, index_R, budget_R,
          key, eos_E, cfg: ModelConfig, compute: ComputeConfig, scfg: SamplerConfig):
  """Harvest the finished rows (dest_B < N), then prefill the next prompts (rows marked live_R) into the state's
  rows slot_R."""
  out = _harvest(out, st, dest_B)
  new = prefill(params, tokens_RxP, prompt_len_R, live_R, index_R, budget_R, key, st.tokens_BxS.shape[1], eos_E,
                cfg, compute, scfg)
  return _scatter_rows(slot_R, new, st), out


_swap_jit = jax.jit(_swap, static_argnames=("cfg", "compute", "scfg"), donate_argnums=(1, 2))
_outputs_jit = jax.jit(_outputs, static_argnames=("N",))
_harvest_jit = jax.jit(_harvest, donate_argnums=0)
_fp8_weights_jit = jax.jit(model.fp8_weights, static_argnames=("compute",))


def generate(params: dict, prompts: list[list[int]], cfg: ModelConfig, compute: ComputeConfig, scfg: SamplerConfig, *,
             slots: int, eos_id: int | Sequence[int], pad_id: int = 0, key=None,
             max_new: Sequence[int] | None = None) -> Rollout:
  """sampler.generate's Rollout for `prompts`, decoded `slots` rows at a time (rounded up to the mesh's batch
  multiple) with finished rows refilled from the queue in prompt order."""
  if scfg.speculative:
    raise ConfigError("sampler.slots (continuous batching) does not run MTP speculative decoding: set "
                      "sampler.speculative=false or sampler.slots=0")
  compute = dataclasses.replace(compute, capacity_factor=scfg.capacity_factor)
  params = decode_weights(params, scfg)
  mesh = mesh_of(params)
  multiple = 1 if mesh is None else sharding.batch_size_multiple(mesh)
  B = max(1, math.ceil(slots / multiple)) * multiple
  N = len(prompts)
  budget = budgets(prompts, scfg, max_new)
  buf_NxP, lengths_N, S = prompt_buffer(prompts, N, pad_id, cfg.max_seq_len, int(budget.max()))
  key = jax.random.key(0) if key is None else key
  eos = jnp.asarray(np.atleast_1d(np.asarray(eos_id, np.int32)))
  put = (lambda rows: sharding.global_batch(rows, mesh)) if mesh is not None else (
      lambda rows: jax.tree.map(jnp.asarray, rows))
  owner = np.full(B, -1)  # the prompt each slot decodes (-1: none)
  queued = list(range(N))[::-1]  # popped in prompt order
  sizes = refill_sizes(B, multiple)

  def rows_for(slots_to_fill, R: int | None = None):
    """Host buffers that prefill the next prompts into `slots_to_fill`, R rows or as few as a refill size allows
    (the rest: 1-token placeholders for slot B, which the scatter drops)."""
    fill = slots_to_fill[:len(queued)]
    R = R or next(size for size in sizes if size >= len(fill))
    rows = {"tokens": np.full((R, buf_NxP.shape[1]), pad_id, np.int32), "lengths": np.ones(R, np.int32),
            "live": np.zeros(R, bool), "index": np.zeros(R, np.int32), "budget": np.ones(R, np.int32),
            "slot": np.full(R, B, np.int32)}
    for r, b in enumerate(fill):
      i = owner[b] = queued.pop()
      rows["tokens"][r], rows["lengths"][r] = buf_NxP[i], lengths_N[i]
      rows["index"][r], rows["budget"][r], rows["live"][r], rows["slot"][r] = i, budget[i], True, b
    return rows

  r = put(rows_for(np.arange(B), R=B))  # the first prefill makes the state of all B slots
  st = sharding.canonical(prefill_jit(params, r["tokens"], r["lengths"], r["live"], r["index"], r["budget"], key,
                                      S=S, eos_E=eos, cfg=cfg, compute=compute, scfg=scfg))
  out = sharding.canonical(_outputs_jit(st, N=N))
  while True:
    finished = np.asarray(jax.device_get(st.done_B)) & (owner >= 0)
    if finished.any():
      dest = put({"dest": np.where(finished, owner, N).astype(np.int32)})["dest"]
      owner[finished] = -1
      if queued:
        r = put(rows_for(np.flatnonzero(finished)))
        st, out = sharding.canonical(_swap_jit(params, st, out, dest, r["slot"], r["tokens"], r["lengths"], r["live"],
                                               r["index"], r["budget"], key, eos, cfg=cfg, compute=compute, scfg=scfg))
      else:
        out = sharding.canonical(_harvest_jit(out, st, dest))
    if (owner < 0).all():
      break
    idle = int((owner < 0).sum())
    min_done = min(B, idle + max(1, B // REFILL_FRACTION)) if queued else B
    st = sharding.canonical(decode_chunk_jit(params, st, eos, np.int32(min_done), cfg=cfg, compute=compute,
                                             scfg=scfg))
  prompt_len_N = jnp.asarray(lengths_N)
  slots_NxS = jnp.arange(S)[None]
  n_new_N = out["n_new"]
  completion_NxS = (slots_NxS >= prompt_len_N[:, None]) & (slots_NxS < prompt_len_N[:, None] + n_new_N[:, None])
  last_N = jnp.take_along_axis(out["tokens"], (prompt_len_N + n_new_N - 1)[:, None], axis=1)[:, 0]
  return Rollout(out["tokens"], prompt_len_N, n_new_N, out["logprobs"], out["keep_min"],
                 completion_NxS.astype(jnp.int32), ~is_eos(last_N, eos), out["experts"], jnp.zeros(N, jnp.int32),
                 st.step)


def rollout(params: dict, prompts: list[list[int]], cfg: ModelConfig, compute: ComputeConfig, scfg: SamplerConfig,
            **kwargs) -> Rollout:
  """Rollouts as the config asks: from FP8 weights (sampler.fp8_weights) or the learner's, by continuous
  batching with sampler.slots slots or as one static batch (0)."""
  if scfg.fp8_weights:
    compute = dataclasses.replace(compute, fp8=dataclasses.replace(compute.fp8, enabled=True))
    params = _fp8_weights_jit(params, compute)
  if scfg.slots:
    return generate(params, prompts, cfg, compute, scfg, slots=scfg.slots, **kwargs)
  return sampler.generate(params, prompts, cfg, compute, scfg, **kwargs)
