"""The Python side of GRPO, outside jit: prompts of a task -> the sampler (the current policy) -> rule-based
rewards -> group advantages -> a learner batch (rl/grpo.py's layout). `RolloutSource` is the data source the
one training loop (loop.fit) draws GRPO batches from; its state is the step, since the prompts and sampling
keys of step s are a pure function of (seed, s), so a resumed run samples what a straight run would.

Also here: evaluation (greedy accuracy, format rate, pass@k on the eval split)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from r1jax import continuous_batching, data, sampler, sharding, tasks, tokenizer
from r1jax.batch import Batch
from r1jax.config import ConfigError, RunConfig
from r1jax.rl import grpo, problems, rewards


def task_name(cfg: RunConfig) -> str:
  """What the problems are, for reports: the problems file's name, else grpo.task."""
  return Path(cfg.data.problems).name if cfg.data.problems else cfg.grpo.task


def task_examples(cfg: RunConfig, split: str, n: int) -> list[tasks.Example]:
  """n problems of a split: data.problems' (at most n) when set, else n generated ones of grpo.task."""
  if cfg.data.problems:
    return problems.examples(cfg, split, n)
  task = cfg.grpo.task
  try:
    return tasks.make(task, n, cfg.data.seed, split, cfg.data.template, **data.task_difficulty(task, cfg.data))
  except ValueError as e:
    raise ConfigError(f"grpo.task={task}: {e}") from None


def _encode(tok, examples) -> list[list[int]]:
  return [tokenizer.prompt_ids(tok, ex.prompt) for ex in examples]


def score_completions(examples, texts: list[str], n_tokens, truncated, cfg: RunConfig) -> dict:
  """Every reward function's value per completion ([n] arrays by name) and the weighted total."""
  spec = rewards.parse(cfg.grpo.rewards)
  rows = []
  for ex, text, n, cut in zip(examples, texts, n_tokens, truncated):
    info = {"n_tokens": int(n), "max_tokens": cfg.sampler.max_new_tokens, "truncated": bool(cut),
            "overlong_buffer": cfg.grpo.overlong_buffer, "language": cfg.grpo.language}
    rows.append(rewards.score(ex, text, info, spec))
  return {k: np.array([r[k] for r in rows], np.float32) for k in rows[0]}


def learner_batch(rollout: sampler.Rollout, seq_len: int, pad_id: int) -> Batch:
  """Host arrays of the learner's layout from a rollout: inputs are slots [0, L), targets slots [1, L]."""
  tokens = sampler.to_host(rollout.tokens_BxS)
  B, S = tokens.shape
  L = seq_len
  n_real = sampler.to_host(rollout.prompt_len_B) + sampler.to_host(rollout.completion_len_B)
  if n_real.max() - 1 > L:
    raise ConfigError(f"train.seq_len={L}: a prompt and its completion span {n_real.max() - 1} positions; "
                      "raise train.seq_len (or lower sampler.max_new_tokens)")
  # Slots past every row's end are padding: crop or pad the buffer to the learner's L + 1 slots.
  pad = lambda x, v: np.pad(x[..., :L + 1], [(0, 0)] * (x.ndim - 1) + [(0, max(L + 1 - S, 0))],  # noqa: E731
                            constant_values=v)
  tokens = pad(tokens, pad_id)
  completion = pad(sampler.to_host(rollout.completion_mask_BxS), 0)
  logp = pad(sampler.to_host(rollout.logprobs_BxS), 0.0)
  keep_min = pad(sampler.to_host(rollout.keep_min_BxS), -np.inf)
  real_BxL = (np.arange(L)[None] < (n_real - 1)[:, None]).astype(np.int32)  # the last token is never an input
  routes = None
  if "moe_layers" in rollout.experts:
    routes = np.moveaxis(sampler.to_host(rollout.experts["moe_layers"]), 1, 0)  # [B, N, S, K]
    routes = np.pad(routes[:, :, :L], [(0, 0), (0, 0), (0, max(L - S, 0)), (0, 0)], constant_values=-1)
    routes = routes.astype(np.int32)
  return Batch(tokens_BxL=np.where(real_BxL, tokens[:, :L], pad_id).astype(np.int32),
               targets_BxL=tokens[:, 1:].astype(np.int32), loss_mask_BxL=completion[:, 1:].astype(np.int32),
               token_mask_BxL=real_BxL,  # one right-padded sequence per row: no segment ids (nn/attention.py)
               positions_BxL=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
               sampler_logp_BxL=logp[:, 1:].astype(np.float32), routes_BxNxLxK=routes,
               sampler_keep_min_BxL=keep_min[:, 1:].astype(np.float32))


