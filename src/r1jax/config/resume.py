"""What a resumed run may change: the saved config of a run directory against the command's, field by field.
A change to what the checkpoints hold (the architecture, the parameter dtype) or to the data the run has
consumed (sources, seeds, batch shape, the GRPO task and group shape) makes the checkpoints unusable for this
command and is refused; anything else (learning rate, steps, mesh, kernels, logging) is allowed and said."""

from __future__ import annotations

from r1jax.config.errors import ConfigError
from r1jax.config.load import to_dict
from r1jax.config.run import RunConfig

# Dotted names; a section name covers all its fields. data.eval_source and data.eval_problems only change what
# evaluation reads.
REFUSED = ("model", "compute.param_dtype", "data", "train.batch_size", "train.seq_len", "train.grad_accum",
           "train.seed", "grpo.task", "grpo.prompts_per_step", "grpo.group_size", "grpo.base_steps")
ALLOWED_INSIDE_REFUSED = ("data.eval_source", "data.eval_problems")


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def changes(saved: RunConfig, new: RunConfig) -> list[tuple[str, object, object]]:
  """(field, saved value, new value) for every field that differs, in config order."""
  a, b = _flat(to_dict(saved)), _flat(to_dict(new))
  return [(k, a.get(k), b.get(k)) for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def refused(field: str) -> bool:
  if field in ALLOWED_INSIDE_REFUSED:
    return False
  return any(field == r or field.startswith(r + ".") for r in REFUSED)


def check(saved: RunConfig, new: RunConfig, where: str) -> list[tuple[str, object, object]]:
  """The allowed changes from `saved` (the run's) to `new` (the command's); ConfigError naming every refused
  one, in one line."""
  diff = changes(saved, new)
  bad = [f"{k}: run has {old!r}, command says {value!r}" for k, old, value in diff if refused(k)]
  if bad:
    raise ConfigError(f"--resume {where}: " + "; ".join(bad) + " (these change what its checkpoints hold or the "
                      "data they have seen: undo them, or start a new run with another train.name)")
  return [c for c in diff if not refused(c[0])]
