"""Answer verifiers (rl/verifiers.py) and the language reward: a table of answers with hand-written truth, and
hypothesis for never raising and for time linear in the input (1 MB strings, braces nested 100k deep)."""

import sys
import time
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1jax import tasks
from r1jax.rl import rewards, verifiers


def problem(reference, verifier="math", **metadata):
  return tasks.Example("problems", "q", "q", str(reference), {"verifier": verifier, **metadata})


# (completion, reference, truth): written by hand, each row one normalisation rule or one thing rejected.
MATH = [
    ("so the answer is \\boxed{42}.", "42", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),  # \frac vs decimal: exact rationals
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),  # \dfrac
    ("\\boxed{\\tfrac34}", "0.75", True),  # \tfrac with single-character arguments
    ("\\boxed{\\frac{-3}{4}}", "-0.75", True),
    ("\\boxed{1,234}", "1234", True),  # thousands separator
    ("\\boxed{1{,}234{,}567}", "1234567", True),  # LaTeX thousands separator
    ("\\boxed{1,2}", "12", False),  # not a thousands group: a list
    ("\\boxed{3.50}", "7/2", True),
    ("\\boxed{.5}", "1/2", True),
    ("\\boxed{+7}", "7", True),
    ("\\boxed{\u22125}", "-5", True),  # unicode minus
    ("\\boxed{-5}", "5", False),
    ("\\boxed{50\\%}", "50", True),  # a percentage matches its number ...
    ("\\boxed{50\\%}", "0.5", True),  # ... and its value / 100
    ("\\boxed{50\\%}", "5", False),
    ("$\\boxed{\\$12}$", "12", True),  # dollar signs
    ("\\boxed{\\text{12 cm}}", "12", True),  # \text{} and units
    ("\\boxed{12\\,\\mathrm{kg}}", "12", True),  # spacing command and \mathrm units
    ("\\boxed{5 m^2}", "5", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{x = 12}", "12", True),  # a leading `x =`
    ("\\boxed{2x+3}", "2", False),  # an expression is not its leading number
    ("\\boxed{x^2+1}", "x^2 + 1", True),  # no number: normalised strings
    ("\\boxed{{7}}", "7", True),  # redundant braces
    ("\\boxed{\\left(3\\right)}", "3", True),
    ("\\boxed 9", "9", True),  # \boxed without braces
    ("first \\boxed{1} then \\boxed{2}", "2", True),  # the last box counts
    ("first \\boxed{1} then \\boxed{2}", "1", False),
    ("\\boxed{\\boxed{3}}", "3", True),
    ("<think>3 + 4</think><answer>7</answer>", "7", True),  # the answer tag without a box
    ("<answer>$3/4$</answer>", "0.75", True),
    ("Tom has 7 apples left.", "7", True),  # else the last number
    ("she paid 1e3 dollars", "1000", True),
    ("it is 12 or maybe 13", "12", False),
    ("no number here", "3", False),
    ("\\boxed{1/0}", "1", False),  # division by zero never parses as a number
    ("\\boxed{1e999999}", "1", False),  # an exponent bomb is compared as a string, never computed
    ("\\boxed{}", "0", False),
    ("\\boxed{12", "12", True),  # an unclosed box is ignored; the last number remains
]


@pytest.mark.parametrize("completion,reference,truth", MATH)
def test_math_verifier_table(completion, reference, truth):
  assert verifiers.math(problem(reference), completion, {}) == float(truth)


def test_exact_choice_and_countdown():
  assert verifiers.exact(problem("Paris", "exact"), "<answer> paris. </answer>", {}) == 1.0
  assert verifiers.exact(problem("New York", "exact"), "I think\n  new   york  \n", {}) == 1.0  # the last line
  assert verifiers.exact(problem("Paris", "exact"), "<answer>Lyon</answer>", {}) == 0.0
  assert verifiers.exact(problem("x", "exact"), "", {}) == 0.0
  for text, truth in [("The answer is (B).", 1.0), ("\\boxed{B}", 1.0), ("<answer>b</answer>", 1.0),
                      ("Answer: C", 0.0), ("B is wrong, the answer is A", 0.0), ("Because of that", 0.0)]:
    assert verifiers.choice(problem("B", "choice"), text, {}) == truth, text
  assert verifiers.choice(problem("(C)", "choice", choices=["x", "y", "z"]), "answer: C", {}) == 1.0
  assert verifiers.choice(problem("B", "choice", choices=["x", "y"]), "answer: E", {}) == 0.0  # not an option
  countdown = problem(24, "countdown", numbers=[3, 8, 1])
  assert verifiers.countdown(countdown, "<answer>3*8*1</answer>", {}) == 1.0
  assert verifiers.countdown(countdown, "<answer>3*8*1*1</answer>", {}) == 0.0  # 1 used twice
  assert verifiers.countdown(countdown, "<answer>__import__('os')</answer>", {}) == 0.0


