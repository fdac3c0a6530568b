"""Routing analysis of trained runs: prints the key numbers and writes figures and tables.

    python -m experiments.analyze_routing runs/analysis_coe runs/analysis_moe \
        --rows=64 --out=runs/routing_analysis

For every run directory (written by `python -m coe_jax.main`) it restores the
latest checkpoint, routes the first `--rows` validation sequences of the run's
own data (training capacity factor unless `--eval_capacity`), and writes under
`--out/<run name>/` (the directory's name, with as many parent names as it takes to be
unique): `iterations.csv`, `layers.csv`, `experts.csv`,
`load_layer<l>.png`, `co_selection_layer<l>.png` (C >= 2), `dropped_layer<l>.png`;
plus `summary.png` comparing the runs and `summary.txt`, the printed numbers of every run. See `coe_jax.analysis` for definitions.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from coe_jax import analysis, host_memory


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", help="run directories to analyse")
  parser.add_argument("--rows", type=int, default=64, help="validation sequences to route")
  parser.add_argument("--out", default="runs/routing_analysis", help="output directory")
  parser.add_argument(
    "--eval_capacity",
    action="store_true",
    help="route with the evaluation capacity factor instead of the training one",
  )
  return parser.parse_args(argv)


def save_figure(fig, path: Path) -> None:
  fig.savefig(path, dpi=110)
  print(f"  wrote {path}")


def describe(name: str, run: analysis.Run, stats: analysis.RoutingStats, tokens: int) -> str:
  """The run's key routing numbers as text (printed, and kept for `summary.txt`)."""
  cfg = run.model.config
  coe = cfg.coe
  lines = []
  lines.append(
    f"\n== {name}: step {run.step}, C={coe.num_iterations}, K={coe.num_experts_per_tok}, "
    f"N_routed={coe.n_routed_experts}, layers={cfg.num_layers}, {tokens} real tokens"
  )
  for layer in range(stats.num_layers):
    lines.append(f" layer {layer}")
    for t in range(stats.num_iterations):
      load, confidence = stats.load, stats.confidence
      lines.append(
        f"  iteration {t}: load CV {load.cv[layer, t]:.3f}, max/mean "
        f"{load.max_over_mean[layer, t]:.2f}, entropy {confidence.entropy[layer, t]:.3f} "
        f"nats ({confidence.normalized_entropy[layer, t]:.3f} of log N), top-1 weight "
        f"{confidence.top1_weight[layer, t]:.3f}, dropped {stats.drops.fraction[layer, t]:.4f}"
      )
    again, combos = stats.reselection, stats.combinations
    chance_diagonal = coe.num_experts_per_tok / stats.num_experts
    for t in range(stats.num_iterations - 1):
      diagonal = stats.co_selection.diagonal[layer, t]
      lines.append(
        f"  {t}->{t + 1}: re-selection rate {again.rate[layer, t]:.3f} (chance "
        f"{again.chance_rate:.3f}), mean overlap {again.mean_overlap[layer, t]:.3f} (chance "
        f"{again.chance_overlap:.3f}), co-selection diagonal mean {diagonal.mean():.3f} / max "
        f"{diagonal.max():.3f} (chance ~K/N = {chance_diagonal:.3f})"
      )
    lines.append(
      f"  combinations: {combos.distinct[layer]} distinct over {combos.num_tokens} tokens; "
      f"possible {combos.possible:,}; distinct sets per iteration "
      f"{combos.distinct_per_iteration[layer].tolist()} of {combos.possible_per_iteration:,}"
    )
  text = "\n".join(lines)
  print(text)
  return text


def run_names(workdirs: Sequence[str]) -> list[str]:
  """One output name per run directory: its last path component, or as many trailing
  components (joined by '_') as it takes to tell the runs apart (`moe_k8/seed0` and
  `coe_c2/seed0` become `moe_k8_seed0` and `coe_c2_seed0`)."""
  parts = [Path(os.path.abspath(w)).parts for w in workdirs]
  if len(set(parts)) < len(parts):
    raise ValueError(f"the same run directory is given twice: {list(workdirs)}")
  for depth in range(1, max(len(p) for p in parts) + 1):
    names = ["_".join(p[-depth:]).strip("/") for p in parts]
    if len(set(names)) == len(names):
      return names
  raise AssertionError("unreachable: distinct paths have distinct suffixes")


def analyse_run(
  workdir: str, name: str, rows: int, train_capacity: bool, out: Path
) -> tuple[str, pd.DataFrame, str]:
  run = analysis.load_run(workdir)
  routing = analysis.collect_routing(
    run.model, run.variables, analysis.validation_batch(run, rows), train=train_capacity
  )
  stats = analysis.analyze(routing)
  text = describe(name, run, stats, routing.num_tokens)
  directory = out / name
  directory.mkdir(parents=True, exist_ok=True)
  per_iteration = analysis.iteration_table(stats)
  per_iteration.to_csv(directory / "iterations.csv", index=False)
  analysis.layer_table(stats).to_csv(directory / "layers.csv", index=False)
  analysis.expert_table(stats).to_csv(directory / "experts.csv", index=False)
  for layer in range(stats.num_layers):
    save_figure(
      analysis.plot_load(stats.load, layer, f"{name}: expert load, layer {layer}"),
      directory / f"load_layer{layer}.png",
    )
    save_figure(analysis.plot_dropped(stats.drops, layer), directory / f"dropped_layer{layer}.png")
    if stats.num_iterations > 1:
      save_figure(
        analysis.plot_co_selection(stats.co_selection, layer),
        directory / f"co_selection_layer{layer}.png",
      )
  return name, per_iteration, text


def main(argv=None) -> None:
  args = parse_args(argv)
  out = Path(args.out)
  results = [
    analyse_run(w, name, args.rows, not args.eval_capacity, out)
    for w, name in zip(args.workdirs, run_names(args.workdirs))
  ]
  out.mkdir(parents=True, exist_ok=True)
  save_figure(
    analysis.plot_iteration_summary({name: table for name, table, _ in results}),
    out / "summary.png",
  )
  (out / "summary.txt").write_text("".join(f"{text}\n" for _, _, text in results))
  print(f"  wrote {out / 'summary.txt'}")


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # CPU: reuse the step's memory (PERF.md 19)
  main()
