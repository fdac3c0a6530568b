"""The run's `summary.json`: the model and devices up front, the outcome at the end."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np

from coe_jax import storage
from coe_jax.nn.flops import FlopCount
from coe_jax.nn.model_config import ModelConfig
from coe_jax.nn.params import count_params
from coe_jax.training.metrics import TrainLog, device_peak_bytes, plot_losses


def start_summary(model_config: ModelConfig, flops: FlopCount, peak: Optional[float]) -> dict:
  """What is known before the first step: parameter counts, FLOPs per token, devices."""
  counts = count_params(model_config)
  return dict(
    params_total=counts.total,
    params_active=counts.active_per_token,
    params_non_embedding=counts.non_embedding,
    vocab_size=model_config.vocab_size,
    train_flops_per_token=flops.train,
    peak_tflops_per_device=peak,
    processes=jax.process_count(),
    devices=jax.device_count(),
  )


def finish_summary(
  summary: dict[str, Any],
  *,
  final_step: int,
  steps: int,
  losses: list[float],
  val_loss: Optional[float],
  log: Optional[TrainLog],
  tokens_per_step: int,
) -> None:
  """Adds the outcome: step reached, first/last losses, the median step time and throughput.

  The first logged step time is left out of the median when there are others
  (it pays for warming up).
  """
  step_times = log.step_times if log is not None else []
  steady = step_times[1:] or step_times
  median = float(np.median(steady)) if steady else None
  summary.update(
    step=final_step,
    first_train_loss=losses[0] if losses else None,
    last_train_loss=losses[-1] if losses else None,
    final_val_loss=val_loss,
    step_seconds_median=median,
    tokens_per_sec=float(tokens_per_step / median) if steady else None,
    completed=final_step >= steps,
    device_peak_bytes=device_peak_bytes(),
  )
  if steady:
    summary.update(
      {
        key.split("/")[-1]: value
        for key, value in log.throughput(median).items()
        if key in ("train/tflops_per_sec_per_device", "train/mfu")
      }
    )


def write_run_outputs(workdir: str, summary: dict[str, Any], progress: bool) -> None:
  """loss.png and summary.json in `workdir` (process 0); with `progress`, where they are."""
  summary["loss_png"] = plot_losses(workdir, title=os.path.basename(os.path.abspath(workdir)))
  storage.write_text_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  if progress:
    print(
      f"\nRun directory: {os.path.abspath(workdir)}\n"
      f"  metrics:     {os.path.join(workdir, 'metrics.jsonl')}\n"
      f"  tensorboard: {os.path.join(workdir, 'tensorboard')}\n"
      f"  loss curve:  {summary['loss_png']}\n"
      f"  checkpoint:  {os.path.join(workdir, 'checkpoints')} (step {summary['step']})"
    )
