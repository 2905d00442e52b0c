"""RL problems from a JSONL file (`data.problems`), one per line:

  {"prompt": "Tom has 3 apples and buys 4 more. How many?", "answer": 7}
  {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "answer": "1/2"}

plus optional "verifier" (rl/verifiers.py; default grpo.verifier), "id", and any other keys, kept as the
problem's metadata (a countdown problem's "numbers", a multiple-choice problem's "choices"). A "prompt" goes
through data.template; "messages" (ending with the user's turn) through the tokenizer's chat template. Every
line is checked when the file is read, before anything compiles: a bad one is a `file:line: reason` error, or
with data.skip_bad_problems it is left out, counted and reported. Eval problems are data.eval_problems, or
the share data.eval_share of the file chosen by a hash of each problem's id (else its prompt)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from r1jax import tasks, tokenizer
from r1jax.config import ConfigError, RunConfig
from r1jax.data import DataError
from r1jax.rl import verifiers

KEYS = ("prompt", "messages", "answer", "verifier", "id")
_CACHE: dict[tuple, dict[str, list[tasks.Example]]] = {}


def _answer(value) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise ValueError(f"'answer' must be a string or a number, got {type(value).__name__}")
  if isinstance(value, float) and not math.isfinite(value):
    raise ValueError(f"'answer' is {value}")
  if isinstance(value, str) and not value.strip():
    raise ValueError("'answer' is empty")
  return str(value)


def _messages(value, tok) -> list[dict]:
  if not isinstance(value, list) or not value:
    raise ValueError("'messages' must be a non-empty list")
  for j, m in enumerate(value):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"messages[{j}] must be an object with string 'role' and 'content'")
    if tok.chat_template is None and m["role"] not in tokenizer.ROLES:
      raise ValueError(f"messages[{j}].role={m['role']!r}; the byte tokenizer knows {list(tokenizer.ROLES)}")
  if value[-1]["role"] != "user":
    raise ValueError(f"the last message must be the user's (the model answers it), got {value[-1]['role']!r}")
  return value


def parse_line(raw: bytes, where: str, tok, template: str, default_verifier: str) -> tasks.Example:
  """One line as a problem, its prompt rendered; ValueError says what is wrong (without `where`)."""
  try:
    obj = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"not UTF-8 (byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  if ("prompt" in obj) == ("messages" in obj):
    raise ValueError(f"needs exactly one of 'prompt' or 'messages'; got keys {sorted(obj)}")
  if "answer" not in obj:
    raise ValueError(f"no 'answer'; got keys {sorted(obj)}")
  answer = _answer(obj["answer"])
  name = obj.get("verifier", default_verifier)
  if not isinstance(name, str):
    raise ValueError(f"'verifier' must be a string, got {type(name).__name__}")
  verifiers.get(name)  # unknown names and failed imports are this line's error
  pid = obj.get("id")
  if pid is not None and (isinstance(pid, bool) or not isinstance(pid, (str, int))):
    raise ValueError(f"'id' must be a string or an integer, got {type(pid).__name__}")
  if "messages" in obj:
    messages = _messages(obj["messages"], tok)
    question, prompt = messages[-1]["content"], tokenizer.render_chat(tok, messages, where=where)
  else:
    question = obj["prompt"]
    if not isinstance(question, str) or not question.strip():
      raise ValueError("'prompt' must be a non-empty string")
    prompt = (tokenizer.render_chat(tok, [{"role": "user", "content": question}], where=where)
              if template == "chat" else tasks.TEMPLATES[template].format(question=question))
  metadata = {k: v for k, v in obj.items() if k not in KEYS}
  key = str(pid) if pid is not None else json.dumps(obj.get("messages", question), sort_keys=True)
  metadata.update(verifier=name, id=pid, where=where, split_key=key)
  return tasks.Example("problems", question, prompt, answer, metadata)


def in_eval(key: str, share: float) -> bool:
  """A problem's split is a hash of its id (else its prompt): stable under reordering and appending."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < share * 2**64


def read(path: str, tok, cfg: RunConfig) -> tuple[list[tasks.Example], list[str]]:
  """Every problem of a file and the errors of the lines left out (empty unless data.skip_bad_problems)."""
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: no such problems file")
  out, skipped, ids = [], [], {}
  max_prompt = min(cfg.model.max_seq_len - 1, cfg.train.seq_len + 1) - cfg.sampler.max_new_tokens
  with open(path, "rb") as f:
    for i, raw in enumerate(f, 1):
      where = f"{path}:{i}"
      try:
        if not raw.strip():
          raise ValueError("empty line; JSONL needs one JSON object per line")
        ex = parse_line(raw.rstrip(b"\r\n"), where, tok, cfg.data.template, cfg.grpo.verifier)
        n = len(tokenizer.prompt_ids(tok, ex.prompt))
        if n > max_prompt:
          raise ValueError(f"the prompt is {n} tokens; with sampler.max_new_tokens={cfg.sampler.max_new_tokens} "
                           f"at most {max_prompt} fit (train.seq_len={cfg.train.seq_len}, "
                           f"model.max_seq_len={cfg.model.max_seq_len})")
        if ex.metadata["id"] is not None:
          if (first := ids.setdefault(ex.metadata["id"], i)) != i:
            raise ValueError(f"duplicate id {ex.metadata['id']!r} (first on line {first})")
      except ValueError as e:
        if not cfg.data.skip_bad_problems:
          raise DataError(f"{where}: {e}") from None
        skipped.append(f"{where}: {e}")
        continue
      out.append(ex)
  if not out:
    raise ConfigError(f"{path}: no problems" + (f" ({len(skipped)} lines skipped)" if skipped else ""))
  return out, skipped


def load(cfg: RunConfig) -> dict[str, list[tasks.Example]]:
  """{"train": [...], "eval": [...]} of data.problems (and data.eval_problems), read once per process."""
  d = cfg.data
  stamp = tuple((p, os.stat(p).st_mtime_ns) if os.path.isfile(p) else (p, None) for p in (d.problems, d.eval_problems))
  key = (stamp, d.template, d.tokenizer, d.eval_share, d.skip_bad_problems, cfg.grpo.verifier,
         cfg.train.seq_len, cfg.model.max_seq_len, cfg.sampler.max_new_tokens)
  if key in _CACHE:
    return _CACHE[key]
  tok = tokenizer.load(d.tokenizer)
  problems, skipped = read(d.problems, tok, cfg)
  if d.eval_problems:
    held_out, more = read(d.eval_problems, tok, cfg)
    skipped += more
    split = {"train": problems, "eval": held_out}
  else:
    split = {"train": [], "eval": []}
    for ex in problems:
      split["eval" if in_eval(ex.metadata["split_key"], d.eval_share) else "train"].append(ex)
  if skipped:
    print(f"data.skip_bad_problems: left out {len(skipped)} malformed problem lines; the first: {skipped[0]}",
          flush=True)
  if not split["train"]:
    raise ConfigError(f"data.problems={d.problems}: every problem fell in the eval split; lower data.eval_share")
  _CACHE[key] = split
  return split


def examples(cfg: RunConfig, split: str, n: int) -> list[tasks.Example]:
  """The first n problems of a split (all of them when it holds fewer)."""
  out = load(cfg)[split][:n]
  if not out:
    raise ConfigError(f"data.problems={cfg.data.problems}: no {split} problems; set data.eval_problems or raise "
                      "data.eval_share")
  return out


def describe(cfg: RunConfig) -> str:
  split = load(cfg)
  return f"{Path(cfg.data.problems).name}: {len(split['train'])} train and {len(split['eval'])} eval problems"
