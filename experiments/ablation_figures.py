"""The ablation figures: validation loss against step, and its paired difference, per figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.ablation_results import RunResult

# The paper's figures: file stem -> (title, configs drawn).
FIGURES: dict[str, tuple[str, tuple[str, ...]]] = {
  "main": ("MoE(K=8) vs CoE(C=2,K=4)", ("moe_k8", "coe_c2")),
  "scaling": ("Wider top-K vs iteration", ("moe_k8", "moe_k16", "moe_k24", "coe_c2")),
  "layers": ("Deeper MoE vs iteration", ("moe_k8", "moe_k8_l8", "moe_k8_l12", "coe_c2")),
  "efficiency": ("Fewer experts: N=48 vs N=64", ("moe_k8", "moe_k8_n48", "coe_c2", "coe_c2_n48")),
  "ablation": (
    "Residual and gate ablations (C=2, K=8)",
    ("coe_c2_k8", "coe_c2_k8_outer_residual", "coe_c2_k8_shared_gate"),
  ),
  "dense": ("Dense-style layers (K=N)", ("dense_c1", "dense_c2")),
}


def _seed_curves(result: RunResult) -> tuple[np.ndarray, dict[int, np.ndarray]]:
  """(steps, {seed: val losses}) over the validation steps every seed of `result` reached."""
  length = min(len(steps) for steps, _ in result.curves)
  steps = result.curves[0][0][:length]
  return steps, {seed: losses[:length] for seed, (_, losses) in zip(result.seeds, result.curves)}


def paired_curve(result: RunResult, reference: RunResult) -> tuple[np.ndarray, np.ndarray]:
  """(steps, [seeds, steps] val-loss differences to `reference`) over seeds and steps both have."""
  steps, curves = _seed_curves(result)
  ref_steps, ref_curves = _seed_curves(reference)
  length = min(len(steps), len(ref_steps))
  seeds = [s for s in curves if s in ref_curves]
  diffs = np.stack([curves[s][:length] - ref_curves[s][:length] for s in seeds]) if seeds else None
  return steps[:length], diffs


def _band(ax, steps: np.ndarray, values: np.ndarray, label: str, **style) -> str:
  """Mean over the first axis, shaded between its min and max; returns the line's colour."""
  (line,) = ax.plot(steps, values.mean(0), label=label, **style)
  ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
  return line.get_color()


def _seed_lines(
  ax, steps: np.ndarray, values: np.ndarray, seeds: Sequence[int], color: str
) -> None:
  """One thin line per seed (row of `values`), its seed written at its last point."""
  for seed, row in zip(seeds, values):
    ax.plot(steps, row, color=color, linewidth=0.7, alpha=0.8, linestyle=":")
    ax.annotate(f"s{seed}", (steps[-1], row[-1]), fontsize=6, color=color)


def plot_figure(stem: str, title: str, results: Sequence[RunResult], results_dir: Path) -> Path:
  """Two panels against step: validation loss, and its paired difference to the first config.

  Each thick line is the mean over seeds, shaded between the seeds' min and max; the difference
  panel also draws every seed's own paired difference (dotted, labelled s<seed>).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (loss_ax, diff_ax) = plt.subplots(1, 2, figsize=(11, 4))
  reference = results[0]
  for r in results:
    steps, curves = _seed_curves(r)
    label = f"{r.paper_name}: {r.val_mean:.3f}" + (
      "" if math.isnan(r.paper_val_loss) else f" (paper {r.paper_val_loss:.3f})"
    )
    _band(loss_ax, steps, np.stack(list(curves.values())), label)
    diff_steps, diffs = paired_curve(r, reference)
    if diffs is not None:
      color = _band(diff_ax, diff_steps, diffs, r.paper_name)
      if r is not reference:
        paired_seeds = [s for s in r.seeds if s in reference.seeds]
        _seed_lines(diff_ax, diff_steps, diffs, paired_seeds, color)
  loss_ax.set(xlabel="step", ylabel="validation loss", title=title)
  loss_ax.legend(fontsize=8)
  diff_ax.axhline(0.0, color="black", linewidth=0.5)
  diff_ax.set(
    xlabel="step",
    ylabel=f"val loss minus {reference.paper_name}'s (same seed)",
    title=f"Paired difference to {reference.paper_name}",
  )
  diff_ax.legend(fontsize=8)
  fig.tight_layout()
  path = results_dir / f"{stem}.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_figures(results: dict[str, RunResult], results_dir: Path) -> list[Path]:
  """One PNG per figure of `FIGURES` with at least one finished config."""
  paths = []
  for stem, (title, names) in FIGURES.items():
    drawn = [results[n] for n in names if n in results]
    if drawn:
      paths.append(plot_figure(stem, title, drawn, results_dir))
  return paths
