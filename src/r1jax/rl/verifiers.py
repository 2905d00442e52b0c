"""Answer verifiers: does a completion's final answer match a problem's reference? A verifier has the reward
signature (`fn(example, completion, info) -> float`, rl/rewards.py) and returns 1.0 or 0.0. None raises,
none executes the answer, and each runs in time linear in the completion (scans, `rfind`, and regexes without
nested repetition; numbers longer than MAX_NUMBER_CHARS are compared as strings).

Built in: `math`, `exact`, `choice`, `countdown`; a problem names one with `"verifier"`, and a user's own is
`module:function` (imported once, then registered like these). The rules are listed in docs/rl.md.
"""

from __future__ import annotations

import importlib
import re
from fractions import Fraction
from typing import Callable

from r1jax import tasks

Verifier = Callable[[tasks.Example, str, dict], float]
REGISTRY: dict[str, Verifier] = {}
MAX_NUMBER_CHARS = 200  # longer numerals (and exponents beyond MAX_EXPONENT) are compared as strings
MAX_EXPONENT = 400


def register(name: str) -> Callable[[Verifier], Verifier]:
  def add(fn: Verifier) -> Verifier:
    REGISTRY[name] = fn
    return fn

  return add


def get(name: str) -> Verifier:
  """A registered verifier, or `module:function` imported and registered under that name; ValueError names
  what is wrong in one line."""
  if name in REGISTRY:
    return REGISTRY[name]
  if ":" not in name:
    raise ValueError(f"unknown verifier {name!r}; known: {', '.join(sorted(REGISTRY))}, or module:function")
  module, _, attr = name.partition(":")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"verifier {name!r}: cannot import ({e})") from None
  if not callable(fn):
    raise ValueError(f"verifier {name!r}: {type(fn).__name__} is not callable")
  return register(name)(fn)


# ---------------------------------------------------------------------------------------------------------
# Finding the final answer.

def answer_tag(text: str) -> str | None:
  """The text inside the last `<answer>...</answer>`, or None."""
  end = text.rfind("</answer>")
  start = text.rfind("<answer>", 0, max(end, 0))
  return None if end < 0 or start < 0 else text[start + len("<answer>"):end]


def boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces nested; `\\boxed 5` form too."""
  i, j = text.rfind("\\boxed"), text.rfind("\\fbox")
  if i < 0 and j < 0:
    return None
  j = i + len("\\boxed") if i > j else j + len("\\fbox")
  while j < len(text) and text[j] == " ":
    j += 1
  if j < len(text) and text[j] == "{":
    inner = _group(text, j)
    return None if inner is None else inner[0]
  k = j
  while k < len(text) and not text[k].isspace() and text[k] != "$":
    k += 1
  return text[j:k] or None


def _group(text: str, i: int) -> tuple[str, int] | None:
  """The brace group opening at text[i] == "{": (its content, the index after its "}"), or None if unclosed."""
  depth = 0
  for k in range(i, len(text)):
    c = text[k]
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[i + 1:k], k + 1
  return None


_NUMBER = re.compile(r"[-+\u2212]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:e[-+]?\d+)?(?:/\d+)?")


def last_number(text: str) -> str | None:
  m = None
  for m in _NUMBER.finditer(text):
    pass
  return None if m is None else m.group().rstrip(",")


def final_answer(text: str) -> str | None:
  """What a math answer is read from: the last \\boxed{}, else the last <answer> tag, else the last number."""
  for found in (boxed(text), answer_tag(text)):
    if found is not None and found.strip():
      return found
  return last_number(text)


# ---------------------------------------------------------------------------------------------------------
# Normalisation and comparison.

_DROP = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "\\ ", "~",
         "\\$", "$", "\\(", "\\)", "\\[", "\\]", "^\\circ", "^{\\circ}", "\u00b0", "{,}")
_UNWRAP = ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname")
_NUMERIC = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:e([-+]?\d+))?(?:/(\d+(?:\.\d*)?|\.\d+))?")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)")


def _closing(s: str) -> dict[int, int]:
  """Index of each "{" -> the index of its "}" (unclosed ones absent), in one pass."""
  out, stack = {}, []
  for k, c in enumerate(s):
    if c == "{":
      stack.append(k)
    elif c == "}" and stack:
      out[stack.pop()] = k
  return out


def _fracs(s: str) -> str:
  """`\\frac{a}{b}` (and `\\frac12`) -> `a/b`, or `(a)/(b)` when a or b is not a plain number; one
  left-to-right pass, so a fraction inside a fraction stays LaTeX (and compares as a string)."""
  close, out, i = _closing(s), [], 0
  while (j := s.find("\\frac", i)) >= 0:
    out.append(s[i:j])
    k, parts = j + len("\\frac"), []
    while len(parts) < 2:
      while k < len(s) and s[k] == " ":
        k += 1
      if k < len(s) and s[k] == "{" and k in close:
        parts.append(s[k + 1:close[k]])
        k = close[k] + 1
      elif k < len(s) and s[k].isalnum():
        parts.append(s[k])
        k += 1
      else:
        break
    if len(parts) < 2:
      out.append(s[j:k])
    else:
      a, b = parts
      out.append(f"{a}/{b}" if _plain(a.removeprefix("-")) and _plain(b) else f"({a})/({b})")
    i = k
  out.append(s[i:])
  return "".join(out)


def _strip_braces(s: str) -> str:
  close, i, j = _closing(s), 0, len(s) - 1
  while i < j and close.get(i) == j:
    i, j = i + 1, j - 1
  return s[i:j + 1].strip()


def _plain(s: str) -> bool:
  return bool(s) and all(c.isdigit() or c == "." for c in s)


def normalize(text: str) -> tuple[str, bool]:
  """(the normalised answer, whether it was a percentage): LaTeX spacing, `$`, `\\text{}`-style wrappers and
  degree signs dropped; \\dfrac/\\tfrac/\\frac to `a/b`; unicode minus to `-`; `x = 5` to `5`; thousands
  separators removed; outer braces, parentheses around one value, and a final period stripped."""
  s = text.strip().replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  for token in _DROP:
    s = s.replace(token, "")
  for command in _UNWRAP:
    s = s.replace(command, "")
  s = _fracs(s)
  percent = "%" in s
  s = s.replace("\\%", "").replace("%", "")
  if "=" in s:
    s = s[s.rfind("=") + 1:]
  s = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), s)
  s = s.strip().rstrip(".").strip()
  s = _strip_braces(s)
  if s[:1] == "(" and s[-1:] == ")" and s.count("(") == 1 and "," not in s:  # (3), not an interval or a pair
    s = s[1:-1].strip()
  return s, percent


def to_number(s: str) -> Fraction | None:
  """The exact value of a normalised answer that is a number or fraction, optionally followed by units or
  words (`12 cm`, `3/4 of a cup`, `5 m^2`); None for anything else (an expression such as `2x+3`, a list,
  a number too long)."""
  t, negative = s.strip(), False
  if t and t[0] in "+-":
    negative, t = t[0] == "-", t[1:].lstrip()
  if t.count("/") == 1 and t.startswith("("):  # (a)/(b) from \\frac with non-plain parts
    t = t.replace("(", "").replace(")", "")
  m = _NUMERIC.match(t)
  if m is None or len(m.group()) > MAX_NUMBER_CHARS or not _units(t[m.end():].replace("{", "").replace("}", "")):
    return None
  whole, exponent, denominator = m.groups()
  if exponent is not None and (len(exponent) > 8 or abs(int(exponent)) > MAX_EXPONENT):
    return None
  value = Fraction(whole) * Fraction(10) ** int(exponent or 0)
  if denominator is not None:
    if Fraction(denominator) == 0:
      return None
    value /= Fraction(denominator)
  return -value if negative else value


def _units(rest: str) -> bool:
  """Trailing text that reads as units or words: it starts with a letter (after spaces), and holds no
  operator, bracket, comma or digit (except an exponent after ^)."""
  if not rest:
    return True
  if not rest.lstrip()[:1].isalpha():
    return False
  return not any(c in "+-*=()[]<>,|" or (c.isdigit() and rest[i - 1] != "^") for i, c in enumerate(rest))


def _loose(s: str) -> str:
  return "".join(s.split()).replace("{", "").replace("}", "").casefold()


def math_equal(answer: str, reference: str) -> bool:
  """Exact rational comparison where both parse as numbers (a percentage also matches its value / 100),
  normalised string comparison otherwise."""
  (a, a_pct), (r, r_pct) = normalize(answer), normalize(reference)
  x, y = to_number(a), to_number(r)
  if x is not None and y is not None:
    return x == y or (a_pct and not r_pct and x / 100 == y) or (r_pct and not a_pct and y / 100 == x)
  return bool(a) and _loose(a) == _loose(r)


def _reference(example: tasks.Example) -> str:
  return str(example.reference)


@register("math")
def math(example: tasks.Example, completion: str, info: dict) -> float:
  answer = final_answer(completion) if isinstance(completion, str) else None
  return float(answer is not None and math_equal(answer, _reference(example)))


def _exact_norm(s: str) -> str:
  s = " ".join(s.split()).strip().strip("$").strip()
  if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
    s = s[1:-1]
  return s.rstrip(".").strip().casefold()


@register("exact")
def exact(example: tasks.Example, completion: str, info: dict) -> float:
  """The boxed or tagged answer (else the completion's last non-empty line) equals the reference after
  collapsing whitespace, stripping quotes, `$` and a final period, and case folding."""
  if not isinstance(completion, str):
    return 0.0
  answer = boxed(completion) or answer_tag(completion)
  if answer is None:
    lines = [line for line in completion.splitlines() if line.strip()]
    answer = lines[-1] if lines else ""
  return float(bool(answer.strip()) and _exact_norm(answer) == _exact_norm(_reference(example)))


def _letters(example: tasks.Example) -> str:
  options = example.metadata.get("choices") or example.metadata.get("options")
  n = len(options) if isinstance(options, (list, tuple, dict)) and 0 < len(options) <= 26 else 10
  return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def choice_letter(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
  """The chosen option: the first standalone letter of `letters` in the boxed or tagged answer, else in the
  text after the last "answer"; `(B)`, `B.`, `B)` and `B` count, a letter inside a word does not."""
  where = boxed(text) or answer_tag(text)
  if where is None:
    k = text.casefold().rfind("answer")
    where = text[k + len("answer"):] if k >= 0 else text
  prev, alone = " ", len(where.strip()) == 1  # a lone lowercase letter counts too
  for i, c in enumerate(where):
    nxt = where[i + 1] if i + 1 < len(where) else " "
    if c.upper() in letters and not prev.isalnum() and not nxt.isalnum() and (c.isupper() or alone):
      return c.upper()
    prev = c
  return None


@register("choice")
def choice(example: tasks.Example, completion: str, info: dict) -> float:
  if not isinstance(completion, str):
    return 0.0
  ref = _reference(example).strip().strip("()").strip().upper()
  return float(choice_letter(completion, _letters(example)) == ref)


@register("countdown")
def countdown(example: tasks.Example, completion: str, info: dict) -> float:
  """The expression in the answer tag (or box) uses only the given numbers, each at most once, and + - * /,
  and equals the target (tasks.countdown_value's checker: parsed, never evaluated by Python)."""
  if not isinstance(completion, str):
    return 0.0
  expr = answer_tag(completion) or boxed(completion)
  numbers, target = example.metadata.get("numbers"), example.metadata.get("target", example.reference)
  if expr is None or not isinstance(numbers, (list, tuple)):
    return 0.0
  target = to_number(normalize(str(target))[0])
  return float(target is not None and tasks.countdown_value(expr, numbers) == target)


@register("task")
def task(example: tasks.Example, completion: str, info: dict) -> float:
  """A tasks.py problem: its own checker on the last <answer>."""
  answer = answer_tag(completion) if isinstance(completion, str) else None
  return float(answer is not None and tasks.check(example, answer))
