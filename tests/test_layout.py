"""The package layout as docs/architecture.md draws it: every import (module level or inside a function) runs
downward through the ranks below, no modules import each other in a circle, the FP8 kernels sit beneath the
recipe, expert parallelism knows nothing of FP8, and no module outgrows one sitting. Read from the source with
ast, so a new import that breaks the layout fails here before anyone has to notice it in a picture."""

import ast
import collections
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import modules of its own unit and of units of a lower rank, nothing above.
RANKS = [
    ["config"],
    ["batch", "distributed", "metrics", "tasks", "cost", "chat_template", "tokenizer", "sharding", "run_lock"],
    ["nn.fp8"],
    ["nn"],
    ["model"],
    ["losses"],
    ["train"],
    ["checkpoint", "sampler", "data", "memory"],
    ["continuous_batching"],
    ["loop"],
    ["rl", "interop"],
    ["bench"],
    ["cli"],
]
RANK = {unit: i for i, units in enumerate(RANKS) for unit in units}
MAX_LINES = 500


def _name(path: Path) -> str:
  parts = list(path.relative_to(SRC).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in (SRC / "r1jax").rglob("*.py")}


def _imports(path: Path) -> set[str]:
  """The r1jax modules a file imports anywhere in it (`from r1jax.nn import fp8` names the module r1jax.nn.fp8)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("r1jax"):
      out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names}
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("r1jax")}
  return out


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def _unit(module: str) -> str | None:
  """The longest unit of RANKS that contains `module` (None: the package faces r1jax and r1jax.nn)."""
  rest = module.removeprefix("r1jax.").split(".")
  return next((".".join(rest[:n]) for n in range(len(rest), 0, -1) if ".".join(rest[:n]) in RANK), None)


def test_every_module_has_a_rank():
  assert [m for m in MODULES if m not in ("r1jax", "r1jax.nn") and _unit(m) is None] == []


def test_imports_run_downward():
  upward = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
            if _unit(a) and _unit(b) and RANK[_unit(b)] > RANK[_unit(a)]]
  assert upward == []


def test_no_import_circles():
  state, circles = {}, []

  def visit(m, stack):
    state[m] = "open"
    for n in sorted(GRAPH.get(m, ())):
      if state.get(n) == "open":
        circles.append(" -> ".join(stack[stack.index(n):] + [n]))
      elif n not in state:
        visit(n, stack + [n])
    state[m] = "done"

  for m in sorted(MODULES):
    if m not in state:
      visit(m, [m])
  assert circles == []


def test_fp8_kernels_sit_beneath_the_recipe():
  """kernels/ implement the GEMM primitive and the quantiser; they may read the e4m3 format (quantize.py) and
  each other, never the custom_vjps, tiles or operands built on them."""
  for m, targets in GRAPH.items():
    if m.startswith("r1jax.nn.fp8.kernels"):
      assert {t for t in targets if not t.startswith("r1jax.nn.fp8.kernels")} <= {"r1jax.nn.fp8.quantize"}, m


def test_expert_parallelism_knows_nothing_of_fp8():
  """Dispatch and combine take the expert FFN as a function (nn/expert_ffn.py picks it)."""
  assert not [t for t in GRAPH["r1jax.nn.expert_parallel"] if "fp8" in t]
  assert "fp8" not in MODULES["r1jax.nn.expert_parallel"].read_text().lower()


def test_nothing_in_the_library_imports_measurement_or_the_command_line():
  users = collections.defaultdict(list)
  for m, targets in GRAPH.items():
    for t in targets:
      if _unit(t) in ("bench", "cli") and _unit(m) != _unit(t) and _unit(m) != "cli":
        users[t].append(m)
  assert dict(users) == {}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_fit_one_sitting(module):
  assert len(MODULES[module].read_text().splitlines()) <= MAX_LINES, f"{module}: split it by idea"
