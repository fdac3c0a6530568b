"""Checkpoint faults: damaged steps found and moved aside, partial saves removed, quiet failures.

Used by `checkpoint.Checkpointer`:

* `describe_damage`: which file of a step that does not restore is missing, else the
  first line of what failed (TensorStore's status, e.g. `OUT_OF_RANGE: Error reading
  "params...": Requested byte range ... is not valid for value of size 10`);
* `move_aside`: a damaged step goes to `<workdir>/damaged_checkpoints/<step>` (kept);
* `remove_partial_saves`: the `*.orbax-checkpoint-tmp*` directory of a failed save;
* `intact_note`: the last complete step, for a message about a failed write;
* `quiet_background_failures`: a failed restore is reported once, not by each of Orbax's
  reader threads and coroutines as they die.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import logging
import os
import re
import shutil
import sys
import threading
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp

from coe_jax import storage
from coe_jax.training import multihost

DAMAGED_DIR = "damaged_checkpoints"
# Files every complete checkpoint step holds (Orbax's layout of `state` and `data`).
REQUIRED = ("state", "data", "state/_METADATA", "state/manifest.ocdbt", "data/metadata")
TMP_GLOB = "*.orbax-checkpoint-tmp*"
VERBOSE_ENV = "COE_JAX_VERBOSE"  # set: Orbax's failure reports are printed as they come
_STATUS = re.compile(r"[A-Z][A-Z_]{4,}: ")  # TensorStore's status, e.g. 'OUT_OF_RANGE: ...'


def describe_damage(directory: str, step: int, error: BaseException) -> str:
  """'<file>: missing' for a required file of `step` that is gone, else '<step dir>: <what
  failed>' (the first line of the most specific error in `error`'s chain)."""
  step_dir = os.path.join(directory, str(step))
  for name in REQUIRED:
    if not os.path.exists(os.path.join(step_dir, name)):
      return f"{os.path.join(step_dir, name)}: missing"
  texts = [str(e).split("See full TensorStore")[0].strip() for e in storage.chain(error)]
  text = next(
    (t for t in texts if _STATUS.match(t)),
    next((t for t in texts if step_dir in t), f"{type(error).__name__}: {error}"),
  )
  return f"{step_dir}: {text.splitlines()[0][:300] if text else type(error).__name__}"


def move_aside(directory: str, step: int) -> str:
  """Moves `directory/<step>` to `<its parent>/damaged_checkpoints/<step>[-n]` (process 0; the
  others wait for it); returns the new path."""
  parent = os.path.join(os.path.dirname(directory), DAMAGED_DIR)
  target, n = os.path.join(parent, str(step)), 1
  while os.path.exists(target):
    target, n = os.path.join(parent, f"{step}-{n}"), n + 1
  if multihost.is_primary():
    os.makedirs(parent, exist_ok=True)
    shutil.move(os.path.join(directory, str(step)), target)
  multihost.barrier(f"coe_jax:moved_aside_{step}")
  return target


def remove_partial_saves(directory: str) -> None:
  """Removes the temporary directories of saves that did not complete."""
  for path in glob.glob(os.path.join(directory, TMP_GLOB)):
    storage.remove_quietly(path)


@contextlib.contextmanager
def quiet_background_failures() -> Iterator[None]:
  """Within it, the errors that Orbax's reader threads and coroutines print as they die with a
  failed restore (the restore itself raises, and is reported once) are not printed."""
  if os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
    yield
    return
  skip_orbax_failure_reports()
  excepthook = threading.excepthook
  asyncio_logger = logging.getLogger("asyncio")
  level = asyncio_logger.level
  threading.excepthook = lambda *args: None
  asyncio_logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    gc.collect()  # most of the failed read's coroutines die here
    threading.excepthook = excepthook
    asyncio_logger.setLevel(level)


def skip_orbax_failure_reports() -> None:
  """From now on `sys.unraisablehook` drops what dies with a failed save or restore (already
  raised once): Orbax's reader coroutines, and TensorStore's callbacks finding the event loop
  closed. Everything else still reaches the previous hook."""
  if not isinstance(sys.unraisablehook, _SkipOrbaxFailureReports):
    sys.unraisablehook = _SkipOrbaxFailureReports(sys.unraisablehook)


class _SkipOrbaxFailureReports:
  def __init__(self, hook: Callable[[Any], None]):
    self.hook = hook

  def __call__(self, unraisable: Any) -> None:
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    self.hook(unraisable)


def bytes_to_write(state: Any) -> int:
  """Bytes of `state` this process writes (Orbax writes each shard's first replica once)."""
  total = 0
  for leaf in jax.tree.leaves(state):
    shards = getattr(leaf, "addressable_shards", None)
    if shards is None:
      total += int(getattr(leaf, "nbytes", 0))
    else:
      total += sum(int(s.data.nbytes) for s in shards if s.replica_id == 0)
  return total


def complete_steps(directory: str) -> list[int]:
  """Steps whose checkpoint directory is complete on disk (Orbax renames it when done)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if re.fullmatch(r"\d+", n))


def intact_note(directory: str) -> str:
  """'the last complete checkpoint (step N) is intact', for a message about a failed write."""
  steps = complete_steps(directory)
  if not steps:
    return "no complete checkpoint was written yet"
  return f"the last complete checkpoint (step {steps[-1]}) is intact"


def close_quietly(manager: ocp.CheckpointManager) -> None:
  try:
    manager.close()
  except Exception:  # noqa: BLE001 (its save already failed and is being reported)
    pass