class RolloutSource:
  """GRPO batches for loop.fit: P prompts x G completions per step, rewards, advantages, optional DAPO
  dynamic sampling (groups whose rewards are all equal carry no signal: resample new prompts until the
  batch is full, at most grpo.max_resample_rounds times, then keep the rest, counted)."""

  def __init__(self, cfg: RunConfig, mesh, ref_logp_fn=None, samples_path: str | Path | None = None):
    self.cfg, self.mesh, self.ref_logp_fn = cfg, mesh, ref_logp_fn
    self.tok = tokenizer.load(cfg.data.tokenizer)
    tokenizer.check_vocab(self.tok, cfg.model.vocab_size)
    self.pool = task_examples(cfg, "train", cfg.data.task_examples)
    self.step, self.samples_path = 0, samples_path
    g = cfg.grpo
    rows = g.prompts_per_step * g.group_size
    if rows % sharding.batch_size_multiple(mesh):
      raise ConfigError(f"grpo.prompts_per_step * grpo.group_size = {rows}: must be a multiple of "
                        f"{sharding.batch_size_multiple(mesh)}, the devices that shard the batch")

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict):
    self.step = int(state["step"])

  def _prompts(self, step: int, round_: int) -> list[tasks.Example]:
    """Prompts of (step, round): a fresh permutation of the pool per epoch, walked in order."""
    P, n = self.cfg.grpo.prompts_per_step, len(self.pool)
    rounds = self.cfg.grpo.max_resample_rounds + 1 if self.cfg.grpo.zero_variance == "filter" else 1
    start = (step * rounds + round_) * P
    out = []
    for i in range(start, start + P):
      epoch, j = divmod(i, n)
      order = np.random.default_rng([self.cfg.data.seed, 7, epoch]).permutation(n)
      out.append(self.pool[order[j]])
    return out

  def _sample(self, params, examples, key) -> tuple[sampler.Rollout, list[str], dict, np.ndarray]:
    G = self.cfg.grpo.group_size
    prompts = [p for p in _encode(self.tok, examples) for _ in range(G)]  # prompt-major rows p*G + g
    out = continuous_batching.rollout(params, prompts, self.cfg.model, self.cfg.compute, self.cfg.sampler,
                                      eos_id=self.tok.eos_ids, pad_id=self.tok.pad_id, key=key)
    ids = sampler.completions(out)
    texts = [tokenizer.completion_text(self.tok, c) for c in ids]
    truncated = sampler.to_host(out.truncated_B)
    scores = score_completions([ex for ex in examples for _ in range(G)], texts, [len(c) for c in ids],
                               truncated, self.cfg)
    return out, texts, scores, truncated

  def next_batch(self, state) -> tuple[Batch, dict]:
    host, info, samples = self.rollout(self.step, state.params)
    self.write_samples(samples)
    batch = sharding.global_batch(host, self.mesh)
    if self.ref_logp_fn is not None:
      batch = batch._replace(ref_logp_BxL=self.ref_logp_fn(batch))
    self.step += 1
    return batch, info

  def rollout(self, step: int, params) -> tuple[Batch, dict, list[dict]]:
    """Step `step`'s rollouts (0-based) sampled with `params` (on their own mesh): host arrays, metrics and
    the sample records to log once the batch is used (`write_samples`). A pure function of (seed, step,
    params): the prompts and keys do not depend on what ran before."""
    g, t0 = self.cfg.grpo, time.perf_counter()
    key = jax.random.fold_in(jax.random.key(self.cfg.train.seed + 1), step)
    kept, spare = [], []  # (rollout, texts, scores, truncated, examples, group index) per group
    rounds = g.max_resample_rounds + 1 if g.zero_variance == "filter" else 1
    for r in range(rounds):
      examples = self._prompts(step, r)
      out, texts, scores, truncated = self._sample(params, examples, jax.random.fold_in(key, r))
      zero_var = np.ptp(scores["total"].reshape(-1, g.group_size), axis=1) == 0
      for p in range(len(examples)):
        group = (out, texts, scores, truncated, examples, p)
        (spare if zero_var[p] and g.zero_variance == "filter" else kept).append(group)
      if len(kept) >= g.prompts_per_step:
        break
    groups = (kept + spare)[:g.prompts_per_step]
    host, info, samples = self._assemble(step, groups, rounds_used=r + 1)
    info["rollout_s"] = time.perf_counter() - t0
    return host, info, samples

  def _assemble(self, step: int, groups, rounds_used: int) -> tuple[Batch, dict, list[dict]]:
    g, G = self.cfg.grpo, self.cfg.grpo.group_size
    parts, texts, scores, examples, truncated, hosted = [], [], {}, [], [], {}
    for out, t, s, cut, exs, p in groups:
      rows = slice(p * G, (p + 1) * G)
      if id(out) not in hosted:  # one host copy per rollout, however many of its groups are kept
        hosted[id(out)] = learner_batch(out, self.cfg.train.seq_len, self.tok.pad_id)
      part = hosted[id(out)]
      parts.append(jax.tree.map(lambda v, rows=rows: v[rows], part))
      texts += t[rows]
      truncated.append(cut[rows])
      examples += [exs[p]] * G
      for k, v in s.items():
        scores.setdefault(k, []).append(v[rows])
    host = jax.tree.map(lambda *vs: np.concatenate(vs), *parts)
    lengths = host.loss_mask_BxL.sum(1)
    scores = {k: np.concatenate(v) for k, v in scores.items()}
    truncated = np.concatenate(truncated)
    if g.mask_truncated:  # completions cut by the budget leave the loss (their reward says nothing of the end)
      host = host._replace(loss_mask_BxL=host.loss_mask_BxL * ~truncated[:, None])
    total_PxG = scores["total"].reshape(-1, G)
    adv_PxG, zero_var_P = grpo.advantages(total_PxG, g.advantage, g.adv_eps)
    host = host._replace(advantages_B=np.asarray(adv_PxG, np.float32).reshape(-1))
    info = {f"reward_{k}": float(v.mean()) for k, v in scores.items() if k not in ("total", "errors")}
    info.update(reward_mean=float(scores["total"].mean()), reward_std=float(scores["total"].std()),
                reward_errors=float(scores["errors"].sum()),
                zero_variance_groups=float(np.asarray(zero_var_P).mean()), resample_rounds=float(rounds_used),
                completion_len_mean=float(lengths.mean()), completion_len_max=float(lengths.max()),
                truncated_frac=float(truncated.mean()))
    return host, info, self._samples(step, examples, texts, scores)

  def _samples(self, step: int, examples, texts, scores) -> list[dict]:
    """The first completion of each group, every grpo.log_samples_every steps."""
    if self.samples_path is None or step % self.cfg.grpo.log_samples_every or jax.process_index():
      return []
    return [{"step": step, "prompt": examples[i].prompt, "completion": texts[i],
             **{k: float(v[i]) for k, v in scores.items()}} for i in range(0, len(texts), self.cfg.grpo.group_size)]

  def write_samples(self, samples: list[dict]):
    if samples:
      with open(self.samples_path, "a") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)


