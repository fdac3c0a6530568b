"""What keeps a training run's faults to one line and its workdir whole (used by `train`).

* `check_workdir`: `--workdir` must be a directory or not exist yet (ConfigError).
* `held_workdir`: the workdir's lock (`workdir_lock`, process 0) for the run's
  lifetime; a full, read-only or forbidden disk met anywhere in the run becomes
  one `StorageError` naming the path and the last complete checkpoint; a
  workdir the run created and left empty (it failed first) is removed (by process 0).
* `check_finite`: a NaN/Inf loss or gradient norm stops the run (`DivergenceError`).
* `close_all`: closes the metric writer and the checkpointer, quietly after
  another error.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Optional

from coe_jax import storage
from coe_jax.errors import ConfigError, DivergenceError, StorageError
from coe_jax.training.checkpoint import intact_note
from coe_jax.training.workdir_lock import WorkdirLock


def check_workdir(workdir: str) -> None:
  """ConfigError unless `workdir` is given and is a directory or does not exist yet."""
  if not workdir:
    raise ConfigError("--workdir: missing ; a directory (new, or a run to resume)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(
      f"--workdir: {workdir} is a file, not a directory ; a new directory or a run to resume"
    )


@contextlib.contextmanager
def held_workdir(workdir: str, lock: bool = True) -> Iterator[None]:
  """The run's hold on `workdir` (see the module docstring); `lock=False` on processes > 0."""
  created = not os.path.exists(workdir)
  held = WorkdirLock(workdir) if lock else None
  try:
    if held is not None:
      held.acquire()
    yield
  except Exception as error:
    kept = intact_note(os.path.join(workdir, "checkpoints"))
    failure = storage.storage_error(error, "the run's files", workdir, kept=kept)
    if failure is None or (failure is error and failure.says_what_is_kept):
      raise
    if not failure.says_what_is_kept:  # e.g. the token cache: add what is intact
      failure = StorageError(f"{failure} ; {kept}", failure.path, True)
    raise failure from error
  finally:
    if held is not None:
      held.release()
      if created and os.path.isdir(workdir) and not os.listdir(workdir):
        with contextlib.suppress(OSError):
          os.rmdir(workdir)  # a run that failed before writing anything leaves no empty workdir


def check_finite(
  step: int, loss: float, grad_norm: float, last_checkpoint: Optional[int], workdir: str
) -> None:
  """Raises before a step whose loss or gradient is NaN/Inf can be logged or checkpointed.

  A non-finite gradient norm means the step's update already spoiled the
  params even when the loss (computed before the update) is still finite.
  """
  if math.isfinite(loss) and math.isfinite(grad_norm):
    return
  where = (
    f"the last good checkpoint (step {last_checkpoint}) is intact under {workdir}/checkpoints"
    if last_checkpoint is not None
    else "no checkpoint was written"
  )
  raise DivergenceError(
    f"train/loss: {loss} at step {step} (gradient norm {grad_norm}); stopping ; {where}; "
    "lower train.lr or raise train.warmup_fraction and resume"
  )


def close_all(writer: Optional[Any], checkpointer: Any, quiet: bool) -> None:
  """Closes the metric writer and the checkpointer (which removes a failed save's partial
  directory); with `quiet`, after another error, their own failures are not raised."""
  for close in ([writer.close] if writer is not None else []) + [checkpointer.close]:
    try:
      close()
    except Exception:
      if not quiet:
        raise
