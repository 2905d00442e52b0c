"""Tokenizers with one small interface: a built-in byte-level one (no files, the default for tests and the
CPU demo) and a wrapper of a `tokenizers` JSON file or of a Hugging Face tokenizer directory (tokenizer.json,
tokenizer_config.json: its special tokens and chat template; generation_config.json: its stop ids). Prompts
become ids with `prompt_ids` (BOS where the tokenizer adds one) and conversations text with `render_chat`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol, Sequence

from r1jax import chat_template
from r1jax.config import ConfigError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
# Ids 256.. of the byte tokenizer, in this order (so a checkpoint's embedding rows keep their meaning).
SPECIALS = (PAD, BOS, EOS, *(f"<|{r}|>" for r in ROLES), THINK, END_THINK, ANSWER, END_ANSWER)


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int | None  # None: the tokenizer has no BOS (e.g. Qwen2)
  eos_id: int  # what SFT appends to a completion
  eos_ids: tuple[int, ...]  # every id that ends sampling (eos_id first)
  add_bos: bool  # prompts start with BOS (prompt_ids)
  chat_template: str | None

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
    self.eos_ids, self.add_bos, self.chat_template = (self.eos_id,), True, None

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
  (padding never enters the loss, so any id works). `from_dir` reads a Hugging Face tokenizer directory."""

  def __init__(self, path: str | Path, *, bos: str | None = None, eos: str | None = None, pad: str | None = None,
               bos_optional: bool = False, add_bos: bool | None = None, extra_eos_ids: Sequence[int] = (),
               template: str | None = None, special_tokens: dict | None = None):
    import tokenizers  # only users of tokenizer files pay for the import

    self.path = str(path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # tokenizers raises plain Exceptions with multi-line messages
      raise ConfigError(f"{self.path}: cannot load as a `tokenizers` JSON file ({str(e).splitlines()[0]})") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = None if bos_optional and bos is None else self._find("bos", bos)
    self.eos_id = self._find("eos", eos)
    self.pad_id = self._find("pad", pad, fallback=self.eos_id)
    self.eos_ids = tuple(dict.fromkeys([self.eos_id, *map(int, extra_eos_ids)]))
    if add_bos is None:  # as `tokenizer(text)` would: the file's post-processor decides
      add_bos = self.bos_id is not None and self._tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
    self.add_bos = bool(add_bos) and self.bos_id is not None
    self.chat_template, self.special_tokens = template, special_tokens or {}

  @classmethod
  def from_dir(cls, model_dir: str | Path) -> "HFTokenizer":
    """tokenizer.json with tokenizer_config.json's bos/eos/pad tokens and chat template, and
    generation_config.json's eos_token_id(s) as further stop ids. Whether a plain prompt starts with BOS is
    tokenizer.json's post-processor's choice, as for `tokenizer(text)` in transformers."""
    d = Path(model_dir)
    if not (d / "tokenizer.json").is_file():
      raise ConfigError(f"data.tokenizer={model_dir}: no tokenizer.json in this directory (a Hugging Face fast "
                        "tokenizer saves one; a slow-only tokenizer must be converted first)")
    config = _read_json(d / "tokenizer_config.json")
    names = {k: _token_text(config.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}
    if names["eos"] is None:
      raise ConfigError(f"{d / 'tokenizer_config.json'}: no eos_token; generation could never stop")
    stops = _read_json(d / "generation_config.json").get("eos_token_id") or []
    stops = [stops] if isinstance(stops, int) else stops
    specials = {f"{k}_token": v for k, v in names.items() if v is not None}
    return cls(d / "tokenizer.json", bos=names["bos"], eos=names["eos"], pad=names["pad"], bos_optional=True,
               extra_eos_ids=stops,
               template=chat_template.find(d, config), special_tokens=specials)

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


def _read_json(path: Path) -> dict:
  if not path.is_file():
    return {}
  try:
    out = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: invalid JSON ({str(e).splitlines()[0]})") from None
  if not isinstance(out, dict):
    raise ConfigError(f"{path}: expected a JSON object")
  return out


def _token_text(value) -> str | None:
  """A tokenizer config's special token: a string, or an AddedToken as {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def load(spec: str) -> ByteTokenizer | HFTokenizer:
  """`data.tokenizer`: "bytes", a `tokenizers` JSON file, or a Hugging Face tokenizer directory (an
  `r1jax import-hf` checkpoint holds one)."""
  if spec == "bytes":
    return ByteTokenizer()
  if Path(spec).is_dir():
    return HFTokenizer.from_dir(spec)
  if not Path(spec).is_file():
    raise ConfigError(f"data.tokenizer={spec!r}: not 'bytes' and no such file or directory")
  return HFTokenizer(spec, add_bos=True)


def prompt_ids(tok, text: str) -> list[int]:
  """A prompt's ids: BOS first where the tokenizer adds one (unless the text, e.g. a rendered chat template,
  already starts with it)."""
  ids = tok.encode(text)
  return [tok.bos_id, *ids] if tok.add_bos and ids[:1] != [tok.bos_id] else ids


def completion_text(tok, ids: Sequence[int]) -> str:
  """Generated ids as text, stop ids left out."""
  return tok.decode([i for i in ids if i not in tok.eos_ids])


def finished(tok, ids: Sequence[int]) -> bool:
  """Whether a completion ended with a stop id (rather than at the token budget)."""
  return bool(ids) and ids[-1] in tok.eos_ids


def render_chat(tok, messages: Sequence[dict], where: str = "messages") -> str:
  """A conversation (ending with the user's turn) as the prompt the model was trained to see: the
  tokenizer's chat template with the generation prompt; for the byte tokenizer `<|role|>content` turns."""
  if tok.chat_template is None:
    if isinstance(tok, ByteTokenizer):
      return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"
    raise ConfigError(f"{where}: tokenizer {getattr(tok, 'path', '')} has no chat_template to render messages")
  return chat_template.render(tok.chat_template, list(messages), tok.special_tokens, where=where)


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
