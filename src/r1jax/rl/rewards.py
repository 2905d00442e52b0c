"""Rule-based rewards for GRPO (DeepSeek-R1 sec. 2.2.2: accuracy and format rewards, no reward model), plus
DAPO's overlong shaping. A reward is `fn(example, completion, info) -> float`, registered by name; a spec such
as "accuracy:1.0,format:0.1" picks them and their weights. `info` holds n_tokens, max_tokens, truncated and,
for `overlong`, overlong_buffer.
"""

from __future__ import annotations

import math
from typing import Callable

from r1jax import tasks
from r1jax.config import GRPOConfig, weighted_names
from r1jax.rl import verifiers

Reward = Callable[[tasks.Example, str, dict], float]
REGISTRY: dict[str, Reward] = {}
RESERVED = ("total", "errors")  # keys of `score`'s result that are not rewards
DEFAULT_SPEC = GRPOConfig().rewards
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def register(name: str) -> Callable[[Reward], Reward]:
  """Decorator adding `fn` to REGISTRY under `name` (replacing any earlier one)."""
  if not isinstance(name, str) or not name or any(c in name for c in ":, ") or name in RESERVED:
    raise ValueError(f"reward name {name!r} must be non-empty, without ':', ',' or spaces, and not one of "
                     f"{', '.join(RESERVED)}")

  def add(fn: Reward) -> Reward:
    REGISTRY[name] = fn
    return fn

  return add


def extract_answer(text: str) -> str | None:
  """The text inside the last `<answer>...</answer>`, or None."""
  return verifiers.answer_tag(text) if isinstance(text, str) else None


@register("accuracy")
def accuracy(example: tasks.Example, completion: str, info: dict) -> float:
  """The problem's verifier (`verifier` of a problem file's record, rl/verifiers.py); a tasks.py problem's
  own checker on the last <answer>. 1.0 or 0.0."""
  return float(verifiers.get(example.metadata.get("verifier", "task"))(example, completion, info))


@register("format")
def format_(example: tasks.Example, completion: str, info: dict) -> float:
  """1.0 iff the completion is `<think>..</think>`, whitespace, `<answer>..</answer>`, whitespace, with no
  other tags inside; linear scans (no regex), so any length is cheap."""
  if not isinstance(completion, str) or not completion.startswith("<think>"):
    return 0.0
  think_end = completion.find("</think>")
  rest = completion[think_end + len("</think>"):].lstrip() if think_end >= 0 else ""
  if not rest.startswith("<answer>"):
    return 0.0
  answer_end = rest.find("</answer>")
  if answer_end < 0 or rest[answer_end + len("</answer>"):].strip():
    return 0.0
  inner = (completion[len("<think>"):think_end], rest[len("<answer>"):answer_end])
  return float(not any(tag in part for part in inner for tag in TAGS))


def _number(info, key: str) -> float | None:
  value = info.get(key) if isinstance(info, dict) else None
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  return float(value) if ok else None


@register("overlong")
def overlong(example: tasks.Example, completion: str, info: dict) -> float:
  """DAPO (arXiv 2503.14476) eq. 13: 0 up to max - buffer tokens, then a linear ramp to -1 at max, -1 beyond.
  0.0 when info has no positive `overlong_buffer` or lacks n_tokens/max_tokens."""
  n, top, buffer = (_number(info, k) for k in ("n_tokens", "max_tokens", "overlong_buffer"))
  if n is None or top is None or buffer is None or buffer <= 0:
    return 0.0
  if n <= top - buffer:
    return 0.0
  return ((top - buffer) - n) / buffer if n <= top else -1.0


# R1 §2.3.3's language-consistency reward: the share of the reasoning's words in the target language, told
# apart by script (no downloads). Languages name their script; a CJK character counts as one word.
SCRIPTS = {"latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x24F), (0x1E00, 0x1EFF)),
           "cyrillic": ((0x400, 0x52F),), "greek": ((0x370, 0x3FF), (0x1F00, 0x1FFF)),
           "arabic": ((0x600, 0x6FF), (0x750, 0x77F)), "hebrew": ((0x590, 0x5FF),),
           "devanagari": ((0x900, 0x97F),),
           "cjk": ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF))}
LANGUAGES = {"en": "latin", "fr": "latin", "de": "latin", "es": "latin", "it": "latin", "pt": "latin",
             "ru": "cyrillic", "uk": "cyrillic", "el": "greek", "ar": "arabic", "he": "hebrew", "hi": "devanagari",
             "zh": "cjk", "ja": "cjk", "ko": "cjk"}


def script_of(c: str) -> str | None:
  o = ord(c)
  for name, ranges in SCRIPTS.items():
    if any(lo <= o <= hi for lo, hi in ranges):
      return name
  return "other" if c.isalpha() else None


def language_share(text: str, target: str) -> float:
  """Words of `text` in the target script over all its words (0.0 with no words): a word is a run of letters
  of one script, and each CJK character is a word of its own."""
  target = LANGUAGES.get(target, target)
  words = hits = 0
  prev = None
  for c in text:
    s = script_of(c)
    if s is not None and (s != prev or s == "cjk"):
      words += 1
      hits += s == target
    prev = s
  return hits / words if words else 0.0


@register("language")
def language(example: tasks.Example, completion: str, info: dict) -> float:
  """The share of the reasoning's words (inside <think>..</think>, else the whole completion) in
  `grpo.language` (info["language"]; a script name or a language code such as en, zh, ru)."""
  if not isinstance(completion, str):
    return 0.0
  start, end = completion.find("<think>"), completion.find("</think>")
  reasoning = completion[start + len("<think>"):end] if 0 <= start < end else completion
  return language_share(reasoning, (info or {}).get("language", "latin"))


def parse(spec) -> list[tuple[str, float]]:
  """grpo.rewards ((name, weight) pairs, or their text "name:weight,..." as config.weighted_names reads it) ->
  [(name, weight)], every name checked against REGISTRY (which a user may extend after the config loads)."""
  pairs = weighted_names("grpo.rewards", spec) if isinstance(spec, str) else spec
  for name, _ in pairs:
    if name not in REGISTRY:
      raise ValueError(f"grpo.rewards: unknown reward {name!r}; known: {', '.join(sorted(REGISTRY))}")
  return list(pairs)


def score(example: tasks.Example, completion: str, info: dict | None = None,
          spec=DEFAULT_SPEC) -> dict:
  """{name: value for each reward in spec, "total": weighted sum, "errors": how many rewards failed}.

  Never raises for any completion: a reward that raises or returns a non-finite or non-number counts 0.0 and
  adds 1 to "errors" (a float, so every value can be logged as a metric). Only a bad spec raises.
  """
  pairs = parse(spec) if isinstance(spec, str) else spec
  info = {} if info is None else info
  out, total, errors = {}, 0.0, 0
  for name, weight in pairs:
    try:
      value = float(REGISTRY[name](example, completion, info))
      if not math.isfinite(value):
        raise ValueError(f"reward {name} returned {value}")
    except Exception:
      value, errors = 0.0, errors + 1
    out[name] = value
    total += weight * value
  out["total"] = total
  out["errors"] = float(errors)
  return out
