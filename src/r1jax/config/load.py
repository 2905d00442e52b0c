"""YAML files and `section.field=value` overrides onto the dataclass defaults: unknown keys and wrong types are
one-line errors naming the key; everything is validated once, here, before any tracing or compilation."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from r1jax.config.errors import ConfigError, fail, float_from_str
from r1jax.config.run import RunConfig


def weighted_names(key: str, value) -> tuple[tuple[str, float], ...]:
  """`name:weight,name:weight` (a bare name weighs 1.0), a {name: weight} mapping or [name, weight] pairs ->
  ((name, weight), ...) with finite weights and no name twice."""
  if isinstance(value, str):
    pairs = [(n.strip(), w.strip() or "1.0") for n, _, w in (item.partition(":") for item in value.split(","))]
  elif isinstance(value, dict):
    pairs = list(value.items())
  elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
    pairs = [tuple(p) for p in value]
  else:
    fail(key, value, "expected name:weight,... or a mapping of names to weights")
  out = {}
  for name, weight in pairs:
    if not isinstance(name, str) or not name:
      fail(key, value, f"entry {name!r}: expected name[:weight]")
    if name in out:
      fail(key, value, f"name {name!r} appears twice")
    out[name] = _coerce(key, weight, float)
  return tuple(out.items())


def _names(key: str, value) -> tuple[str, ...]:
  """`a,b,c` or a list of names -> ("a", "b", "c")."""
  items = value.split(",") if isinstance(value, str) else value
  if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s.strip() for s in items):
    fail(key, value, "expected comma-separated names or a list of them")
  return tuple(s.strip() for s in items)


def _coerce(key: str, value, hint):
  """Check `value` against a field's type hint (ints and numeric strings such as "3e-4" become floats; tuples
  of names and of (name, weight) pairs from their text or YAML forms)."""
  origin = typing.get_origin(hint)
  if origin is tuple:
    return _names(key, value) if typing.get_args(hint)[0] is str else weighted_names(key, value)
  if origin is Literal:
    if value not in typing.get_args(hint):
      fail(key, value, f"must be one of {list(typing.get_args(hint))}")
    return value
  if origin in (typing.Union, types.UnionType):
    for arg in typing.get_args(hint):
      try:
        return _coerce(key, value, arg)
      except ConfigError:
        pass
    fail(key, value, f"must be {hint}")
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint is float and isinstance(value, str):
    return float_from_str(key, value)
  if hint is type(None) and value is None:
    return None
  if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
    fail(key, value, f"must be of type {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
  if hint is float and not math.isfinite(value):
    fail(key, value, "must be a finite number, not nan or inf")
  return value


# Fields that left the model section when the architecture was split from how a run computes it (Dec 2026).
_MOVED_FIELDS = ("dtype", "param_dtype", "init_std", "remat", "attention_impl", "capacity_factor", "expert_gemm",
                 "head_chunk", "mtp_loss_weight", "aux_loss_alpha", "bias_update_speed", "fp8")
MOVED = {f"model.{name}": f"compute.{name}" for name in _MOVED_FIELDS}
# Keys a Python field cannot be named: `grpo.async=true` sets grpo.async_rollouts.
ALIASES = {"grpo.async": "async_rollouts"}


def migrate(saved: dict) -> dict:
  """A config saved before the model/compute split (a run directory's config.yaml) with its compute settings
  moved from the model section into the compute section; a user's YAML keeps the one-line error instead."""
  model = dict(saved.get("model") or {})
  moved = {name: model.pop(name) for name in _MOVED_FIELDS if name in model}
  if not moved:
    return saved
  return {**saved, "model": model, "compute": {**moved, **(saved.get("compute") or {})}}


def _replace(obj, updates: dict, prefix: str):
  """dataclasses.replace with unknown-key and type checks, recursing into nested sections."""
  if not isinstance(updates, dict):
    fail(prefix, updates, "must be a mapping of fields")
  hints = typing.get_type_hints(type(obj))
  fields = {f.name for f in dataclasses.fields(obj)}
  changes = {}
  for name, value in updates.items():
    key = f"{prefix}.{name}" if prefix else str(name)
    if key in MOVED:
      fail(key, value, f"moved to {MOVED[key]} (the model section is the architecture alone)")
    name = ALIASES.get(key, name)
    if name not in fields:
      fail(key, value, f"unknown key; known: {sorted(fields)}")
    current = getattr(obj, name)
    if dataclasses.is_dataclass(current):
      changes[name] = _replace(current, value, key)
    else:
      changes[name] = _coerce(key, value, hints[name])
  return dataclasses.replace(obj, **changes)


def parse_override(text: str) -> tuple[list[str], object]:
  """`model.n_routed_experts=16` -> (["model", "n_routed_experts"], 16); values are parsed as YAML."""
  if "=" not in text:
    raise ConfigError(f"override {text!r}: expected section.field=value")
  key, raw = text.split("=", 1)
  return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_dict(updates: dict, where: str, overrides: typing.Sequence[str] = ()) -> RunConfig:
  """A config from a parsed mapping of sections (`where` names its source in errors), then `overrides`."""
  try:
    cfg = _replace(RunConfig(), updates, "")
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
  return apply_overrides(cfg, overrides)


def read_yaml(path: str | Path) -> dict:
  """A YAML file's mapping; a missing file or bad YAML is a one-line error naming file:line."""
  path = Path(path)
  if not path.exists():
    raise ConfigError(f"config file {path} does not exist")
  try:
    return yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    line = getattr(getattr(e, "problem_mark", None), "line", None)
    raise ConfigError(f"{path}:{'' if line is None else line + 1}: invalid YAML ({getattr(e, 'problem', e)})") from None


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
  """Read a YAML of overrides onto the dataclass defaults, apply `k=v` overrides, validate."""
  return load_dict({} if path is None else read_yaml(path), str(path), overrides)


def apply_overrides(cfg: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
  """Apply `section.field=value` overrides (same checks as YAML) and validate."""
  for text in overrides:
    keys, value = parse_override(text)
    nested: dict = {keys[-1]: value}
    for name in reversed(keys[:-1]):
      nested = {name: nested}
    cfg = _replace(cfg, nested, "")
  return cfg.validate()


def to_dict(cfg) -> dict:
  """The config as plain YAML/JSON values (tuples as lists), which `load` reads back to the same config."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))
