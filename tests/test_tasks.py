"""Generated tasks: the countdown evaluator is safe and exact, splits are disjoint, references are right."""

from fractions import Fraction

import numpy as np
import pytest
from digits import digit_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1jax import tasks

TASKS = tuple(tasks.TASKS)


@pytest.mark.parametrize("expr, numbers", [
    ("x+1", [1]),  # names
    ("__import__('os')", [1]),  # calls and strings
    ("(3).real", [3]),  # attributes
    ("2**99999", [2, 99999]),  # exponent bomb
    ("2**3", [2, 3]),
    ("1.5*2", [2]),  # floats
    ("1e3", [1]),
    ("3+3", [3, 7]),  # reused number
    ("4+3", [3, 7]),  # number not given
    ("-3+10", [3, 10]),  # unary minus
    ("+3", [3]),
    ("10-(-3)", [3, 10]),
    ("7//3", [3, 7]),
    ("7%3", [3, 7]),
    ("(3)(7)", [3, 7]),
    ("True+3", [1, 3]),
    ("1_0", [10]),
    ("3 if 7 else 7", [3, 7]),
    ("[3][0]", [3]),
    ("3/(7-7)", [3, 7, 7]),  # division by zero
    ("9" * 150, [3]),  # huge literal
    ("+".join(["1"] * 101), [1] * 101),  # longer than MAX_EXPR_CHARS
    ("(" * 49 + "1" + "+1)" * 49, [1] * 49),  # deeply nested, one 1 too many
    ("", [1]),
    ("3 +", [3]),
    ("3\x00", [3]),
])
def test_countdown_value_rejects(expr, numbers):
  assert tasks.countdown_value(expr, numbers) is None


@pytest.mark.parametrize("expr, numbers, value", [
    ("(3*7)+12", [3, 7, 12], Fraction(33)),
    (" 12 + 3 * 7 ", [3, 7, 12], Fraction(33)),
    ("7/3", [3, 7, 12], Fraction(7, 3)),  # a subset of the numbers is enough
    ("(((7)))", [7], Fraction(7)),
    ("3+3", [3, 3], Fraction(6)),  # a number given twice may be used twice
    ("100-(20/5)*4", [4, 5, 20, 100], Fraction(84)),
    ("+".join(["1"] * 100), [1] * 100, Fraction(100)),  # 199 characters: at the limit
    ("(" * 49 + "1" + "+1)" * 49, [1] * 50, Fraction(50)),  # deeply nested
])
def test_countdown_value_accepts(expr, numbers, value):
  assert tasks.countdown_value(expr, numbers) == value


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=250), st.lists(st.integers(0, 50), max_size=6))
def test_countdown_value_never_raises(expr, numbers):
  value = tasks.countdown_value(expr, numbers)
  assert value is None or isinstance(value, Fraction)


def test_countdown_solutions_check():
  """200 instances over several seeds and sizes: every solution is accepted and targets are sound."""
  examples = [e for seed in range(4) for e in tasks.make("countdown", 40, seed=seed)]
  examples += tasks.make("countdown", 40, seed=9, split="eval", n_numbers=5, max_number=50)
  for e in examples:
    m = e.metadata
    assert tasks.check(e, m["solution"]), e
    assert tasks.countdown_value(m["solution"], m["numbers"]) == m["target"] == int(e.reference)
    assert isinstance(m["target"], int) and m["target"] > 0 and m["target"] not in m["numbers"]
    assert sorted(int(t) for t in e.question.split()[1:-2]) == sorted(m["numbers"])
    assert not tasks.check(e, str(m["target"] + 1)) and not tasks.check(e, "")


def _independent_canonical(e: tasks.Example) -> str:
  if e.task == "countdown":
    return f"{sorted(e.metadata['numbers'])} {e.metadata['target']}"
  if e.task == "arith":
    return f"{sorted([e.metadata['a'], e.metadata['b']])} {e.metadata['op']}"
  return e.metadata["digits"]


@pytest.mark.parametrize("task", TASKS)
def test_splits_disjoint_deterministic_distinct(task):
  train, evals = tasks.make(task, 500, seed=3), tasks.make(task, 500, seed=3, split="eval")
  for canon in (tasks.canonical, _independent_canonical):
    a, b = {canon(e) for e in train}, {canon(e) for e in evals}
    assert len(a) == len(b) == 500 and not a & b
  assert all(tasks.split_of(tasks.canonical(e)) == "eval" for e in evals)
  assert tasks.make(task, 500, seed=3) == train
  assert tasks.make(task, 20, seed=4) != train[:20]


def test_references():
  for e in tasks.make("arith", 50, digits=4) + tasks.make("arith", 50, digits=7, op="*"):
    a, b, op = e.metadata["a"], e.metadata["b"], e.metadata["op"]
    assert len(str(a)) == len(str(b)) == (4 if op == "+" else 7)
    assert e.reference == str(a + b if op == "+" else a * b) and e.question == f"{a}{op}{b}"
    assert e.metadata["trace"].endswith(e.reference)
  for task in ("copy", "reverse", "sort"):
    for e in tasks.make(task, 30, digits=9):
      d = e.metadata["digits"]
      assert len(d) == 9 and e.reference == {"copy": d, "reverse": d[::-1], "sort": "".join(sorted(d))}[task]
      assert tasks.check(e, f"  {e.reference}\n") and not tasks.check(e, e.reference + "0")


def test_add_trace_carries():
  (e,) = [x for x in tasks.make("arith", 300, digits=2) if x.metadata["a"] + x.metadata["b"] >= 100][:1]
  steps = e.metadata["trace"].split("; ")
  assert steps[-2] == "carry 1" and steps[-1] == f"so {e.reference}"


@pytest.mark.parametrize("task", TASKS)
def test_prompts(task):
  for e in tasks.make(task, 50):
    assert e.prompt == e.question + "\n" and len(e.prompt) < 40, e.prompt
  (e,) = tasks.make(task, 1, template="r1zero")
  assert e.prompt.endswith(f"User: {e.question}\nAssistant:") and "<think>" in e.prompt and "<answer>" in e.prompt


def test_errors():
  for kwargs, words in [(dict(task="chess"), ["chess", "countdown", "sort"]),
                        (dict(task="copy", split="test"), ["test", "train", "eval"]),
                        (dict(task="copy", template="chat"), ["chat", "short", "r1zero"]),
                        (dict(task="copy", width=3), ["width", "digits"]),
                        (dict(task="arith", op="-"), ["op", "*"]),
                        (dict(task="countdown", n_numbers=0), ["n_numbers"])]:
    with pytest.raises(ValueError) as err:
      tasks.make(n=1, **kwargs)
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)
  with pytest.raises(ValueError, match="distinct"):
    tasks.make("copy", 11, digits=1)
  assert tasks.make("copy", 0) == []


def test_digit_batch_unchanged():
  assert list(tasks.digit_answer("reverse", np.array([1, 2, 3]))) == [3, 2, 1]
  batch = digit_batch(np.random.default_rng(0), "sort", 2, 10)
  assert batch.tokens_BxL.shape == (2, 10) and batch.loss_mask_BxL.sum() == 2 * 5
