"""Metric output: metrics.jsonl, TensorBoard event files, a loss-curve PNG, optionally W&B;
`TrainLog` turns the train loop's steps into rows (throughput, MFU) and progress-bar text."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from coe_jax.training.optimizer import learning_rate_schedule

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
      # tensorboardX names the event file by the wall-clock second alone and opens it with "wb":
      # a run resumed within the second the previous one started would overwrite its events.
      # The nanosecond suffix keeps the names distinct and sorted in creation order.
      self._tb = SummaryWriter(
        os.path.join(workdir, "tensorboard"),
        purge_step=purge_step,
        filename_suffix=f".{time.time_ns()}",
      )
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
  """The rows of `workdir/metrics.jsonl`; a last line cut short by a killed run is skipped."""
  path = os.path.join(workdir, METRICS_FILE)
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
  return rows


def truncate_metrics_after(workdir: str, step: int) -> None:
  """Drops lines logged after `step` (a resumed run rewrites them)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  rows = [r for r in read_metrics(workdir) if r["step"] <= step]
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:  # then renamed: a kill -9 meanwhile loses no row
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


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


def compiled_memory_split(compiled) -> Optional[tuple[int, int]]:
  """(resident, temporary) bytes of a compiled XLA program, or None where the backend does not
  say: resident = arguments + outputs - aliased (what stays between calls when the inputs are
  donated), temporary = the buffer each call allocates."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return None
  if stats is None:
    return None
  resident = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
  return int(resident), int(stats.temp_size_in_bytes)


def compiled_memory_bytes(compiled) -> Optional[int]:
  """Peak bytes of a compiled XLA program: arguments + outputs + temporaries - aliased."""
  split = compiled_memory_split(compiled)
  return None if split is None else sum(split)


def device_peak_bytes() -> Optional[int]:
  """The first device's peak bytes in use so far, where it reports them (GPU/TPU; None on CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return int(peak) if peak is not None else None


class TrainLog:
  """Turns each step's fetched metrics into rows (metrics.jsonl, TensorBoard, W&B) and the
  progress bar's text; `writer` and `bar` are None / plain on processes other than 0."""

  def __init__(
    self,
    writer,
    bar,
    train_cfg: ml_collections.ConfigDict,
    tokens_per_step: int,
    train_flops_per_token: float,
    num_devices: int,
    peak_tflops: Optional[float],
  ):
    self.writer, self.bar, self.train_cfg = writer, bar, train_cfg
    self.tokens_per_step = tokens_per_step
    self.train_flops_per_token = train_flops_per_token
    self.flops_per_step_per_device = train_flops_per_token * tokens_per_step / num_devices
    self.peak_tflops = peak_tflops
    self.step_times: list[float] = []
    self.restart_clock()

  def restart_clock(self) -> None:
    """Time from here (after compiling, evaluating or checkpointing, which steps do not pay)."""
    self.tick = time.perf_counter()
    self.steps_since_row = 0

  def step(
    self, done: int, metrics: dict, force: bool = False, extra: Optional[dict] = None
  ) -> None:
    """Accounts one finished step; writes a row every train.log_every steps or when `force`."""
    self.steps_since_row += 1
    if not (force or done % self.train_cfg.log_every == 0):
      return
    now = time.perf_counter()
    step_time = (now - self.tick) / self.steps_since_row
    self.tick, self.steps_since_row = now, 0
    self.step_times.append(step_time)
    row = {f"train/{k}": v for k, v in metrics.items()}
    row["train/lr"] = float(learning_rate_schedule(self.train_cfg)(done - 1))
    row["train/model_flops_per_token"] = self.train_flops_per_token  # coe_jax.nn.flops, fwd + bwd
    row.update(self.throughput(step_time))
    row.update(extra or {})
    if self.writer is not None:
      self.writer.write(done, row)
    if hasattr(self.bar, "set_postfix"):
      postfix = dict(
        loss=f"{float(metrics['loss']):.3f}",
        tok_s=f"{row['train/tokens_per_sec']:,.0f}",
        tflops_dev=f"{row['train/tflops_per_sec_per_device']:.3g}",
      )
      if "train/mfu" in row:
        postfix["mfu"] = f"{100 * row['train/mfu']:.1f}%"
      if "val/loss" in row:
        postfix["val"] = f"{row['val/loss']:.3f}"
      self.bar.set_postfix(**postfix)

  def throughput(self, step_time: float) -> dict[str, float]:
    """tokens/s, model TFLOP/s per device and (with a known peak) MFU of a step time."""
    tflops = self.flops_per_step_per_device / step_time / 1e12
    out = {
      "train/tokens_per_sec": self.tokens_per_step / step_time,
      "train/step_seconds": step_time,
      "train/tflops_per_sec_per_device": tflops,
    }
    if self.peak_tflops:
      out["train/mfu"] = tflops / self.peak_tflops
    return out
