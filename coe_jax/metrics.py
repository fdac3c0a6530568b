"""Metric output: metrics.jsonl, TensorBoard event files and a loss-curve PNG."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
  """Flattens arrays of shape [C] into name/0, name/1, ... scalars."""
  out: dict[str, float] = {}
  for name, value in values.items():
    array = np.asarray(value)
    if array.ndim == 0:
      out[name] = float(array)
    else:
      for i, v in enumerate(array.reshape(-1)):
        out[f"{name}/{i}"] = float(v)
  return out


class MetricWriter:
  """Appends one JSON object per call to `workdir/metrics.jsonl` and to TensorBoard.

  With `resume_step` (the step a run restarts from, 0 for a fresh start), rows
  logged after it by an earlier, interrupted run are dropped from
  metrics.jsonl and purged from TensorBoard, so a resumed run's steps appear
  once.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, resume_step: Optional[int] = None):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None:
      truncate_metrics_after(workdir, resume_step)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      purge_step = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)

  def write(self, step: int, values: Mapping[str, Any]) -> dict[str, float]:
    scalars = _scalars(values)
    self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, int(step))
    return scalars

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics_after(workdir: str, step: int) -> None:
  """Drops lines logged after `step` (a resumed run rewrites them)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  rows = [r for r in read_metrics(workdir) if r["step"] <= step]
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def plot_losses(workdir: str, title: str = "") -> str:
  """Writes `workdir/loss.png` with train and validation loss against step; returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  fig, ax = plt.subplots(figsize=(6, 4))
  train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
  if train:
    ax.plot(*zip(*train), label="train", alpha=0.7)
  if val:
    ax.plot(*zip(*val), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy")
  ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  path = os.path.join(workdir, "loss.png")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
