"""`ProfileWindow`: a JAX profiler trace of the training steps `train.profile_steps` names."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax


class ProfileWindow:
  """Traces the steps logged as START+1 .. STOP (`train_config.profile_window`) into `trace_dir`.

  `trace_dir` is `<workdir>/tensorboard` on process 0 (TensorBoard's profile plugin
  reads it there) and `<workdir>/tensorboard/process_<i>` on the others.
  """

  def __init__(self, window: Optional[tuple[int, int]], workdir: str):
    self.window = window
    process = jax.process_index()
    self.trace_dir = os.path.join(
      workdir, "tensorboard", *(() if process == 0 else (f"process_{process}",))
    )
    self.tracing = False
    self.written: Optional[str] = None  # trace_dir once a trace has been written

  def before_step(self, step: int) -> None:
    """Starts the trace when `step` (0-based) is the window's first."""
    if self.window is not None and not self.tracing and self.window[0] <= step < self.window[1]:
      jax.profiler.start_trace(self.trace_dir)
      self.tracing = True

  def after_step(self, done: int, state: Any) -> None:
    """Stops the trace once `done` steps have been dispatched to the window's end and run."""
    if self.tracing and done >= self.window[1]:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    """Stops a trace still running (the loop ended inside the window, or failed)."""
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False
      self.written = self.trace_dir
