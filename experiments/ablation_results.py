"""The measurements of finished ablation runs: one `RunResult` per config, over its seeds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

from experiments.ablation_runner import is_finished, load_config, run_dir


@dataclasses.dataclass
class RunResult:
  """One config's measurements over its finished seeds."""

  name: str
  paper_name: str
  c: int
  k: int
  n: int
  layers: int
  paper_val_loss: float
  seeds: list[int]
  val_losses: list[float]  # final validation loss per seed in `seeds`
  params_total: int
  params_active: int
  peak_bytes: Optional[int]
  step_seconds: float
  tokens_per_sec: float
  curves: list[tuple[np.ndarray, np.ndarray]]  # per seed: (steps, val loss)

  @property
  def val_mean(self) -> float:
    return float(np.mean(self.val_losses))

  @property
  def val_spread(self) -> float:
    """Sample standard deviation over seeds (0 with one seed)."""
    return float(np.std(self.val_losses, ddof=1)) if len(self.val_losses) > 1 else 0.0


def _val_curve(workdir: Path) -> tuple[np.ndarray, np.ndarray]:
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if line.strip()]
  points = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
  steps, losses = zip(*points) if points else ((), ())
  return np.asarray(steps), np.asarray(losses)


def collect(name: str, scale: str, runs_dir: Path, seeds: int) -> Optional[RunResult]:
  """The finished seeds of `name`, or None if none finished."""
  finished = [s for s in range(seeds) if is_finished(run_dir(runs_dir, name, s))]
  if not finished:
    return None
  done = [run_dir(runs_dir, name, s) for s in finished]
  summaries = [json.load(open(w / "summary.json")) for w in done]
  paper = load_config(name, scale).paper
  peaks = [s.get("device_peak_bytes") or s.get("train_step_peak_bytes") for s in summaries]
  return RunResult(
    name=name,
    paper_name=paper.name,
    c=paper.c,
    k=paper.k,
    n=paper.n,
    layers=paper.layers,
    paper_val_loss=paper.val_loss,
    seeds=finished,
    val_losses=[s["final_val_loss"] for s in summaries],
    params_total=summaries[0]["params_total"],
    params_active=summaries[0]["params_active"],
    peak_bytes=max(peaks) if all(p is not None for p in peaks) else None,
    step_seconds=float(np.median([s["step_seconds_median"] for s in summaries])),
    tokens_per_sec=float(np.median([s["tokens_per_sec"] for s in summaries])),
    curves=[_val_curve(w) for w in done],
  )


def paired_differences(result: RunResult, baseline: RunResult) -> np.ndarray:
  """`result`'s final val loss minus `baseline`'s, per seed both finished.

  Runs with the same seed see the same batches in the same order, so the
  difference cancels the data-order noise the two share.
  """
  base = dict(zip(baseline.seeds, baseline.val_losses))
  return np.asarray(
    [loss - base[s] for s, loss in zip(result.seeds, result.val_losses) if s in base]
  )
