"""The errors every part of coe_jax raises for bad input or a failed run, and their helpers.

A `ConfigError` names the offending field (`model.num_experts_per_tok`,
`data.train_files`, `train.lr`, ...), the value it got and what is allowed; a
`DataError` names the file, the line and what is wrong. Both are raised
before anything is compiled, written or overwritten; the command lines print
them as one line and exit with `USAGE_EXIT` (2).

A `RunError` is a run that could not go on through no bug of coe_jax: a
workdir another run holds (`WorkdirLocked`), no checkpoint that restores
(`CheckpointError`), a full, read-only or forbidden disk (`StorageError`), a
diverged loss (`DivergenceError`). Its message says what failed, where, and
what was kept; the command lines print it as one line and exit with
`RUNTIME_EXIT` (1). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
  """A bad configuration value; the message names the field and what is allowed."""


class DataError(ConfigError):
  """A malformed data file; the message names the file, the line and what is wrong."""


class RunError(RuntimeError):
  """A run stopped by its environment, not a bug; the message says what, where and what is kept."""


class WorkdirLocked(RunError):
  """Another training run holds the workdir (the message names its PID and host)."""


class CheckpointError(RunError):
  """No checkpoint of the workdir restores (each one's step, file and failure are named)."""


class StorageError(RunError):
  """A write failed for lack of space or permission; nothing partial was left behind."""

  def __init__(self, message: str, path: str = "", says_what_is_kept: bool = False):
    super().__init__(message)
    self.path = path
    self.says_what_is_kept = says_what_is_kept


class DivergenceError(RunError, FloatingPointError):
  """The loss or the gradient norm became NaN/Inf; the last good checkpoint is kept."""


USAGE_EXIT = 2  # ConfigError (bad flags, config fields or values, input files)
RUNTIME_EXIT = 1  # RunError


def require(ok: bool, field: str, message: str) -> None:
  """Raises `ConfigError(f"{field}: {message}")` unless `ok`."""
  if not ok:
    raise ConfigError(f"{field}: {message}")


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def require_choice(value: Any, field: str, allowed: Iterable[str]) -> None:
  allowed = tuple(allowed)
  require(value in allowed, field, f"got {value!r}; allowed values: {', '.join(allowed)}")
