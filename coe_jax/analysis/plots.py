"""Matplotlib figures of routing statistics.

Each helper returns a `matplotlib.figure.Figure` built without pyplot (no
global state, nothing shown or leaked): display it in a notebook as the cell's
value or `display(fig)`, or save it with `fig.savefig(path)`.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from coe_jax.analysis.statistics import CoSelection, Drops, LoadStats

DEFAULT_SUMMARY_COLUMNS = ("load_cv", "normalized_entropy", "top1_weight", "reselection_rate")


def _bars_per_iteration(
  values: np.ndarray,
  reference: Optional[float],
  ylabel: str,
  subtitles: Sequence[str],
  title: Optional[str],
) -> Figure:
  """One bar chart per iteration of values <[C, N]>, sharing the y axis."""
  chain, n = values.shape
  fig = Figure(figsize=(4.2 * chain, 3.0), layout="constrained")
  axes = fig.subplots(1, chain, sharey=True, squeeze=False)[0]
  for t, ax in enumerate(axes):
    ax.bar(np.arange(n), values[t], width=0.85, color=f"C{t}")
    if reference is not None:
      ax.axhline(reference, color="k", linestyle="--", linewidth=1, label="uniform")
      ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title(subtitles[t], fontsize=10)
  axes[0].set_ylabel(ylabel)
  if title:
    fig.suptitle(title)
  return fig


def plot_load(load: LoadStats, layer: int = 0, title: Optional[str] = None) -> Figure:
  """Bar chart of each expert's share of the assignments, one panel per iteration of `layer`."""
  n = load.counts.shape[-1]
  chain = load.counts.shape[1]
  subtitles = [
    f"iteration {t}: CV {load.cv[layer, t]:.2f}, max/mean {load.max_over_mean[layer, t]:.2f}"
    for t in range(chain)
  ]
  return _bars_per_iteration(
    load.fraction[layer],
    1.0 / n,
    "share of assignments",
    subtitles,
    title or f"expert load, layer {layer}",
  )


def plot_dropped(drops: Drops, layer: int = 0, title: Optional[str] = None) -> Figure:
  """Bar chart of each expert's dropped share of its assignments, one panel per iteration."""
  chain = drops.counts.shape[1]
  subtitles = [
    f"iteration {t}: {100 * drops.fraction[layer, t]:.1f}% dropped" for t in range(chain)
  ]
  return _bars_per_iteration(
    drops.per_expert[layer],
    None,
    "dropped share",
    subtitles,
    title or f"dropped over capacity, layer {layer}",
  )


def plot_co_selection(
  co: CoSelection,
  layer: int = 0,
  transition: int = 0,
  conditional: bool = True,
  title: Optional[str] = None,
) -> Figure:
  """Heatmap of expert i at iteration `transition` (rows) against j at the next one (columns).

  `conditional=True` shows P(j at t+1 | i at t) (rows sum to K); False shows token counts.
  """
  if co.counts.shape[1] == 0:
    raise ValueError("co-selection needs at least two iterations (C >= 2); got C = 1")
  values = (co.conditional if conditional else co.counts)[layer, transition]
  fig = Figure(figsize=(5.2, 4.4), layout="constrained")
  ax = fig.subplots()
  image = ax.imshow(values, cmap="viridis", interpolation="nearest")
  fig.colorbar(image, ax=ax, label="P(j at t+1 | i at t)" if conditional else "tokens")
  ax.set_xlabel(f"expert j at iteration {transition + 1}")
  ax.set_ylabel(f"expert i at iteration {transition}")
  diagonal = np.diagonal(co.conditional[layer, transition])
  ax.set_title(
    title or f"co-selection, layer {layer} (mean diagonal {diagonal.mean():.3f})", fontsize=10
  )
  return fig


def plot_iteration_summary(
  tables: Mapping[str, pd.DataFrame],
  columns: Sequence[str] = DEFAULT_SUMMARY_COLUMNS,
  title: Optional[str] = None,
) -> Figure:
  """Grouped bars comparing models: one panel per column of `iteration_table`, one bar
  per (model, layer, iteration). Missing values (re-selection at iteration 0) are left out."""
  fig = Figure(figsize=(4.0 * len(columns), 3.4), layout="constrained")
  axes = fig.subplots(1, len(columns), squeeze=False)[0]
  names = list(tables)
  for ax, column in zip(axes, columns):
    labels: list[str] = []
    for position, name in enumerate(names):
      rows = tables[name].dropna(subset=[column])
      x = np.arange(len(labels), len(labels) + len(rows))
      ax.bar(x, rows[column].to_numpy(), color=f"C{position}", label=name)
      labels += [f"L{r.layer} t{r.iteration}" for r in rows.itertuples()]
    ax.set_xticks(np.arange(len(labels)), labels, rotation=60, fontsize=8)
    ax.set_title(column, fontsize=10)
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
  if title:
    fig.suptitle(title)
  return fig
