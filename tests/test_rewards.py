"""Rewards: accuracy/format/overlong values, spec parsing, and `score` never raising on any completion."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1jax import tasks
from r1jax.rl import rewards

EXAMPLES = [e for task in tasks.TASKS for tpl in tasks.TEMPLATES for e in tasks.make(task, 5, template=tpl)]
ALL = "accuracy:1.0,format:0.1,overlong:1.0"
INFO = {"n_tokens": 90, "max_tokens": 100, "truncated": False, "overlong_buffer": 20}
VOCAB = ["<think>", "</think>", "<answer>", "</answer>", "<answer", "think>", *"0123456789+-*/() \n", "x"]


def _check_score(example, completion, info=INFO):
  out = rewards.score(example, completion, info, spec=ALL)
  assert set(out) == {"accuracy", "format", "overlong", "total", "errors"} and out["errors"] == 0.0
  assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
  return out


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.task)
def test_cold_start_completion_is_correct_and_formatted(example):
  out = rewards.score(example, tasks.cold_start_completion(example))
  assert out["accuracy"] == out["format"] == 1.0 and out["total"] == pytest.approx(1.1)


@pytest.mark.parametrize("text", [
    "<think>a</think><answer>b</answer>",
    "<think></think><answer></answer>",
    "<think>x\ny</think> \n\t<answer> 1 </answer>\n ",
    "<think>3 < 4 and answer></think><answer>7</answer>",
])
def test_format_positive(text):
  assert rewards.format_(EXAMPLES[0], text, {}) == 1.0


@pytest.mark.parametrize("text", [
    "", "42", "<answer>1</answer>", "<think>a</think>",
    " <think>a</think><answer>1</answer>",  # leading whitespace
    "<think>a</think>x<answer>1</answer>",  # text between the blocks
    "<think>a</think><answer>1</answer>extra",
    "<think>a</think><answer>1</answer><answer>2</answer>",
    "<think><think>a</think><answer>1</answer>",
    "<think>a</think></think><answer>1</answer>",
    "<think>a<answer>1</answer></think><answer>1</answer>",
    "<think>a</think><answer>1<answer>2</answer>",
    "<think>a</think><answer>1<think></answer>",
    "<think>a</think><answer>1", "<think>a<answer>1</answer>",
    "<THINK>a</THINK><ANSWER>1</ANSWER>",
])
def test_format_negative(text):
  assert rewards.format_(EXAMPLES[0], text, {}) == 0.0


def test_extract_answer_and_accuracy():
  assert rewards.extract_answer("<answer>1</answer> then <answer> 2 </answer>") == " 2 "
  assert rewards.extract_answer("<answer>a<answer>b</answer>") == "b"
  assert rewards.extract_answer("</answer><answer>") is None
  assert rewards.extract_answer("no tags") is None and rewards.extract_answer("<answer>1") is None
  (e,) = tasks.make("reverse", 1)
  assert rewards.accuracy(e, f"<answer>0</answer><answer>{e.reference}</answer>", {}) == 1.0
  assert rewards.accuracy(e, f"<answer>{e.reference}</answer><answer>0</answer>", {}) == 0.0
  assert rewards.accuracy(e, e.reference, {}) == 0.0  # no answer tags
  (c,) = tasks.make("countdown", 1)
  assert rewards.accuracy(c, f"<answer>{c.reference}</answer>", {}) == 0.0  # the target is not an expression


def _overlong_reference(n, top, buffer):
  """DAPO eq. 13 as a clipped line: 0 before the buffer, -1 at and past max."""
  return 0.0 if buffer <= 0 else min(0.0, max(-1.0, ((top - buffer) - n) / buffer))


@pytest.mark.parametrize("n, expected", [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0),
                                         (101, -1.0), (10_000, -1.0)])
def test_overlong_hand_values(n, expected):
  info = {"n_tokens": n, "max_tokens": 100, "truncated": n > 100, "overlong_buffer": 20}
  assert rewards.overlong(EXAMPLES[0], "", info) == pytest.approx(expected)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 4000), st.integers(0, 1000))
def test_overlong_matches_formula(n, top, buffer):
  info = {"n_tokens": n, "max_tokens": top, "truncated": n > top, "overlong_buffer": buffer}
  assert rewards.overlong(EXAMPLES[0], "", info) == pytest.approx(_overlong_reference(n, top, buffer))


def test_overlong_without_buffer_or_bad_info():
  for info in [{"n_tokens": 500, "max_tokens": 100}, {**INFO, "overlong_buffer": 0}, {}, None,
               {**INFO, "n_tokens": "many"}, {**INFO, "max_tokens": math.nan}, {**INFO, "overlong_buffer": True}]:
    assert rewards.overlong(EXAMPLES[0], "", info) == 0.0


def test_parse():
  assert rewards.parse("accuracy:1.0,format:0.1") == [("accuracy", 1.0), ("format", 0.1)]
  assert rewards.parse(" accuracy , overlong:-0.5 ") == [("accuracy", 1.0), ("overlong", -0.5)]
  for spec, words in [("accuracy:1,lenght:1", ["grpo.rewards", "lenght", "accuracy", "format", "overlong"]),
                      ("", ["grpo.rewards", "''"]), ("accuracy:x", ["grpo.rewards", "'x'"]),
                      ("accuracy:nan", ["grpo.rewards"]), ("accuracy,accuracy:2", ["twice"])]:
    with pytest.raises(ValueError) as err:
      rewards.parse(spec)
    assert all(w in str(err.value) for w in words), err.value


def test_score_weights():
  (e,) = tasks.make("copy", 1)
  out = rewards.score(e, f"<think>x</think><answer>{e.reference}</answer>", {**INFO, "n_tokens": 95},
                      spec="accuracy:2,format:0.5,overlong:1")
  assert out == {"accuracy": 1.0, "format": 1.0, "overlong": -0.75, "total": 1.75, "errors": 0.0}
  assert rewards.score(e, "junk")["total"] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(EXAMPLES), st.one_of(
    st.text(max_size=400),
    st.binary(max_size=400).map(lambda b: b.decode("latin-1")),
    st.lists(st.sampled_from(VOCAB), max_size=60).map("".join)))
def test_rewards_never_raise(example, completion):
  _check_score(example, completion)
  for fn in (rewards.accuracy, rewards.format_, rewards.overlong):
    assert math.isfinite(fn(example, completion, INFO))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([e for e in EXAMPLES if e.task == "countdown"]),
       st.lists(st.sampled_from([*"0123456789+-*/() ", "**", ".", "_", "x"]), max_size=80).map("".join))
def test_countdown_answers_never_raise(example, expr):
  _check_score(example, f"<think></think><answer>{expr}</answer>")


def test_one_megabyte_completion():
  chunk = "<think>9</think><answer>(1+2)*3</answer><answer>"
  for text in ("7" * 1_000_000, chunk * (1_000_000 // len(chunk)), "<think>" + "1+" * 500_000 + "</think>"):
    for e in EXAMPLES[::4]:
      _check_score(e, text)


def test_user_reward_that_raises_or_misbehaves():
  @rewards.register("boom")
  def boom(example, completion, info):
    raise RuntimeError("user bug")

  rewards.register("nan")(lambda example, completion, info: math.nan)
  rewards.register("text")(lambda example, completion, info: "high")
  try:
    e = EXAMPLES[0]
    out = rewards.score(e, tasks.cold_start_completion(e), spec="accuracy:1,boom:1,nan:1,text:1")
    assert out == {"accuracy": 1.0, "boom": 0.0, "nan": 0.0, "text": 0.0, "total": 1.0, "errors": 3.0}
  finally:
    for name in ("boom", "nan", "text"):
      rewards.REGISTRY.pop(name)
  with pytest.raises(ValueError, match="total"):
    rewards.register("total")
