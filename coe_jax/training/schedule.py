"""`StepSchedule`: after which steps the training loop evaluates, checkpoints or stops."""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections


@dataclasses.dataclass(frozen=True)
class StepSchedule:
  """The loop's boundaries, by `done` (steps completed, 1-based).

  Every `eval_every` and `checkpoint_every` steps (0 = never) and the last of
  `steps` both evaluate and checkpoint. `stop_at_step` simulates an interruption:
  the run checkpoints there and returns, as it does on SIGTERM/SIGINT.
  """

  steps: int
  eval_every: int
  checkpoint_every: int
  stop_at_step: Optional[int] = None

  @classmethod
  def of(cls, train: ml_collections.ConfigDict, stop_at_step: Optional[int]) -> "StepSchedule":
    return cls(train.steps, train.eval_every, train.checkpoint_every, stop_at_step)

  def end(self, start: int) -> int:
    """The step (0-based, exclusive) the loop runs to from `start`."""
    if self.stop_at_step is None:
      return self.steps
    return max(start, min(self.steps, self.stop_at_step))

  def evaluates(self, done: int) -> bool:
    return done == self.steps or bool(self.eval_every and done % self.eval_every == 0)

  def checkpoints(self, done: int) -> bool:
    return done == self.steps or bool(self.checkpoint_every and done % self.checkpoint_every == 0)

  def interrupts(self, done: int) -> bool:
    """Whether `stop_at_step` ends the run after `done` steps."""
    return self.stop_at_step is not None and done >= self.stop_at_step
