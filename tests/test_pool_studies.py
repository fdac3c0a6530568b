"""Reading two studies' claims tables together (experiments/pool_studies.py)."""

import json

import numpy as np
import pytest
from absl import app
from run_helpers import fake_run_result

from experiments import ablation, pool_studies


def _table(path, seeds, moe, coe):
  """A claims table as experiments.ablation writes it, for the headline pair."""
  results = {
    "moe_k8": fake_run_result("moe_k8", seeds, moe, 1.196),
    "coe_c2": fake_run_result("coe_c2", seeds, coe, 1.121),
  }
  lines = ["Recipe: test", "", "| " + " | ".join(ablation.CLAIM_COLUMNS) + " |"]
  lines += ["|" + "---|" * len(ablation.CLAIM_COLUMNS)]
  lines += ["| " + " | ".join(row) + " |" for row in ablation.claim_rows(results)]
  path.write_text("\n".join(lines) + "\n")
  return path


def test_each_study_on_its_own_then_pooled(tmp_path):
  first = _table(tmp_path / "a.md", [0, 1, 2], [2.70, 2.71, 2.69], [2.69, 2.70, 2.70])
  second = _table(tmp_path / "b.md", [10, 11], [2.70, 2.70], [2.68, 2.69])
  out = pool_studies.pool([("first", first), ("second", second)], "coe_c2 - moe_k8")
  assert out["paper"] == pytest.approx(-0.075)
  by_label = {r["reading"]: r for r in out["readings"]}
  assert by_label["first"]["diffs"] == pytest.approx([-0.01, -0.01, 0.01])
  assert by_label["second"]["diffs"] == pytest.approx([-0.02, -0.01])
  pooled = by_label[pool_studies.POOLED]
  diffs = np.asarray([-0.01, -0.01, 0.01, -0.02, -0.01])
  low, high, verdict = ablation.paired_verdict(diffs, -1.0)
  assert (pooled["n"], pooled["mean"], pooled["verdict"]) == (5, pytest.approx(-0.008), verdict)
  assert pooled["ci95"] == pytest.approx([low, high])
  assert pooled["same_sign_seeds"] == 4
  assert "| pooled (secondary) | 5 | -0.0080 |" in pool_studies.format_table(out)
  json.dumps(out)  # what --out writes


def test_bad_inputs_name_the_file_and_what_is_allowed(tmp_path):
  table = _table(tmp_path / "a.md", [0, 1], [2.7, 2.7], [2.6, 2.6])
  with pytest.raises(app.UsageError, match="no file"):
    pool_studies.pool([("a", table), ("b", tmp_path / "missing.md")], "coe_c2 - moe_k8")
  with pytest.raises(
    app.UsageError, match=r"no row 'coe_c2 - moe_k16'; it has \['coe_c2 - moe_k8'\]"
  ):
    pool_studies.pool([("a", table), ("b", table)], "coe_c2 - moe_k16")
  with pytest.raises(app.UsageError, match="two or more studies"):
    pool_studies.pool([("a", table)], "coe_c2 - moe_k8")
  (tmp_path / "plain.md").write_text("no table here\n")
  with pytest.raises(app.UsageError, match="has no claims table"):
    pool_studies.pool([("a", table), ("b", tmp_path / "plain.md")], "coe_c2 - moe_k8")
  bad = tmp_path / "bad.md"
  bad.write_text(table.read_text().replace("-0.1000 / -0.1000", "n/a"))
  with pytest.raises(app.UsageError, match="expected numbers joined by ' / '"):
    pool_studies.pool([("a", table), ("b", bad)], "coe_c2 - moe_k8")
  with pytest.raises(app.UsageError, match="expected label=path"):
    pool_studies._parse_study("just/a/path.md")


def test_the_committed_first_study_table_reads_as_reported():
  # the five seeds experiments/README.md reports for the first study
  row = pool_studies.claim_row(
    ablation.REPO / "experiments/results/headline/pair_5seeds/table.md", "coe_c2 - moe_k8"
  )
  assert row["ours per seed"] == "-0.0050 / -0.0248 / -0.0025 / -0.0403 / -0.0090"
  assert row["verdict (pre-registered rule)"] == "undecided"
