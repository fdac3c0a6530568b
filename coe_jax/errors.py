"""The errors every part of coe_jax raises for bad input, and the helper that raises them.

A `ConfigError` names the offending field (`model.num_experts_per_tok`,
`data.train_files`, `train.lr`, ...), the value it got and what is allowed; a
`DataError` names the file, the line and what is wrong. Both are raised
before anything is compiled, written or overwritten.
"""

from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
  """A bad configuration value; the message names the field and what is allowed."""


class DataError(ConfigError):
  """A malformed data file; the message names the file, the line and what is wrong."""


def require(ok: bool, field: str, message: str) -> None:
  """Raises `ConfigError(f"{field}: {message}")` unless `ok`."""
  if not ok:
    raise ConfigError(f"{field}: {message}")


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def require_choice(value: Any, field: str, allowed: Iterable[str]) -> None:
  allowed = tuple(allowed)
  require(value in allowed, field, f"got {value!r}; allowed values: {', '.join(allowed)}")