def evaluate(params, cfg: RunConfig, n: int, k: int = 1, split: str = "eval", seed: int = 0) -> dict:
  """On n problems of the split: greedy accuracy and format rate, and with k > 1 pass@k (any of k samples
  at sampler.temperature correct; k samples per problem, so the unbiased estimator is that indicator)."""
  tok = tokenizer.load(cfg.data.tokenizer)
  examples = task_examples(cfg, split, n)
  n = len(examples)  # a problems file may hold fewer
  spec = "accuracy:1.0,format:1.0"
  greedy = dataclasses.replace(cfg.sampler, temperature=0.0, speculative=False)
  out = sampler.generate(params, _encode(tok, examples), cfg.model, cfg.compute, greedy, eos_id=tok.eos_ids,
                         pad_id=tok.pad_id)
  texts = [tokenizer.completion_text(tok, c) for c in sampler.completions(out)]
  scores = [rewards.score(ex, t, None, spec) for ex, t in zip(examples, texts)]
  result = {"n": n, "accuracy": float(np.mean([s["accuracy"] for s in scores])),
            "format": float(np.mean([s["format"] for s in scores])),
            "completion_len_mean": float(np.mean(sampler.to_host(out.completion_len_B)))}
  if k > 1:
    prompts = [p for p in _encode(tok, examples) for _ in range(k)]
    out = sampler.generate(params, prompts, cfg.model, cfg.compute, cfg.sampler, eos_id=tok.eos_ids,
                           pad_id=tok.pad_id, key=jax.random.key(seed))
    correct = np.array([rewards.score(examples[i // k], tokenizer.completion_text(tok, c), None,
                                      "accuracy:1.0")["accuracy"] for i, c in enumerate(sampler.completions(out))])
    result[f"pass@{k}"] = float(correct.reshape(n, k).max(1).mean())
  return result
