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
