"""Metric output: metrics.jsonl, TensorBoard event files, a loss-curve PNG, optionally W&B."""

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

  With `wandb_project` (and the `wandb` package importable) every row also goes
  to that Weights & Biases project; the run id is kept in `workdir/wandb_run_id`
  so a resumed run continues the same W&B run. Without the package nothing
  else changes.
  """

  def __init__(
    self,
    workdir: str,
    tensorboard: bool = True,
    resume_step: Optional[int] = None,
    wandb_project: str = "",
    wandb_config: Optional[dict] = None,
  ):
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
    self._wandb = start_wandb(workdir, wandb_project, wandb_config) if wandb_project else None

  def write(self, step: int, values: Mapping[str, Any]) -> dict[str, float]:
    scalars = _scalars(values)
    self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, int(step))
    if self._wandb is not None:
      self._wandb.log(scalars, step=int(step))
    return scalars

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


WANDB_ID_FILE = "wandb_run_id"


def start_wandb(workdir: str, project: str, config: Optional[dict] = None):
  """A W&B run of `project` for `workdir` (resumed when the workdir has one), or None.

  None, with a note on stderr, when the `wandb` package is not installed.
  """
  try:
    import wandb
  except ImportError:
    import sys

    print(
      f"train.wandb_project={project!r}, but wandb is not installed (pip install wandb); "
      "logging to metrics.jsonl and TensorBoard only.",
      file=sys.stderr,
    )
    return None
  id_path = os.path.join(workdir, WANDB_ID_FILE)
  if os.path.isfile(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = wandb.util.generate_id()
    with open(id_path, "w") as f:
      f.write(run_id)
  return wandb.init(
    project=project,
    id=run_id,
    resume="allow",
    dir=workdir,
    config=config,
    name=os.path.basename(os.path.abspath(workdir)),
  )


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
