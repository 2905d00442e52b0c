"""Tokenizers with one small interface: a built-in byte-level one (no files, the default for tests and the
CPU demo) and a wrapper of a `tokenizers` JSON file. Both read the chat/R1 marker strings as single ids."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, Sequence

from r1jax.config import ConfigError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
# Ids 256.. of the byte tokenizer, in this order (so a checkpoint's embedding rows keep their meaning).
SPECIALS = (PAD, BOS, EOS, *(f"<|{r}|>" for r in ROLES), THINK, END_THINK, ANSWER, END_ANSWER)


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def token_id(self, token: str) -> int: ...


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255 and SPECIALS follow: any text round-trips, and nothing needs downloading."""

  def __init__(self):
    self._special_ids = {s: 256 + i for i, s in enumerate(SPECIALS)}
    self._split = re.compile("(" + "|".join(map(re.escape, SPECIALS)) + ")")
    self._bytes = [bytes([i]) for i in range(256)] + [s.encode() for s in SPECIALS]
    self.vocab_size = len(self._bytes)
    self.pad_id, self.bos_id, self.eos_id = (self._special_ids[s] for s in (PAD, BOS, EOS))

  def encode(self, text: str) -> list[int]:
    ids: list[int] = []
    for i, part in enumerate(self._split.split(text)):  # odd parts are the captured special strings
      ids.extend([self._special_ids[part]] if i % 2 else part.encode())
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Never raises: invalid UTF-8 and unknown ids become U+FFFD."""
    n, bad = self.vocab_size, "\ufffd".encode()
    return b"".join(self._bytes[i] if 0 <= i < n else bad for i in map(int, ids)).decode("utf-8", "replace")

  def token_id(self, token: str) -> int:
    if token not in self._special_ids:
      raise KeyError(f"{token!r} is not a special token of the byte tokenizer; known: {list(SPECIALS)}")
    return self._special_ids[token]


# Names tokenizer files commonly give their specials, first match wins (Llama 3, DeepSeek, GPT-2, T5, BERT).
_COMMON = {
    "bos": (BOS, "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<s>", "<bos>", "[BOS]", "[CLS]"),
    "eos": (EOS, "<|end_of_text|>", "<｜end▁of▁sentence｜>", "</s>", "<eos>", "[EOS]", "<|endoftext|>", "[SEP]"),
    "pad": (PAD, "<|finetune_right_pad_id|>", "<｜▁pad▁｜>", "<pad>", "[PAD]"),
}


class HFTokenizer:
  """A `tokenizers` JSON file. pad/bos/eos are found by common names unless given; pad falls back to eos
  (padding never enters the loss, so any id works)."""

  def __init__(self, path: str | Path, *, bos: str | None = None, eos: str | None = None, pad: str | None = None):
    import tokenizers  # only users of tokenizer files pay for the import

    self.path = str(path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # tokenizers raises plain Exceptions with multi-line messages
      raise ConfigError(f"{self.path}: cannot load as a `tokenizers` JSON file ({str(e).splitlines()[0]})") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._find("bos", bos)
    self.eos_id = self._find("eos", eos)
    self.pad_id = self._find("pad", pad, fallback=self.eos_id)

  def _find(self, kind: str, given: str | None, fallback: int | None = None) -> int:
    names = (given,) if given else _COMMON[kind]
    for name in names:
      if (i := self._tok.token_to_id(name)) is not None:
        return i
    if fallback is not None and not given:
      return fallback
    raise ConfigError(f"{self.path}: no {kind} token; looked for {list(names)}")

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """Never raises: ids outside the vocabulary become U+FFFD."""
    n = self.vocab_size
    ids = [int(i) for i in ids]
    if all(0 <= i < n for i in ids):
      return self._tok.decode(ids, skip_special_tokens=False)
    out, run = [], []
    for i in ids + [-1]:  # decode valid runs, so byte-level merges inside a run still join
      if 0 <= i < n:
        run.append(i)
        continue
      out.append(self._tok.decode(run, skip_special_tokens=False) if run else "")
      run = []
      out.append("\ufffd")
    return "".join(out[:-1])

  def token_id(self, token: str) -> int:
    if (i := self._tok.token_to_id(token)) is None:
      raise KeyError(f"{self.path}: no token {token!r}")
    return i


def load(spec: str) -> ByteTokenizer | HFTokenizer:
  """`data.tokenizer`: "bytes" or the path of a `tokenizers` JSON file."""
  if spec == "bytes":
    return ByteTokenizer()
  if not Path(spec).is_file():
    raise ConfigError(f"data.tokenizer={spec!r}: not 'bytes' and no such file")
  return HFTokenizer(spec)


def check_vocab(tok, vocab_size: int):
  """Every id the tokenizer can emit must have an embedding row."""
  if tok.vocab_size > vocab_size:
    name = getattr(tok, "path", "bytes")
    raise ConfigError(f"model.vocab_size={vocab_size}: tokenizer {name} has {tok.vocab_size} ids; raise the vocab")


def chat_prompt(messages: Sequence[dict]) -> tuple[str, str]:
  """`<|role|>content` turns; the last (assistant) turn is the completion, the prompt ends with its marker."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError("messages must be a non-empty list")
  for j, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"messages[{j}] must be an object with string 'role' and 'content'")
    if m["role"] not in ROLES:
      raise ValueError(f"messages[{j}].role={m['role']!r}; known: {list(ROLES)}")
  if messages[-1]["role"] != "assistant":
    raise ValueError(f"the last message must be the assistant's, got role {messages[-1]['role']!r}")
  prompt = "".join(f"<|{m['role']}|>{m['content']}" for m in messages[:-1]) + "<|assistant|>"
  return prompt, messages[-1]["content"]
