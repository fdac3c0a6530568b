"""Tests for the command line `python -m coe_jax.main`: overrides, config errors, SIGTERM.

The subprocess trains the shrunk config of `run_helpers` given as `--config.*` flags and
shares the session's compilation cache (`fast_compilation` in conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import REPO, REQUIRED_TRAIN_KEYS, SMALL, jax_cache_env

from coe_jax.training.checkpoint import Checkpointer
from coe_jax.training.metrics import read_metrics

# Enough steps that the run is still going when SIGTERM arrives; the warm-up stays at
# int(1e-4 * 30000) = 3 steps, as in SMALL, so the compiled train step is the cached one.
LONG_RUN = {**SMALL, "train.steps": 30000, "train.warmup_fraction": 1e-4, "train.eval_every": 0}
STARTUP_TIMEOUT_S = 300  # imports, data and (on a cache miss) compilation on a loaded machine

pytestmark = pytest.mark.slow  # subprocess runs of the CLI


def start_cli(workdir: Path, overrides: dict, env: dict, logs: Path) -> subprocess.Popen:
  """The CLI in the background, its stdout/stderr going to files in `logs` (no pipe to fill)."""
  flags = [f"--config.{field}={value}" for field, value in overrides.items()]
  command = [
    sys.executable,
    "-m",
    "coe_jax.main",
    "--config=configs/coe_c2.py:tiny",
    f"--workdir={workdir}",
    *flags,
  ]
  with open(logs / "stdout.txt", "w") as out, open(logs / "stderr.txt", "w") as err:
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=err)


def wait_for_metric_rows(process: subprocess.Popen, path: Path, rows: int, logs: Path) -> None:
  deadline = time.monotonic() + STARTUP_TIMEOUT_S
  while time.monotonic() < deadline and process.poll() is None:
    if path.is_file() and len(path.read_text().splitlines()) >= rows:
      return
    time.sleep(0.2)
  process.kill()
  process.wait()
  pytest.fail(
    f"no {rows} metric rows (exit code {process.returncode}):\n"
    f"{(logs / 'stderr.txt').read_text()[-3000:]}"
  )


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
  """(workdir, exit code, stdout, stderr) of a CLI run sent SIGTERM after its third step."""
  logs = tmp_path_factory.mktemp("cli")
  workdir = logs / "run"
  process = start_cli(workdir, LONG_RUN, jax_cache_env(tmp_path_factory), logs)
  wait_for_metric_rows(process, workdir / "metrics.jsonl", 3, logs)
  process.send_signal(signal.SIGTERM)
  code = process.wait(timeout=STARTUP_TIMEOUT_S)
  return workdir, code, (logs / "stdout.txt").read_text(), (logs / "stderr.txt").read_text()


def test_cli_overrides_reach_the_saved_config_and_the_run(sigterm_run):
  workdir, code, out, err = sigterm_run
  assert code == 0, err[-3000:]
  saved = json.loads((workdir / "config.json").read_text())
  for dotted, value in LONG_RUN.items():
    section, field = dotted.split(".")
    assert saved[section][field] == value, dotted
  assert saved["paper"]["name"] == "CoE(C=2,K=4)" and saved["model"]["num_iterations"] == 2
  rows = read_metrics(str(workdir))
  assert all(key in row for row in rows for key in REQUIRED_TRAIN_KEYS)
  assert rows[0]["train/lr"] == 0.0 and rows[2]["train/lr"] == pytest.approx(2e-3)  # warm-up 3
  # Parameter counts, printed before training once the tokenizer has fixed the vocabulary.
  assert "Model (vocab from tokenizer: 300):" in out
  embedding = 300 * SMALL["model.hidden_size"]
  summary = json.loads((workdir / "summary.json").read_text())
  for name, value in (("embedding", embedding), ("head", embedding), ("total", None)):
    value = summary["params_total"] if value is None else value
    assert f"  {name:<18s} {value:>14,d}" in out, name


def test_sigterm_saves_a_checkpoint_and_exits_zero(sigterm_run):
  workdir, code, _, err = sigterm_run
  assert code == 0, err[-3000:]
  last_step = read_metrics(str(workdir))[-1]["step"]
  assert 3 <= last_step < LONG_RUN["train.steps"]
  checkpointer = Checkpointer(str(workdir))
  try:
    assert checkpointer.latest_step() == last_step
  finally:
    checkpointer.close()
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["interrupted_at"] == last_step and not summary["completed"]
  assert (workdir / "loss.png").is_file()


def test_cli_refuses_to_resume_a_workdir_of_another_model_shape(sigterm_run):
  workdir = sigterm_run[0]
  config_before = (workdir / "config.json").read_text()
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "coe_jax.main",
      "--config=configs/coe_c2.py:tiny",
      f"--workdir={workdir}",
      "--config.model.hidden_size=48",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2  # a usage error: one line, no traceback
  assert result.stderr.startswith(
    "error: workdir holds a run of a different model (a field that changes the parameters"
  )
  assert len(result.stderr.strip().splitlines()) == 1
  assert "model.hidden_size: saved 32, requested 48" in result.stderr
  assert "Traceback" not in result.stderr
  assert (workdir / "config.json").read_text() == config_before


@pytest.mark.parametrize(
  "flag, message",
  [
    (
      "--config.model.dispatch=ragged",
      "model.dispatch: got 'ragged'; allowed values: capacity, dropless",
    ),
    (
      "--config.data.source=json",
      "data.train_files: got ''; source='json' needs at least one file",
    ),
  ],
)
def test_cli_rejects_a_bad_value_before_compiling(tmp_path, flag, message):
  workdir = tmp_path / "never_created"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "coe_jax.main",
      "--config=configs/coe_c2.py:tiny",
      f"--workdir={workdir}",
      flag,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f"error: {message}"]
  assert not workdir.exists()  # rejected before the run started: no data, no compilation