def test_accuracy_reward_dispatches_to_the_problem_verifier_and_tasks_keep_theirs():
  spec = [("accuracy", 1.0)]
  assert rewards.score(problem("0.5"), "\\boxed{1/2}", None, spec)["accuracy"] == 1.0
  assert rewards.score(problem("B", "choice"), "\\boxed{1/2}", None, spec)["accuracy"] == 0.0
  ex = tasks.make("reverse", 1, digits=4)[0]
  assert rewards.score(ex, f"<think></think><answer>{ex.reference}</answer>", None, spec)["accuracy"] == 1.0
  assert rewards.score(ex, f"\\boxed{{{ex.reference}}}", None, spec)["accuracy"] == 0.0  # tasks read the tag


def test_user_verifier_by_import_path(monkeypatch):
  module = types.ModuleType("my_verifiers")
  module.starts_with_yes = lambda example, completion, info: float(completion.startswith("yes"))
  module.not_callable = 3
  monkeypatch.setitem(sys.modules, "my_verifiers", module)
  fn = verifiers.get("my_verifiers:starts_with_yes")
  assert fn(problem("", "x"), "yes!", {}) == 1.0 and "my_verifiers:starts_with_yes" in verifiers.REGISTRY
  ex = problem("", "my_verifiers:starts_with_yes")
  assert rewards.score(ex, "yes", None, [("accuracy", 1.0)])["accuracy"] == 1.0
  with pytest.raises(ValueError, match=r"^unknown verifier 'maths'; known: .*choice"):
    verifiers.get("maths")
  with pytest.raises(ValueError, match=r"^verifier 'no_such_module:f': cannot import"):
    verifiers.get("no_such_module:f")
  with pytest.raises(ValueError, match=r"^verifier 'my_verifiers:not_callable': int is not callable"):
    verifiers.get("my_verifiers:not_callable")


def test_language_reward():
  def share(text, target):
    return rewards.language(problem(""), f"<think>{text}</think><answer>1</answer>", {"language": target})

  assert share("first add the two numbers", "en") == 1.0
  assert share("first add 两个 numbers", "en") == pytest.approx(3 / 5)  # each CJK character is a word
  assert share("first add 两个 numbers", "zh") == pytest.approx(2 / 5)
  assert share("сначала add", "ru") == pytest.approx(1 / 2)
  assert share("café naïve", "latin") == 1.0
  assert share("1 + 2 = 3", "en") == 0.0  # no words
  assert rewards.language(problem(""), "no tags at all", {"language": "en"}) == 1.0


@pytest.mark.parametrize("name", ["math", "exact", "choice", "countdown"])
@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("\\boxed{}frac<>/answer0123456789.,%$-+e ^xA(B)"), max_size=60)
       | st.text(max_size=60))
def test_verifiers_never_raise(name, text):
  ex = problem(text[:5] or "1", name, numbers=[1, 2], choices=["a", "b"])
  assert verifiers.get(name)(ex, text, {}) in (0.0, 1.0)
  assert verifiers.math(problem(text), "\\boxed{1}", {}) in (0.0, 1.0)  # any reference too


ADVERSARIAL = {
    "open braces": "\\boxed{" + "{" * 1_000_000,
    "nested braces": "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
    "many boxes": "\\boxed{" * 150_000,
    "many fracs": "\\boxed{" + "\\frac{" * 150_000 + "}",
    "digits": "9" * 1_000_000,
    "thousands": "1," * 500_000,
    "answer tags": "<answer>" * 100_000 + "</answer>",
    "lone lowercase letters": "answer " + "a " * 500_000,
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_verifiers_are_linear_on_megabyte_inputs(case):
  """Quadratic work on ~1 MB would take minutes; linear takes well under a second. 10 s leaves room for a
  loaded CI machine without letting anything quadratic through."""
  text = ADVERSARIAL[case]
  start = time.perf_counter()
  for name in ("math", "exact", "choice", "countdown"):
    assert verifiers.get(name)(problem("1", name, numbers=[1]), text, {}) in (0.0, 1.0)
  assert 0.0 <= rewards.language(problem(""), text, {"language": "en"}) <= 1.0
  assert time.perf_counter() - start < 10.0
