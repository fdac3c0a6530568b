"""What every coe_jax command line shares: one-line errors, exit codes, quiet library logs.

`run(main)` replaces `absl.app.run(main)`:

* a user error is one line on stderr, `error: <field or file>: <what> ; <what is allowed>`:
  a bad flag, an unknown config field (`--config.train.stpes=5` names `train.steps`), a bad
  config value or input file (`ConfigError`, exit code 2), a missing run directory
  (`FileNotFoundError`, 2); a run that cannot go on (`RunError`: a held workdir, no checkpoint
  that restores, a full or read-only disk, a diverged loss; exit code 1);
* any other exception is a bug and keeps its traceback;
* Orbax and absl INFO logs are off.

`--verbose` (or `COE_JAX_VERBOSE=1`) prints the traceback above the line and keeps the logs.
"""

from __future__ import annotations

import difflib
import logging as py_logging
import os
import re
import sys
import traceback
from typing import Any, Callable, Optional

from absl import app, flags, logging

from coe_jax import storage
from coe_jax.errors import RUNTIME_EXIT, USAGE_EXIT, ConfigError, RunError
from coe_jax.training import checkpoint_faults

VERBOSE_ENV = checkpoint_faults.VERBOSE_ENV
INTERRUPTED_EXIT = 130  # the shell's code for SIGINT


def define_verbose_flag() -> None:
  """Defines `--verbose` once (every command line calls `run`, which calls this)."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, f"Tracebacks and library logs (also: {VERBOSE_ENV}=1).")


def verbose() -> bool:
  """--verbose on the command line, or COE_JAX_VERBOSE set to something other than 0/false."""
  if os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
    return True
  return "verbose" in flags.FLAGS and flags.FLAGS.is_parsed() and bool(flags.FLAGS.verbose)


class _QuietOrbax(py_logging.Filter):
  """Drops Orbax's records (its background threads log each failure they re-raise to us)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname or record.levelno >= py_logging.CRITICAL


def quiet_logs() -> None:
  """absl (Orbax's logger) at WARNING and Orbax silent, unless verbose."""
  if verbose():
    return
  logging.set_verbosity(logging.WARNING)
  checkpoint_faults.skip_orbax_failure_reports()  # a failed save's threads, reported once
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


def exit_with(code: int, message: str, error: Optional[BaseException] = None) -> None:
  """Prints `error: message` (after the traceback when verbose) and exits with `code`."""
  if error is not None and verbose():
    traceback.print_exception(error)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  if isinstance(error, (RunError, KeyboardInterrupt)) and not verbose():
    os._exit(code)  # threads of a failed save or an interrupted compile would print on the way out
  sys.exit(code)


def user_error(error: BaseException) -> Optional[tuple[int, str]]:
  """(exit code, one-line message) for an error the user can fix, None for a bug."""
  if isinstance(error, ConfigError):
    return USAGE_EXIT, str(error)
  if isinstance(error, RunError):
    return RUNTIME_EXIT, str(error)
  found = storage.problem(error)
  if found is not None:
    path, reason = found
    return RUNTIME_EXIT, f"{path or 'a file'}: {reason}"
  if isinstance(error, (FileNotFoundError, NotADirectoryError)):
    return USAGE_EXIT, str(error)
  return None


def guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """`main` with quiet logs and user errors as one line (see the module docstring)."""

  def wrapped(argv: list[str]) -> Any:
    if verbose():
      os.environ[VERBOSE_ENV] = "1"  # library code (checkpoint_faults) reads the variable
    quiet_logs()
    try:
      return main(argv)
    except app.UsageError as error:
      exit_with(USAGE_EXIT, str(error), error)
    except KeyboardInterrupt as error:  # before training's own SIGINT handler, or a reader
      exit_with(INTERRUPTED_EXIT, "interrupted (Ctrl-C)", error)
    except Exception as error:  # noqa: BLE001 (sorted into user errors and bugs)
      known = user_error(error)
      if known is None:
        raise
      exit_with(*known, error)

  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one-line errors; an unknown config field names the nearest one."""
  try:
    rest = flags.FLAGS(argv)
    for name in _config_flag_names():
      flags.FLAGS[name].value.keys()  # a config file that failed to load raises here
    return rest
  except Exception as error:  # noqa: BLE001
    line = _unknown_field(argv) or _flag_error_line(error)
    if line is None:
      raise
    exit_with(USAGE_EXIT, line, error)
  return []


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with `--verbose`, one-line user errors and quiet logs."""
  define_verbose_flag()
  app.run(guarded(main), flags_parser=parse_flags)


def _config_flag_names() -> list[str]:
  return [
    name
    for name, flag in flags.FLAGS._flags().items()  # noqa: SLF001
    if type(flag).__name__ == "_ConfigFlag" and flag.present
  ]


def _flag_error_line(error: BaseException) -> Optional[str]:
  """The one line for a flag-parsing error: its ConfigError, missing file or absl message."""
  for e in storage.chain(error):
    if isinstance(e, ConfigError):  # config_flags may wrap it with the traceback as its text
      return re.sub(r"^[\w.]*ConfigError: ", "", str(e).strip().splitlines()[-1])
    if isinstance(e, (FileNotFoundError, OSError)) and "No such file" in str(e):
      file = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
      return (
        f"--config: {file.partition(':')[0] or 'the config file'} does not exist ; "
        "a config file such as configs/coe_c2.py[:tiny]"
      )
  if isinstance(error, flags.Error):
    return str(error).splitlines()[0]
  return None


def _unknown_field(argv: list[str]) -> Optional[str]:
  """For `--config.a.b=v` naming no field of the config file: the line naming the nearest one."""
  files = {
    a[2:].split("=", 1)[0]: a.split("=", 1)[1]
    for a in argv
    if a.startswith("--") and "=" in a and "." not in a.split("=", 1)[0]
  }
  for arg in argv:
    name, _, path = arg[2:].split("=", 1)[0].partition(".")
    if not (arg.startswith("--") and path and name in files):
      continue
    try:
      from coe_jax import config_lib  # pylint: disable=import-outside-toplevel

      node = config_lib.load_config_file(files[name])
    except Exception:  # noqa: BLE001 (the file's own error is reported instead)
      return None
    done: list[str] = []
    for key in path.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        where = ".".join([name, *done])
        near = difflib.get_close_matches(key, keys, n=1)
        hint = f"did you mean {where}.{near[0]}?" if near else f"{where} has {', '.join(keys)}"
        return f"--{name}.{path}: unknown config field {key!r} ; {hint}"
      done.append(key)
      node = node[key]
  return None
