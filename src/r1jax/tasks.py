"""Verifiable tasks generated on the fly (no downloads), the R1-Zero recipe's rule-checked problems
(DeepSeek-R1 paper sec. 2.2.2: accuracy is checked by rules, not a learned reward model).

`make` returns text `Example`s: countdown, arith, copy, reverse, sort; train and eval are disjoint because
each instance's split is a hash of its canonical form. Used by SFT data (data.py) and by RL (rl/).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import zlib
from collections import Counter
from fractions import Fraction
from typing import Callable

import numpy as np

def digit_answer(task: str, digits: np.ndarray) -> np.ndarray:
  if task == "copy":
    return digits
  if task == "reverse":
    return digits[::-1]
  if task == "sort":
    return np.sort(digits)
  raise ValueError(f"unknown digit task {task!r}; known: copy, reverse, sort")


# ---------------------------------------------------------------------------------------------------------
# Text examples for RL.

@dataclasses.dataclass(frozen=True)
class Example:
  """One problem: `prompt` is the full model input (the question inside a template)."""
  task: str
  question: str
  prompt: str
  reference: str
  metadata: dict = dataclasses.field(default_factory=dict, hash=False)


# Our wording of the R1-Zero template (R1 paper table 1); the model continues after "Assistant:".
R1ZERO = ("A dialogue between a User and an Assistant. The User poses a problem and the Assistant solves it: "
          "it first reasons privately, then replies. The reasoning goes inside <think> </think> tags and the "
          "final reply inside <answer> </answer> tags, like <think> reasoning </think> <answer> reply "
          "</answer>.\nUser: {question}\nAssistant:")
# short: compact questions for tiny byte-level models; raw: the question as written
TEMPLATES = {"short": "{question}\n", "r1zero": R1ZERO, "raw": "{question}"}
SPLITS = ("train", "eval")
EVAL_SHARE = 4  # one canonical instance in EVAL_SHARE belongs to eval
MAX_EXPR_CHARS = 200
_MAX_MISSES = 5000  # consecutive draws that add nothing before the task space counts as exhausted


@dataclasses.dataclass(frozen=True)
class _Task:
  draw: Callable[[np.random.Generator, dict], dict]  # (rng, difficulty) -> metadata
  ask: Callable[[dict, bool], str]  # (metadata, verbose) -> question
  reference: Callable[[dict], str]
  canonical: Callable[[dict], str]  # one string per distinct problem (order-free where the task is)
  trace: Callable[[dict], str]  # cold-start reasoning
  defaults: dict


# countdown ----------------------------------------------------------------------------------------------

def _countdown_draw(rng: np.random.Generator, d: dict) -> dict:
  """k numbers in [1, max_number] combined by a random expression; every intermediate is a positive int.

  A target equal to one of the numbers (with k > 1) is redrawn: answering with that number alone would pass.
  """
  for _ in range(100):
    m = _countdown_expression(rng, [int(x) for x in rng.integers(1, d["max_number"] + 1, d["n_numbers"])])
    if len(m["numbers"]) == 1 or m["target"] not in m["numbers"]:
      break
  return m


def _countdown_expression(rng: np.random.Generator, numbers: list[int]) -> dict:
  """Combines two random nodes with a random op allowed for them until one expression is left."""
  nodes = [(x, str(x), True) for x in numbers]  # (value, text, is_leaf)
  while len(nodes) > 1:
    i, j = (int(t) for t in rng.choice(len(nodes), 2, replace=False))
    (a, ta, la), (b, tb, lb) = nodes[i], nodes[j]
    ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if a % b == 0 else [])
    op = ops[int(rng.integers(len(ops)))]
    value = a + b if op == "+" else a * b if op == "*" else a - b if op == "-" else a // b
    text = f"{ta if la else f'({ta})'}{op}{tb if lb else f'({tb})'}"
    nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [(value, text, False)]
  return {"numbers": numbers, "target": nodes[0][0], "solution": nodes[0][1]}


def _countdown_ask(m: dict, verbose: bool) -> str:
  nums = " ".join(map(str, m["numbers"]))
  if not verbose:
    return f"countdown {nums} -> {m['target']}"
  return (f"Using the numbers {', '.join(map(str, m['numbers']))}, each at most once, with + - * / and "
          f"parentheses, write an expression equal to {m['target']}. Answer with the expression only.")


def countdown_value(expr: str, numbers) -> Fraction | None:
  """Exact value of `expr` if it is +-*/ and parentheses over `numbers`, each used at most once; else None.

  Never evaluates code: the text is parsed and only BinOp(Add/Sub/Mult/Div) over int constants is accepted;
  unary +/- is rejected (so `-3` cannot smuggle in a number that was not given), as is text over
  MAX_EXPR_CHARS characters.
  """
  if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS or set(expr) - set("0123456789+-*/() \t\n"):
    return None
  try:
    tree = ast.parse(expr.strip(), mode="eval")
    return _eval(tree.body, Counter(int(x) for x in numbers))
  except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError, ZeroDivisionError):
    return None


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}  # a / b on Fractions; b == 0 raises ZeroDivisionError -> None


def _eval(node: ast.AST, left: Counter) -> Fraction | None:
  """Evaluates `node`, consuming the constants it uses from the multiset `left`."""
  if isinstance(node, ast.Constant):
    if type(node.value) is not int or left[node.value] <= 0:  # bools, floats, strings, unknown/reused numbers
      return None
    left[node.value] -= 1
    return Fraction(node.value)
  if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
    a = _eval(node.left, left)
    b = None if a is None else _eval(node.right, left)
    return None if b is None else _OPS[type(node.op)](a, b)
  return None


# arith --------------------------------------------------------------------------------------------------

def _number(rng: np.random.Generator, digits: int) -> int:
  """Uniform over numbers with exactly `digits` digits (0-9 for one digit); any length, no int64 limit."""
  first = int(rng.integers(0 if digits == 1 else 1, 10))
  return int(str(first) + "".join(map(str, rng.integers(0, 10, digits - 1))))


def _arith_draw(rng: np.random.Generator, d: dict) -> dict:
  a, b = _number(rng, d["digits"]), _number(rng, d["digits"])
  m = {"a": a, "b": b, "op": d["op"]}
  m["trace"] = _add_trace(a, b) if d["op"] == "+" else _mul_trace(a, b)
  return m


def _add_trace(a: int, b: int) -> str:
  """Column addition from the right: `x+y+carry=sum` per column (the written digit is sum % 10)."""
  xs, ys = str(a)[::-1], str(b)[::-1]
  steps, carry = [], 0
  for k in range(max(len(xs), len(ys))):
    x, y = int(xs[k]) if k < len(xs) else 0, int(ys[k]) if k < len(ys) else 0
    s = x + y + carry
    steps.append(f"{x}+{y}+{carry}={s}")
    carry = s // 10
  return "; ".join(steps) + (f"; carry {carry}" if carry else "") + f"; so {a + b}"


def _mul_trace(a: int, b: int) -> str:
  """Long multiplication: one partial product per digit of b, then their sum."""
  parts = [a * int(y) * 10 ** k for k, y in enumerate(str(b)[::-1])]
  steps = [f"{a}*{int(y) * 10 ** k}={p}" for k, (y, p) in enumerate(zip(str(b)[::-1], parts))]
  return "; ".join(steps) + f"; {'+'.join(map(str, parts))}={a * b}"


def _arith_reference(m: dict) -> str:
  return str(m["a"] + m["b"] if m["op"] == "+" else m["a"] * m["b"])


# copy / reverse / sort ----------------------------------------------------------------------------------

def _digits_task(name: str, verbose_question: str) -> _Task:
  def reference(m):
    return "".join(map(str, digit_answer(name, np.array([int(c) for c in m["digits"]]))))

  def trace(m):
    if name == "sort":
      return " ".join(f"{c}x{k}" for c, k in sorted(Counter(m["digits"]).items()))
    return " ".join(reference(m))

  return _Task(
      draw=lambda rng, d: {"digits": "".join(map(str, rng.integers(0, 10, d["digits"])))},
      ask=lambda m, verbose: verbose_question.format(m["digits"]) if verbose else f"{name} {m['digits']}",
      reference=reference, canonical=lambda m: f"{name}:{m['digits']}", trace=trace, defaults={"digits": 6})


TASKS = {
    "countdown": _Task(
        draw=_countdown_draw, ask=_countdown_ask, reference=lambda m: str(m["target"]),
        canonical=lambda m: f"countdown:{sorted(m['numbers'])}->{m['target']}",
        trace=lambda m: f"{m['solution']}={m['target']}",
        defaults={"n_numbers": 3, "max_number": 20}),
    "arith": _Task(
        draw=_arith_draw, reference=_arith_reference, trace=lambda m: m["trace"],
        ask=lambda m, verbose: (f"What is {m['a']} {m['op']} {m['b']}?" if verbose
                                else f"{m['a']}{m['op']}{m['b']}"),
        canonical=lambda m: f"arith:{min(m['a'], m['b'])}{m['op']}{max(m['a'], m['b'])}",
        defaults={"digits": 3, "op": "+"}),
    "copy": _digits_task("copy", "Repeat the digit string {} exactly."),
    "reverse": _digits_task("reverse", "Write the digit string {} backwards."),
    "sort": _digits_task("sort", "Sort the digits of {} in ascending order."),
}


def _difficulty(task: str, given: dict) -> dict:
  """Defaults overridden by `given`, validated once with a one-line message."""
  known = TASKS[task].defaults
  if unknown := sorted(set(given) - set(known)):
    raise ValueError(f"{task}: unknown difficulty knob {unknown[0]!r}; known: {', '.join(sorted(known))}")
  d = {**known, **given}
  for k in ("n_numbers", "max_number", "digits"):
    if k in d and (type(d[k]) is not int or not 1 <= d[k] <= 1000):
      raise ValueError(f"{task}: {k}={d[k]!r} must be an int in [1, 1000]")
  if "op" in d and d["op"] not in ("+", "*"):
    raise ValueError(f"arith: op={d['op']!r}; known: +, *")
  return d


def split_of(canonical_form: str) -> str:
  """A stable hash of the canonical form decides the split, so train and eval never share a problem."""
  h = int.from_bytes(hashlib.blake2b(canonical_form.encode(), digest_size=8).digest(), "big")
  return "eval" if h % EVAL_SHARE == 0 else "train"


def canonical(example: Example) -> str:
  return TASKS[example.task].canonical(example.metadata)


def make(task: str, n: int, seed: int = 0, split: str = "train", template: str = "short",
         **difficulty) -> list[Example]:
  """n distinct examples of `task` in `split`, a pure function of (task, n, seed, split, difficulty)."""
  for what, value, known in (("task", task, TASKS), ("split", split, SPLITS), ("template", template, TEMPLATES)):
    if value not in known:
      raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")
  spec, d = TASKS[task], _difficulty(task, difficulty)
  rng = np.random.default_rng([seed, zlib.crc32(task.encode())])  # the same stream serves both splits
  out, seen, misses = [], set(), 0
  while len(out) < n:
    m = spec.draw(rng, d)
    key = spec.canonical(m)
    if key in seen or split_of(key) != split:
      misses += 1
      if misses > _MAX_MISSES:
        raise ValueError(f"{task} {d}: found only {len(out)} distinct {split} instances, asked for {n}")
      continue
    misses = 0
    seen.add(key)
    question = spec.ask(m, template != "short")
    out.append(Example(task, question, TEMPLATES[template].format(question=question), spec.reference(m), m))
  return out


def check(example: Example, answer_text: str) -> bool:
  """Accuracy of an answer (the text inside <answer>): countdown needs an expression over the given numbers,
  each at most once (not necessarily all), equal to the target; other tasks compare stripped strings."""
  if not isinstance(answer_text, str):
    return False
  if example.task == "countdown":
    return countdown_value(answer_text, example.metadata["numbers"]) == example.metadata["target"]
  return answer_text.strip() == example.reference


def cold_start_completion(example: Example) -> str:
  """A correct, well-formatted completion with a programmatic trace, for cold-start SFT (R1 sec. 2.3.1)."""
  m = example.metadata
  answer = m["solution"] if example.task == "countdown" else example.reference
  return f"<think>{TASKS[example.task].trace(m)}</think><answer>{answer}</answer>"


def direct_completion(example: Example) -> str:
  """The answer with no reasoning (`<think></think><answer>...`): what a base model that never thinks writes."""
  answer = example.metadata["solution"] if example.task == "countdown" else example.reference
  return f"<think></think><answer>{answer}</answer>"
