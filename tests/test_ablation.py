"""Tests for experiments/ablation.py and experiments/gpu_main_pair.sh.

One module-scoped suite run: the GPU script at tiny scale (it wraps the
runner's two-config `main` suite), shrunk hard, on the synthetic corpus, a few
steps. Then the table, the figures and a second, skipping invocation are checked.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_helpers import fake_run_result

from experiments import ablation

REPO = Path(__file__).resolve().parents[1]
PAIR = ("moe_k8", "coe_c2")
HIDDEN, LAYERS, ROUTED = 32, 2, 31  # the shrunk model below; tiny N=32 is 31 routed + 1 shared
SHRINK = (
  f"--set=model.hidden_size={HIDDEN}",
  f"--set=model.num_layers={LAYERS}",
  "--set=model.num_heads=2",
  "--set=model.kv_lora_rank=16",
  "--set=model.qk_nope_head_dim=8",
  "--set=model.qk_rope_head_dim=8",
  "--set=model.v_head_dim=8",
  "--set=model.moe_intermediate_size=16",
  "--set=model.rope_original_max_position=32",
  "--set=data.synthetic_train_size=200",
  "--set=data.synthetic_val_size=16",
  "--set=data.vocab_size=300",
  "--set=train.checkpoint_every=0",
  "--batch_size=2",
  "--max_length=32",
  "--eval_every=1",
  "--eval_batches=1",
  "--eval_batch_size=4",
)
STEPS = 2


def _env(tmp: Path) -> dict[str, str]:
  env = dict(
    os.environ,
    SCALE="tiny",
    STEPS=str(STEPS),
    FIRST_SEED="0",  # the script's default is the second study's seeds 10 .. 19
    SEEDS="1",
    DATA="",
    TOKENIZER="",
    RUNS_DIR=str(tmp / "runs"),
    RESULTS_DIR=str(tmp / "results"),
    PYTHON=sys.executable,
  )
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
  # Reruns of this test reuse the compiled programs (the shrunk models' shapes never change).
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax_compilation_cache"))
  return env


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
  """(runs dir, results dir, stdout) of the GPU script run at tiny scale, shrunk."""
  tmp = tmp_path_factory.mktemp("ablation")
  result = subprocess.run(
    ["bash", str(REPO / "experiments" / "gpu_main_pair.sh"), *SHRINK],
    cwd=REPO,
    env=_env(tmp),
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  return tmp / "runs", tmp / "results", result.stdout


def _csv_rows(results: Path) -> list[dict[str, str]]:
  with open(results / "table.csv") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == ablation.COLUMNS
    return list(reader)


def test_every_run_trains_once(suite):
  runs, _, stdout = suite
  assert stdout.count("[run ]") == len(PAIR)
  for name in PAIR:
    assert ablation.is_finished(runs / name / "seed0")


def test_table_csv_has_one_row_per_config_with_measured_values(suite):
  runs, results, _ = suite
  rows = {row["config"]: row for row in _csv_rows(results)}
  assert set(rows) == set(PAIR)
  for name, row in rows.items():
    summary = json.loads((runs / name / "seed0" / "summary.json").read_text())
    assert float(row["val loss mean"]) == pytest.approx(summary["final_val_loss"], abs=1e-4)
    assert 0 < float(row["val loss mean"]) < 2 * math.log(summary["vocab_size"])
    assert int(row["params total"]) == summary["params_total"]
    assert float(row["param MB fp32"]) == pytest.approx(2 * float(row["param MB bf16"]), abs=0.02)
    assert float(row["train step peak MB"]) > float(row["param MB fp32"])  # params, grads, Adam
    assert float(row["tokens/s"]) > 0 and float(row["step s"]) > 0
    assert row["seeds"] == "1" and row["val loss sd"] == "0.0000"
  assert rows["coe_c2"]["paper val loss"] == "1.121" and rows["moe_k8"]["paper val loss"] == "1.196"
  assert rows["coe_c2"]["paper diff vs moe_k8"] == "-0.075"
  paired = float(rows["coe_c2"]["val loss mean"]) - float(rows["moe_k8"]["val loss mean"])
  assert float(rows["coe_c2"]["paired diff vs moe_k8"]) == pytest.approx(paired, abs=2e-4)
  assert rows["moe_k8"]["paired diff vs moe_k8"] == "+0.0000"
  # The setting columns are the paper run's (C, K, N, layers), whatever scale trained.
  paper_settings = [rows["coe_c2"][f"paper {c}"] for c in ("C", "K", "N", "layers")]
  assert paper_settings == ["2", "4", "64", "4"]
  # CoE(C=2) adds exactly one router [routed, hidden] per layer to MoE(K=8).
  extra = int(rows["coe_c2"]["params total"]) - int(rows["moe_k8"]["params total"])
  assert extra == LAYERS * ROUTED * HIDDEN


def test_table_md_matches_csv_and_states_the_memory_saving(suite):
  _, results, _ = suite
  lines = (results / "table.md").read_text().splitlines()
  header = "| " + " | ".join(ablation.COLUMNS) + " |"
  body = lines[lines.index(header) + 2 : lines.index(header) + 2 + len(PAIR)]
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
  assert cells == [list(row.values()) for row in _csv_rows(results)]
  assert any("17.6%" in line and "paper" in line for line in lines)
  assert any(line.startswith("- paper scale, analytic count: 17.7%") for line in lines)


def test_figures_are_pngs_for_the_figures_that_have_runs(suite):
  _, results, _ = suite
  drawn = {stem for stem, (_, names) in ablation.FIGURES.items() if set(names) & set(PAIR)}
  assert drawn == {"main", "scaling", "layers", "efficiency"}
  for stem in ablation.FIGURES:
    path = results / f"{stem}.png"
    assert path.is_file() == (stem in drawn)
    if stem in drawn:
      assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_invocation_skips_finished_runs(suite):
  runs, results, _ = suite
  summaries = [runs / name / "seed0" / "summary.json" for name in PAIR]
  before = [p.stat().st_mtime_ns for p in summaries]
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.ablation",
      "--suite=main",
      "--scale=tiny",
      "--seeds=1",
      f"--steps={STEPS}",
      f"--runs_dir={runs}",
      f"--results_dir={results}",
      "--set=model.dispatch=dropless",
      "--set=train.schedule=cosine",
      "--set=train.paper_val=True",
      *SHRINK,
    ],  # the recipe gpu_main_pair.sh ran
    cwd=REPO,
    env=_env(runs.parent),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.count("[skip]") == len(PAIR) and "[run ]" not in result.stdout
  assert [p.stat().st_mtime_ns for p in summaries] == before
  assert len(_csv_rows(results)) == len(PAIR)


def test_unfinished_run_is_not_finished(tmp_path):
  workdir = tmp_path / "run"
  assert not ablation.is_finished(workdir)
  (workdir / "checkpoints" / "7").mkdir(parents=True)
  (workdir / "summary.json").write_text(json.dumps({"completed": False, "step": 7}))
  assert not ablation.is_finished(workdir)  # interrupted
  (workdir / "summary.json").write_text(json.dumps({"completed": True, "step": 8}))
  assert not ablation.is_finished(workdir)  # final checkpoint missing
  (workdir / "checkpoints" / "8").mkdir()
  assert ablation.is_finished(workdir)


def test_suite_names():
  assert ablation.suite_configs("main") == PAIR
  assert ablation.suite_configs("dense_c1, dense_c2") == ("dense_c1", "dense_c2")
  assert len(ablation.suite_configs("paper")) == 13
  with pytest.raises(ValueError, match="no_such_config"):
    ablation.suite_configs("moe_k8,no_such_config")


def test_recipe_becomes_config_overrides():
  recipe = ablation.Recipe(
    data_dir="d",
    tokenizer="t.json",
    steps=5,
    packing=True,
    eval_batches=2,
    overrides=("train.lr=0.001",),
  )
  flags = recipe.flags_for("cache")
  assert flags[:2] == ["--config.data.cache_dir=cache", "--config.data.packing=True"]
  for expected in (
    "--config.data.source=json",
    f"--config.data.train_files={os.path.join('d', 'train.jsonl')}",
    "--config.data.tokenizer=t.json",
    "--config.train.steps=5",
    "--config.train.max_eval_batches=2",
    "--config.train.lr=0.001",
  ):
    assert expected in flags
  assert not any("batch_size" in f or "max_length" in f for f in flags)  # 0 keeps the config's


def test_paired_differences_match_seeds():
  base = fake_run_result("moe_k8", [0, 1], [7.0, 7.5])
  other = fake_run_result("x", [1, 2], [7.25, 9.0])  # seed 2 has no baseline partner
  assert ablation.paired_differences(other, base).tolist() == [-0.25]


def test_memory_saving_percent():
  assert ablation.memory_saving_percent(75, 100) == pytest.approx(25.0)


def test_runs_dir_refuses_a_second_recipe(tmp_path):
  recipe = ablation.Recipe(steps=5, overrides=("train.lr=0.001",))
  ablation.record_recipe(tmp_path, recipe)
  ablation.record_recipe(tmp_path, recipe)  # the same recipe resumes
  assert ablation.load_recipe(tmp_path) == recipe
  with pytest.raises(ValueError, match="steps"):
    ablation.record_recipe(tmp_path, dataclasses.replace(recipe, steps=6))


def test_claim_verdicts_compare_every_seed_with_the_papers_sign():
  def run(name, paper, losses):
    return dataclasses.replace(fake_run_result(name, [0, 1], losses), paper_val_loss=paper)

  results = {
    "coe_c2": run("coe_c2", 1.121, [7.0, 7.1]),
    "moe_k8": run("moe_k8", 1.196, [7.1, 7.2]),
    "moe_k16": run("moe_k16", 1.166, [6.9, 7.2]),
  }
  rows = {row[1]: row for row in ablation.claim_rows(results)}
  assert set(rows) == {"coe_c2 - moe_k8", "coe_c2 - moe_k16"}  # moe_k24 has no runs
  assert rows["coe_c2 - moe_k8"][2:7] == [
    "-0.075",
    "-0.1000 / -0.1000",
    "-0.1000",
    "same sign, every seed",
    "yes (1.4 sd)",
  ]
  assert rows["coe_c2 - moe_k16"][5:7] == ["mixed", "no (0.0 sd)"]  # seed sd 0.07 and 0.21
  flipped = dict(results, moe_k8=run("moe_k8", 1.196, [6.0, 6.0]))
  assert ablation.claim_rows(flipped)[0][5] == "opposite, every seed"


@pytest.mark.parametrize(
  "diffs, paper_sign, expected",
  [
    ([-0.05, -0.04, -0.06], -1, "reproduced"),  # CI [-0.075, -0.025]: all below 0
    ([0.05, 0.04, 0.06], -1, "reversed"),
    ([0.002, -0.001, 0.0], -1, "no effect of interest"),  # CI [-0.0028, +0.0035] inside +-0.01
    ([-0.03, 0.01, -0.01], -1, "undecided"),
    ([-0.05], -1, "undecided (1 seed)"),
  ],
)
def test_pre_registered_verdict(diffs, paper_sign, expected):
  low, high, verdict = ablation.paired_verdict(np.asarray(diffs), paper_sign)
  assert verdict == expected
  if len(diffs) == 3:  # mean -+ t(0.975, 2) * sd / sqrt(3), t = 4.303
    half = 4.303 * np.std(diffs, ddof=1) / np.sqrt(3)
    assert (low, high) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half), rel=2e-4)


@pytest.mark.parametrize("n, t", [(3, 4.303), (5, 2.776), (10, 2.262), (15, 2.145), (30, 2.045)])
def test_verdict_interval_uses_t_with_n_minus_1_degrees_of_freedom(n, t):
  # standard-table quantiles; 15 is the two headline studies pooled (not the normal 1.96)
  diffs = np.linspace(-0.03, 0.01, n)
  low, high, _ = ablation.paired_verdict(diffs, -1)
  assert (high - low) / 2 == pytest.approx(t * np.std(diffs, ddof=1) / np.sqrt(n), rel=2e-4)


def test_paired_difference_panel_draws_every_seed(tmp_path, monkeypatch):
  steps = np.array([100.0, 200.0])
  base = dataclasses.replace(
    fake_run_result("moe_k8", [0, 1, 2], [2.0, 2.1, 2.2]),
    curves=[(steps, np.array([3.0, 2.0 + 0.1 * s])) for s in range(3)],
  )
  other = dataclasses.replace(
    fake_run_result("coe_c2", [0, 1, 2], [1.9, 2.2, 2.1]),
    curves=[(steps, np.array([3.0, v])) for v in (1.9, 2.2, 2.1)],
  )
  import matplotlib.pyplot as plt

  figures = []
  monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
  path = ablation.plot_figure("pair", "pair", [base, other], tmp_path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  diff_ax = figures[0].axes[1]
  dotted = [line for line in diff_ax.lines if line.get_linestyle() == ":"]
  assert [line.get_ydata()[-1] for line in dotted] == pytest.approx([-0.1, 0.1, -0.1])
  assert [t.get_text() for t in diff_ax.texts] == ["s0", "s1", "s2"]
