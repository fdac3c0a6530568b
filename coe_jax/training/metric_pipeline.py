"""`MetricPipeline`: each train step's metrics are read on the host one step late.

The loop dispatches step N+1 before reading step N's metrics, so the host never
waits on the device just to log; a step that evaluates or checkpoints is read at
once, as it must be. Every read checks the loss and gradient norm finite before
anything logs or saves them (`run_guard.check_finite`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from coe_jax.training import run_guard
from coe_jax.training.metrics import TrainLog
from coe_jax.training.stop import StopRequest


@dataclasses.dataclass
class LaunchedStep:
  """A train step dispatched to the device whose metrics the host has not read yet."""

  done: int  # steps completed once it has run
  metrics: Any  # device arrays
  vote: Optional[jax.Array]  # the processes' stop vote cast with it; None in one process


class MetricPipeline:
  """Reads launched steps' metrics, logs them (`TrainLog`) and keeps the train losses."""

  def __init__(self, log: TrainLog, workdir: str, last_checkpoint: Optional[int]):
    self.log = log
    self.workdir = workdir
    self.last_checkpoint = last_checkpoint  # named by the error when a loss diverges
    self.losses: list[float] = []
    self._deferred: Optional[LaunchedStep] = None

  def read(self, launched: LaunchedStep) -> tuple[dict, bool]:
    """(the step's metrics on the host, checked finite; whether its vote says stop)."""
    metrics = jax.device_get(launched.metrics)
    agreed = StopRequest.agreed(launched.vote)
    loss = float(metrics["loss"])
    run_guard.check_finite(
      launched.done, loss, float(metrics["grad_norm"]), self.last_checkpoint, self.workdir
    )
    self.losses.append(loss)
    return metrics, agreed

  def defer(self, launched: LaunchedStep) -> None:
    """Keeps `launched` to be read after the next step is dispatched."""
    self._deferred = launched

  def read_deferred(self) -> bool:
    """Reads and logs the deferred step, if any; returns whether its vote says stop."""
    if self._deferred is None:
      return False
    launched, self._deferred = self._deferred, None
    metrics, agreed = self.read(launched)
    self.log.step(launched.done, metrics)
    return agreed

  def checkpointed(self, done: int) -> None:
    """Records that step `done` has been saved."""
    self.last_checkpoint = done
