"""SFT batches with grain: JSONL prompt/completion or chat records (or a generated digit task), prompt
masking, packing with segment ids, per-process shards, and an iterator whose state checkpoints exactly.

A row holds arrays over seq_len L: tokens, targets (the next token), loss_mask (target is a completion token
or EOS), token_mask (real token), positions (per segment), and with packing segment_ids (1..k per packed
example, 0 padding).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from r1jax import sharding, tasks, tokenizer
from r1jax.batch import Batch
from r1jax.config import ConfigError, DataConfig, DataSource, RunConfig
from r1jax.tasks import digit_answer

EXAMPLE_KEYS = ("tokens", "targets", "loss_mask")  # per example, before padding/packing
BATCH_KEYS = (*EXAMPLE_KEYS, "token_mask", "segment_ids", "positions")  # segment_ids: packed batches only
_IN_PROCESS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # no threads: exact, simple state


class DataError(ValueError):
  """A bad record; the message is one line, `path:LINE: reason`."""


class JsonlSource:
  """One JSON object per line, parsed and checked when read; only line offsets are held in memory."""

  def __init__(self, path: str | Path):
    self.path = str(path)
    if not os.path.isfile(self.path):
      raise ConfigError(f"{self.path}: no such JSONL file")
    offsets, pos = [0], 0
    with open(self.path, "rb") as f:
      for line in f:
        pos += len(line)
        offsets.append(pos)
    if len(offsets) == 1:
      raise DataError(f"{self.path}:1: empty file")
    self._offsets = np.asarray(offsets, np.int64)
    self._fd = os.open(self.path, os.O_RDONLY)

  def __del__(self):
    if hasattr(self, "_fd"):
      os.close(self._fd)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, i: int) -> dict:
    where = f"{self.path}:{i + 1}"
    start, end = int(self._offsets[i]), int(self._offsets[i + 1])
    raw = os.pread(self._fd, end - start, start)
    if not raw.strip():
      raise DataError(f"{where}: empty line; JSONL needs one JSON object per line")
    try:
      obj = json.loads(raw.rstrip(b"\r\n"))  # so error columns stay on this line
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # invalid UTF-8
      raise DataError(f"{where}: invalid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
      try:
        prompt, completion = tokenizer.chat_prompt(obj["messages"])
      except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    elif "prompt" in obj and "completion" in obj:
      prompt, completion = obj["prompt"], obj["completion"]
      for key, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
          raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    else:
      raise DataError(f"{where}: expected keys 'prompt' and 'completion', or 'messages'; got {sorted(obj)}")
    if not completion:
      raise DataError(f"{where}: empty completion (nothing to learn)")
    return {"prompt": prompt, "completion": completion, "where": where}


class TaskSource:
  """Digit task example i is a pure function of (seed, split, i): random access, so it shuffles, shards
  and checkpoints like a file."""

  def __init__(self, task: str, n: int, digits: int, seed: int, split: int = 0):
    try:
      digit_answer(task, np.zeros(1, np.int64))
    except ValueError as e:
      raise ConfigError(f"data.source=task:{task}: {e}") from None
    self.task, self.n, self.digits, self.seed, self.split = task, n, digits, seed, split

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    digits = np.random.default_rng([self.seed, self.split, i]).integers(0, 10, self.digits)
    text = lambda d: "".join(map(str, d))  # noqa: E731
    return {"prompt": text(digits) + "=", "completion": text(digit_answer(self.task, digits)),
            "where": f"task:{self.task}#{i}"}


class RLTaskSource:
  """Problems of a tasks.py task with their cold-start completions (`<think>trace</think><answer>..`), or
  with direct answers (`<think></think><answer>..`, traces=False): text a model is trained on before RL, in
  the prompt format GRPO samples from."""

  def __init__(self, task: str, cfg: DataConfig, split: str, traces: bool = True):
    try:
      self.examples = tasks.make(task, cfg.task_examples, cfg.seed, split, cfg.template,
                                 **task_difficulty(task, cfg))
    except ValueError as e:
      raise ConfigError(f"data.source=rl:{task}: {e}") from None
    self.task, self.traces, self.kind = task, traces, "rl" if traces else "rl-direct"

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> dict:
    ex = self.examples[i]
    completion = tasks.cold_start_completion(ex) if self.traces else tasks.direct_completion(ex)
    return {"prompt": ex.prompt, "completion": completion, "where": f"{self.kind}:{self.task}#{i}"}


def task_difficulty(task: str, cfg: DataConfig) -> dict:
  """data.task_digits sets the size of digit and arithmetic problems."""
  return {"digits": cfg.task_digits} if task in ("copy", "reverse", "sort", "arith") else {}


def make_source(spec: str, cfg: DataConfig, *, eval: bool = False):
  """A DataSource's text (task:<name>, rl:<task>, rl-direct:<task> or a JSONL path); a task's eval split draws
  different examples than its train split."""
  source = DataSource.parse(spec)
  if source.kind == "task":
    return TaskSource(source.arg, cfg.task_examples, cfg.task_digits, cfg.seed, split=int(eval))
  if source.kind in ("rl", "rl-direct"):
    return RLTaskSource(source.arg, cfg, "eval" if eval else "train", traces=source.kind == "rl")
  return JsonlSource(source.arg)


def encode(tok, record: dict, seq_len: int) -> dict:
  """The prompt (BOS first where the tokenizer adds one: tokenizer.prompt_ids) then `completion EOS`; the loss
  covers targets that are completion tokens or EOS."""
  prompt = tokenizer.prompt_ids(tok, record["prompt"])
  ids = np.asarray(prompt + tok.encode(record["completion"]) + [tok.eos_id], np.int32)
  n = len(ids) - 1
  if n > seq_len:
    raise DataError(f"{record['where']}: example is {n} tokens after tokenizing, more than train.seq_len={seq_len}")
  loss_mask = np.zeros(n, np.int32)
  loss_mask[len(prompt) - 1:] = 1
  return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": loss_mask}


def pad_row(example: dict, seq_len: int, pad_id: int) -> dict:
  """One example per row: positions 0..n-1, then padding. No segment ids: a causal real token never sees the
  padding after it, and without them attention can run fused (cuDNN; nn/attention.py)."""
  n = len(example["tokens"])
  row = {k: np.full(seq_len, pad_id if k != "loss_mask" else 0, np.int32) for k in EXAMPLE_KEYS}
  for k in EXAMPLE_KEYS:
    row[k][:n] = example[k]
  row["token_mask"] = (np.arange(seq_len) < n).astype(np.int32)
  row["positions"] = np.where(row["token_mask"], np.arange(seq_len, dtype=np.int32), 0).astype(np.int32)
  return row


def _from_packed(row: dict) -> dict:
  segment_ids = row["tokens_segment_ids"]
  return {**{k: row[k] for k in EXAMPLE_KEYS}, "token_mask": (segment_ids > 0).astype(np.int32),
          "segment_ids": segment_ids, "positions": row["tokens_positions"]}


def local_rows(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ConfigError(f"train.batch_size={batch_size}: must divide by the process count {process_count}")
  return batch_size // process_count


def make_dataset(cfg: RunConfig, *, process_index: int = 0, process_count: int = 1, eval: bool = False,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """This process's batches. Training repeats forever (num_epochs=None) with a new shuffle each epoch;
  eval reads eval_source once in order, padding the last batch with empty rows."""
  rows, seq_len = local_rows(cfg.train.batch_size, process_count), cfg.train.seq_len
  tok = tokenizer.load(cfg.data.tokenizer)
  tokenizer.check_vocab(tok, cfg.model.vocab_size)
  spec = cfg.data.eval_source if eval else cfg.data.source
  if not spec:
    raise ConfigError("data.eval_source='': set it to a JSONL path or task:<name> to evaluate")
  source = make_source(spec, cfg.data, eval=eval)
  ds = grain.MapDataset.source(source).slice(slice(process_index, None, process_count))
  if not len(ds):
    raise ConfigError(f"{spec}: {len(source)} examples cannot be shared by {process_count} processes")
  # Fail before training starts: a JSONL file's every line (this process's share) is parsed and measured, so a
  # bad line deep in a large file is not found mid-run; generated tasks are uniform, their first one suffices.
  for i in range(len(ds) if isinstance(source, JsonlSource) else 1):
    encode(tok, ds[i], seq_len)
  if cfg.data.shuffle and not eval:
    ds = ds.shuffle(seed=cfg.data.seed)  # before repeat: grain reseeds each epoch (seed + epoch)
  ds = ds.repeat(1 if eval else num_epochs).map(functools.partial(encode, tok, seq_len=seq_len))
  if cfg.data.pack:
    # First-fit over `rows` bins: an example that fits no bin closes the batch, so rows never split one.
    ds = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(_IN_PROCESS), length_struct={k: seq_len for k in EXAMPLE_KEYS},
        num_packing_bins=rows, shuffle_bins=False,
        padding_struct={"tokens": tok.pad_id, "targets": tok.pad_id, "loss_mask": 0}).map(_from_packed)
  else:
    ds = ds.map(functools.partial(pad_row, seq_len=seq_len, pad_id=tok.pad_id)).to_iter_dataset(_IN_PROCESS)
  return ds.batch(rows, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=rows))


def make_iterator(cfg: RunConfig, *, process_index: int = 0, process_count: int = 1,
                  eval: bool = False) -> grain.DatasetIterator:
  """Batches of np.int32 [batch_size // process_count, seq_len] arrays (BATCH_KEYS); `get_state()` is what a
  checkpoint stores, and `set_state` resumes with exactly the batches an uninterrupted run would see."""
  return iter(make_dataset(cfg, process_index=process_index, process_count=process_count, eval=eval))


def assemble(local: dict, mesh) -> Batch:
  """A Batch of global arrays split over the batch axes, each process's rows (an iterator's dict) its slice."""
  spec = NamedSharding(mesh, sharding.spec("batch", None))
  return Batch.of({k: jax.make_array_from_process_local_data(spec, x) for k, x in local.items()})
