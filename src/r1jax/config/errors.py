"""The config's one error type and its one-line messages."""

from __future__ import annotations

import math


class ConfigError(ValueError):
  """A bad config; the message is one line naming the key and the reason."""


def fail(key: str, value, reason: str):
  raise ConfigError(f"{key}={value!r}: {reason}")


def float_from_str(key: str, text: str) -> float:
  """PyYAML (YAML 1.1) reads `3e-4` as a string: accept any text Python parses as a finite float."""
  try:
    value = float(text)
  except ValueError:
    fail(key, text, "must be a number")
  if not math.isfinite(value):
    fail(key, text, "must be a finite number, not nan or inf")
  return value
