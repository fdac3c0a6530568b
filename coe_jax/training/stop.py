"""`StopRequest`: SIGTERM/SIGINT asks the training loop to checkpoint and stop, on every process.

A signal sets this process's request. In one process that request is the decision,
read at the next step. With several processes it is cast into a `multihost.StopVote`
with each step and read one step later, with that step's metrics: every process reads
the same vote at the same step, so all of them stop after the same step and save the
same checkpoint.
"""

from __future__ import annotations

import signal
from typing import Any, Optional

import jax

from coe_jax.training import multihost

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """This process's stop request (set by SIGTERM/SIGINT) and the processes' vote on it.

  Use as a context manager: the handlers are installed on entry and the previous
  ones restored on exit, whatever ends the loop.
  """

  def __init__(self, vote: Optional[multihost.StopVote]):
    self.signal: Optional[int] = None
    self._vote = vote
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "StopRequest":
    for sig in _SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside a notebook worker)
        pass
    return self

  def __exit__(self, *exc_info: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.signal = signum

  def cast(self) -> Optional[jax.Array]:
    """This process's request as a vote (a device scalar, not waited for); None in one process."""
    return None if self._vote is None else self._vote.cast(self.signal is not None)

  def requested_here(self) -> bool:
    """Whether one process (no vote to wait for) was asked to stop."""
    return self._vote is None and self.signal is not None

  @staticmethod
  def agreed(vote: Optional[jax.Array]) -> bool:
    """Whether a cast vote says some process asked to stop (reads it from the device)."""
    return vote is not None and bool(jax.device_get(vote))
