"""The second headline study's power calculation and equal-time readings (experiments/)."""

import json

import numpy as np
import pytest

from experiments import ablation, equal_time, power


def test_the_power_calculation_gives_ten_seeds_for_the_registered_numbers():
  assert power.seeds_for_half_width(0.016, 0.012) == 10
  assert power.half_width(0.016, 9) > 0.012 >= power.half_width(0.016, 10)
  # the same t quantiles as paired_verdict's
  for n in (3, 5, 10, 15):
    assert power.half_width(1.0, n) * np.sqrt(n) == pytest.approx(ablation.t_975(n - 1))
  with pytest.raises(ValueError, match="half_width > 0"):
    power.seeds_for_half_width(0.016, 0.0)


def _curve(start, end, steps=2000, every=100):
  s = np.arange(0, steps + 1, every)
  return s, start + (end - start) * s / steps


def test_readings_at_the_faster_and_the_slower_end():
  curves = {"moe_k8": _curve(4.0, 2.70), "coe_c2": _curve(4.0, 2.68)}
  r = equal_time.readings(curves, {"moe_k8": 0.5, "coe_c2": 0.55})
  assert r["faster"] == "moe_k8"
  assert r["fast_end_seconds"] == pytest.approx(1000.0)
  assert r["slow_end_seconds"] == pytest.approx(1100.0)
  coe_step = 1000.0 / 0.55  # where CoE is when MoE ends
  coe_loss = 4.0 + (2.68 - 4.0) * coe_step / 2000
  assert r["diff_at_fast_end"] == pytest.approx(coe_loss - 2.70)
  assert r["diff_at_slow_end"] == pytest.approx(2.68 - 2.70)


def _fake_run(workdir, curve, final):
  workdir.mkdir(parents=True)
  (workdir / "checkpoints" / "2000").mkdir(parents=True)
  rows = [{"step": int(s), "val/loss": float(v)} for s, v in zip(*curve)]
  (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  summary = dict(
    completed=True,
    step=2000,
    final_val_loss=final,
    params_total=1,
    params_active=1,
    step_seconds_median=0.5,
    tokens_per_sec=1.0,
  )
  (workdir / "summary.json").write_text(json.dumps(summary))


def test_report_reads_finished_seeds_and_writes_the_table(tmp_path):
  runs = tmp_path / "pair"
  for seed, (moe, coe) in {10: (2.70, 2.68), 11: (2.71, 2.70), 12: (2.69, 2.69)}.items():
    _fake_run(runs / "moe_k8" / f"seed{seed}", _curve(4.0, moe), moe)
    _fake_run(runs / "coe_c2" / f"seed{seed}", _curve(4.0, coe), coe)
  out = equal_time.report(runs, 20, {"moe_k8": 0.5, "coe_c2": 0.55}, tmp_path / "out")
  assert out["seeds"] == [10, 11, 12]
  assert out["at_slow_end"]["mean"] == pytest.approx(np.mean([-0.02, -0.01, 0.0]))
  assert out["at_slow_end"]["n"] == 3
  table = (tmp_path / "out" / "table.md").read_text()
  assert "| 10 | moe_k8 |" in table and "At the slower's end" in table
  assert (tmp_path / "out" / "curves.png").stat().st_size > 0
