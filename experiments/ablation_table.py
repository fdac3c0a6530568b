"""The ablation table: `table.md` and `table.csv`, with the memory saving and the claims."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from coe_jax import config_lib
from coe_jax.nn.params import count_params
from experiments.ablation_results import RunResult, paired_differences
from experiments.ablation_runner import load_config
from experiments.ablation_verdict import CLAIM_COLUMNS, claim_rows

PAPER_MEMORY_SAVING_PERCENT = 17.6  # CoE(N=48) vs MoE(N=64) total parameters, paper section 4
MEMORY_PAIR = ("coe_c2_n48", "moe_k8")  # (smaller, reference)

BASELINE = "moe_k8"  # the paired differences are taken against this run
COLUMNS = (
  "config",
  "paper run",
  "paper C",  # the paper run's C, K, N and layers; a scale's own are in the recipe line
  "paper K",
  "paper N",
  "paper layers",
  "seeds",
  "val loss mean",
  "val loss sd",
  f"paired diff vs {BASELINE}",
  "paired diff sd",
  "paper val loss",
  f"paper diff vs {BASELINE}",
  "params total",
  "params active/token",
  "param MB fp32",
  "param MB bf16",
  "train step peak MB",
  "step s",
  "tokens/s",
)


def _mean_sd(values: np.ndarray) -> tuple[str, str]:
  if values.size == 0:
    return "n/a", "n/a"
  sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
  return f"{float(np.mean(values)):+.4f}", f"{sd:.4f}"


def table_rows(results: Sequence[RunResult]) -> list[list[str]]:
  baseline = next((r for r in results if r.name == BASELINE), None)
  rows = []
  for r in results:
    peak = f"{r.peak_bytes / 2**20:.1f}" if r.peak_bytes is not None else "n/a"
    paper = "" if math.isnan(r.paper_val_loss) else f"{r.paper_val_loss:.3f}"
    diff, diff_sd = _mean_sd(paired_differences(r, baseline) if baseline else np.zeros(0))
    paper_diff = (
      ""
      if math.isnan(r.paper_val_loss) or baseline is None
      else f"{r.paper_val_loss - baseline.paper_val_loss:+.3f}"
    )
    rows.append(
      [
        r.name,
        r.paper_name,
        str(r.c),
        str(r.k),
        str(r.n),
        str(r.layers),
        str(len(r.val_losses)),
        f"{r.val_mean:.4f}",
        f"{r.val_spread:.4f}",
        diff,
        diff_sd,
        paper,
        paper_diff,
        str(r.params_total),
        str(r.params_active),
        f"{4 * r.params_total / 2**20:.2f}",
        f"{2 * r.params_total / 2**20:.2f}",
        peak,
        f"{r.step_seconds:.3f}",
        f"{r.tokens_per_sec:.0f}",
      ]
    )
  return rows


def memory_saving_percent(smaller_params: int, reference_params: int) -> float:
  """How much smaller `smaller_params` is than `reference_params`, in percent."""
  return 100.0 * (1.0 - smaller_params / reference_params)


def paper_scale_memory_saving() -> float:
  """CoE(N=48) vs MoE(N=64) total-parameter saving at the paper's scale (analytic, vocab 102400)."""
  small, ref = (
    count_params(config_lib.model_config_from(load_config(n, "paper"))) for n in MEMORY_PAIR
  )
  return memory_saving_percent(small.total, ref.total)


def memory_lines(results: dict[str, RunResult]) -> list[str]:
  lines = [
    f"Parameter-memory saving of CoE(C=2,K=4,N=48) against MoE(K=8,N=64) (total parameters, "
    f"embeddings and head included; the paper: {PAPER_MEMORY_SAVING_PERCENT}%):",
    f"- paper scale, analytic count: {paper_scale_memory_saving():.1f}%",
  ]
  small, ref = (results.get(n) for n in MEMORY_PAIR)
  if small and ref:
    lines.append(
      f"- this table's scale: {memory_saving_percent(small.params_total, ref.params_total):.1f}% "
      f"({small.params_total:,} vs {ref.params_total:,} parameters)"
    )
  return lines


def write_table(results: Sequence[RunResult], results_dir: Path, recipe_line: str) -> None:
  rows = table_rows(results)
  with open(results_dir / "table.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    writer.writerows(rows)
  lines = [
    f"Recipe: {recipe_line}",
    "",
    "| " + " | ".join(COLUMNS) + " |",
    "|" + "---|" * len(COLUMNS),
  ]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  lines += [""] + memory_lines({r.name: r for r in results})
  claims = claim_rows({r.name: r for r in results})
  if claims:
    lines += [
      "",
      "Validation-loss differences A - B behind the paper's claims (negative: A lower; "
      "ours paired by seed):",
      "",
      "| " + " | ".join(CLAIM_COLUMNS) + " |",
      "|" + "---|" * len(CLAIM_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in claims]
  (results_dir / "table.md").write_text("\n".join(lines) + "\n")
