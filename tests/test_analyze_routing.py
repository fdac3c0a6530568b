"""Tests for experiments/analyze_routing.py's naming of its outputs."""

from __future__ import annotations

import pytest

from experiments import analyze_routing


def test_run_names_are_the_shortest_unique_suffixes():
  assert analyze_routing.run_names(["runs/a", "runs/b"]) == ["a", "b"]
  assert analyze_routing.run_names(["runs/x/moe_k8/seed0", "runs/x/coe_c2/seed0"]) == [
    "moe_k8_seed0",
    "coe_c2_seed0",
  ]
  assert analyze_routing.run_names(["p/moe_k8/seed0", "q/moe_k8/seed0", "q/coe/seed1"]) == [
    "p_moe_k8_seed0",
    "q_moe_k8_seed0",
    "q_coe_seed1",
  ]


def test_the_same_run_twice_is_refused():
  with pytest.raises(ValueError, match="given twice"):
    analyze_routing.run_names(["runs/a", "runs/./a"])


def test_a_trained_run_gets_its_tables_figures_and_summary(tmp_path):
  # Its own short run: the session's shared run must be trained where the tests that compare
  # against it bit for bit run (tests/test_checkpoint.py).
  from run_helpers import small_config

  from coe_jax.training import train

  run = tmp_path / "run"
  train.train_and_evaluate(small_config(train__steps=5), str(run), progress=False)
  out = tmp_path / "routing"
  analyze_routing.main([str(run), "--rows=4", f"--out={out}"])
  name = run.name
  files = {p.name for p in (out / name).iterdir()}
  assert {"iterations.csv", "layers.csv", "experts.csv", "load_layer0.png"} <= files
  summary = (out / "summary.txt").read_text()
  assert summary.startswith(f"\n== {name}: step ") and "re-selection rate" in summary
  assert (out / "summary.png").stat().st_size > 0
