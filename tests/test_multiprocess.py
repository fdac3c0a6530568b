"""Two processes of `python -m coe_jax.main` on localhost train as one; the training log's extras.

The run under test (module fixtures, one after the other, on one workdir):

1. two processes (`jax.distributed` with CPU collectives, 2 host devices each,
   one mesh over all 4) train the shrunk config of `run_helpers` until process 1
   alone gets SIGTERM: both must stop after the same step, save it and exit 0;
2. one process (this one, 1 device) resumes that checkpoint for 3 steps,
   profiling one of them, with a fake `wandb` module installed;
3. two processes resume the one-process checkpoint and finish the 30 steps.

Each leg's losses must be those of the session's uninterrupted one-process
run of the same config (conftest's `reference_run`), which sees the same global
batches. Everything shares the session's compilation cache (`fast_compilation`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from run_helpers import (
  REPO,
  SMALL,
  FakeWandb,
  abstract_state,
  jax_cache_env,
  max_abs_diff,
  small_config,
)

from coe_jax.data import input_pipeline
from coe_jax.training import run_guard, train
from coe_jax.training.checkpoint import Checkpointer, restore_params
from coe_jax.training.metrics import read_metrics

# test_cli's long run: the warm-up stays int(1e-4 * 30000) = 3 steps, as in SMALL's 30 steps, so
# every step computes what the 30-step reference run computes at that step.
LONG_RUN = {**SMALL, "train.steps": 30000, "train.warmup_fraction": 1e-4, "train.eval_every": 0}
DEVICES_PER_PROCESS = 2
STARTUP_TIMEOUT_S = 300
# Two processes reduce gradients over 4 devices in another order than one device does.
LOSS_RTOL = 1e-5
SECOND_LEG_STEPS = 3

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_compilation")]  # subprocess runs


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_two_processes(
  workdir: Path,
  overrides: dict,
  env: dict,
  logs: Path,
  process_flags: tuple[list[str], list[str]] = ([], []),
) -> list[subprocess.Popen]:
  """`python -m coe_jax.main` as processes 0 and 1 of one run, output to files in `logs`."""
  logs.mkdir(parents=True, exist_ok=True)
  port = free_port()
  processes = []
  for process_id in range(2):
    flags = [f"--config.{field}={value}" for field, value in overrides.items()]
    flags += [
      "--config.mesh.distributed=True",
      f"--config.mesh.coordinator_address=localhost:{port}",
      "--config.mesh.num_processes=2",
      f"--config.mesh.process_id={process_id}",
    ]
    command = [
      sys.executable,
      "-m",
      "coe_jax.main",
      "--config=configs/coe_c2.py:tiny",
      f"--workdir={workdir}",
      *flags,
      *process_flags[process_id],
    ]
    process_env = {
      **os.environ,
      **env,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
    }
    with (
      open(logs / f"stdout{process_id}.txt", "w") as out,
      open(logs / f"stderr{process_id}.txt", "w") as err,
    ):
      processes.append(subprocess.Popen(command, cwd=REPO, env=process_env, stdout=out, stderr=err))
  return processes


def wait_all(processes: list[subprocess.Popen], logs: Path, timeout: float) -> list[int]:
  deadline = time.monotonic() + timeout
  codes = []
  for process in processes:
    try:
      codes.append(process.wait(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
      pytest.fail(f"the processes did not finish in {timeout} s:\n{stderr_tail(logs)}")
  return codes


def stderr_tail(logs: Path) -> str:
  return "\n".join(
    f"--- process {i}:\n{(logs / f'stderr{i}.txt').read_text()[-2500:]}"
    for i in range(2)
    if (logs / f"stderr{i}.txt").is_file()
  )


def latest_checkpoint(workdir: Path) -> int:
  checkpointer = Checkpointer(str(workdir))
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def losses(workdir: Path) -> dict[int, float]:
  return {row["step"]: row["train/loss"] for row in read_metrics(str(workdir))}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("multiprocess")


@pytest.fixture(scope="module")
def first_leg(run_dir, tmp_path_factory):
  """Two processes from scratch, SIGTERM to process 1 only after 4 logged steps."""
  workdir, logs = run_dir / "run", run_dir / "leg1"
  processes = start_two_processes(workdir, LONG_RUN, jax_cache_env(tmp_path_factory), logs)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + STARTUP_TIMEOUT_S
  while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
    if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
      for p in processes:
        p.kill()
      pytest.fail(f"no 4 metric rows from the two processes:\n{stderr_tail(logs)}")
    time.sleep(0.1)
  processes[1].send_signal(signal.SIGTERM)
  codes = wait_all(processes, logs, STARTUP_TIMEOUT_S)
  return dict(
    workdir=workdir,
    logs=logs,
    codes=codes,
    rows=read_metrics(str(workdir)),
    checkpoint=latest_checkpoint(workdir),
    summary=json.loads((workdir / "summary.json").read_text()),
  )


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_exit_zero(first_leg):
  assert first_leg["codes"] == [0, 0], stderr_tail(first_leg["logs"])
  stopped = first_leg["summary"]["interrupted_at"]
  assert 4 <= stopped <= 30 - SECOND_LEG_STEPS - 1
  assert first_leg["checkpoint"] == stopped  # both saved that step (a collective save)
  assert [row["step"] for row in first_leg["rows"]] == list(range(1, stopped + 1))


def test_process_zero_alone_writes_the_logs_and_artefacts(first_leg):
  workdir, logs = first_leg["workdir"], first_leg["logs"]
  assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
  for name in ("config.json", "summary.json", "loss.png", "tokenizer.json"):
    assert (workdir / name).is_file(), name
  summary = first_leg["summary"]
  assert (summary["processes"], summary["devices"]) == (2, 2 * DEVICES_PER_PROCESS)
  out0, out1 = (logs / "stdout0.txt").read_text(), (logs / "stdout1.txt").read_text()
  assert "Model (vocab from tokenizer: " in out0 and "Run directory" in out0
  # No counts, no summary lines on process 1. Gloo (the CPU collectives library) prints its
  # connections there, sometimes as lines split mid-sentence by concurrent writes, so the check
  # looks for what we print rather than for an empty output.
  ours = ("Model (", "active_per_token", "Run directory", "metrics:", "checkpoint:", "Resumed")
  assert [line for line in out1.splitlines() if any(mark in line for mark in ours)] == []
  assert "Gloo" in out1 or not out1.strip()  # what remains is the collectives library's
  assert "it/s" in (logs / "stderr0.txt").read_text()  # the progress bar ...
  assert "it/s" not in (logs / "stderr1.txt").read_text()  # ... on process 0 only


def test_two_processes_train_as_one_process_on_the_same_global_batches(first_leg, reference_run):
  expected = losses(reference_run)
  got = {row["step"]: row["train/loss"] for row in first_leg["rows"]}
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=LOSS_RTOL
  )
  assert all(row["train/tflops_per_sec_per_device"] > 0 for row in first_leg["rows"])
  assert all("train/mfu" not in row for row in first_leg["rows"])  # CPU: peak unknown


@pytest.fixture(scope="module")
def second_leg(first_leg, reference_run):
  """This process (one device) resumes the two-process checkpoint for SECOND_LEG_STEPS steps."""
  workdir = first_leg["workdir"]
  start = first_leg["checkpoint"]
  stop = start + SECOND_LEG_STEPS
  config = small_config(
    **{k.replace(".", "__"): v for k, v in LONG_RUN.items()},
    train__profile_steps=f"{start + 1}:{start + 2}",
    train__peak_tflops_per_device=1e-3,
    train__wandb_project="coe-test",
  )
  fake = FakeWandb()
  served, checked = [], []
  original_next, original_check = input_pipeline.TrainIterator.__next__, run_guard.check_finite

  def next_batch(iterator):
    served.append(1)
    return original_next(iterator)

  def check_finite(step, *args):
    checked.append((step, len(served)))  # (step whose metrics are read, batches drawn so far)
    return original_check(step, *args)

  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(sys.modules, "wandb", fake)
    patch.setattr(input_pipeline.TrainIterator, "__next__", next_batch)
    patch.setattr(run_guard, "check_finite", check_finite)
    summary = train.train_and_evaluate(config, str(workdir), stop_at_step=stop, progress=False)
  return dict(
    start=start,
    stop=stop,
    summary=summary,
    fake=fake,
    checked=checked,
    rows=read_metrics(str(workdir)),
    checkpoint=latest_checkpoint(workdir),
  )


def test_one_process_resumes_the_two_process_checkpoint_exactly(second_leg, reference_run):
  start, stop = second_leg["start"], second_leg["stop"]
  assert second_leg["checkpoint"] == stop == second_leg["summary"]["interrupted_at"]
  rows = {row["step"]: row for row in second_leg["rows"]}
  assert sorted(rows) == list(range(1, stop + 1))
  expected = losses(reference_run)
  np.testing.assert_allclose(
    [rows[s]["train/loss"] for s in range(start + 1, stop + 1)],
    [expected[s] for s in range(start + 1, stop + 1)],
    rtol=LOSS_RTOL,
  )


def test_metrics_of_a_step_are_read_after_the_next_step_is_launched(second_leg):
  start, stop = second_leg["start"], second_leg["stop"]
  # Batches drawn from the resumed iterator when step s's metrics were read: s - start + 1
  # (step s + 1 already dispatched), except on steps that checkpoint (every 5th and the last),
  # which wait for their own step.
  waits = [s % 5 == 0 or s == stop for s in range(start + 1, stop + 1)]
  assert second_leg["checked"] == [
    (s, s - start + (0 if wait else 1)) for s, wait in zip(range(start + 1, stop + 1), waits)
  ]
  assert not all(waits)


def test_training_log_reports_model_flops_tflops_and_mfu(second_leg):
  summary = second_leg["summary"]
  from coe_jax import config_lib
  from coe_jax.nn.flops import flops_per_token

  config = small_config()
  model_config = config_lib.model_config_from(config, summary["vocab_size"])
  assert summary["train_flops_per_token"] == flops_per_token(model_config, 32).train > 0
  assert summary["peak_tflops_per_device"] == 1e-3
  for row in second_leg["rows"][second_leg["start"] :]:
    tflops = summary["train_flops_per_token"] * row["train/tokens_per_sec"] / 1e12  # 1 device
    assert row["train/tflops_per_sec_per_device"] == pytest.approx(tflops, rel=1e-9)
    assert row["train/mfu"] == pytest.approx(tflops / 1e-3, rel=1e-9)
    assert row["train/model_flops_per_token"] == summary["train_flops_per_token"]


def test_profile_steps_write_a_trace_for_tensorboard(second_leg):
  workdir = Path(second_leg["summary"]["profile_dir"])
  traces = list(workdir.glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, traces


def test_wandb_gets_every_row_when_installed_and_a_project_is_set(second_leg):
  fake, start, stop = second_leg["fake"], second_leg["start"], second_leg["stop"]
  assert len(fake.inits) == 1 and fake.finished == 1
  init = fake.inits[0]
  assert init["project"] == "coe-test" and init["id"] == "fake-run-id" and init["resume"] == "allow"
  assert init["config"]["train"]["wandb_project"] == "coe-test"
  assert [step for step, _ in fake.logged] == list(range(start + 1, stop + 1))
  rows = {row["step"]: row for row in second_leg["rows"]}
  for step, values in fake.logged:
    assert values == {k: v for k, v in rows[step].items() if k != "step"}


@pytest.fixture(scope="module")
def third_leg(second_leg, tmp_path_factory, run_dir):
  """Two processes resume the one-process checkpoint and finish the 30 steps."""
  workdir, logs = run_dir / "run", run_dir / "leg3"
  processes = start_two_processes(workdir, SMALL, jax_cache_env(tmp_path_factory), logs)
  codes = wait_all(processes, logs, STARTUP_TIMEOUT_S)
  return dict(
    workdir=workdir,
    logs=logs,
    codes=codes,
    rows=read_metrics(str(workdir)),
    summary=json.loads((workdir / "summary.json").read_text()),
  )


def test_two_processes_resume_a_one_process_checkpoint_to_the_uninterrupted_curve(
  third_leg, second_leg, reference_run
):
  assert third_leg["codes"] == [0, 0], stderr_tail(third_leg["logs"])
  assert third_leg["summary"]["completed"] and third_leg["summary"]["step"] == 30
  rows = {row["step"]: row for row in third_leg["rows"]}
  assert sorted(rows) == list(range(1, 31))  # every step once, whichever process count ran it
  expected = {row["step"]: row for row in read_metrics(str(reference_run))}
  np.testing.assert_allclose(
    [rows[s]["train/loss"] for s in range(1, 31)],
    [expected[s]["train/loss"] for s in range(1, 31)],
    rtol=LOSS_RTOL,
  )
  # The first step after the resume (the reshard from one device to four).
  resumed = second_leg["stop"] + 1
  assert rows[resumed]["train/loss"] == pytest.approx(
    expected[resumed]["train/loss"], rel=LOSS_RTOL
  )
  for step in (20, 30):
    assert rows[step]["val/loss"] == pytest.approx(expected[step]["val/loss"], rel=LOSS_RTOL)
  abstract = abstract_state(small_config()).params
  params_diff = max_abs_diff(
    restore_params(str(third_leg["workdir"]), abstract)[0],
    restore_params(str(reference_run), abstract)[0],
  )
  assert params_diff < 1e-4, params_diff


def test_processes_started_with_different_flags_refuse_to_train(tmp_path, tmp_path_factory):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  processes = start_two_processes(
    workdir, SMALL, jax_cache_env(tmp_path_factory), logs, process_flags=([], ["--config.seed=1"])
  )
  assert wait_all(processes, logs, STARTUP_TIMEOUT_S) == [2, 2]  # a usage error, one line
  for i in range(2):
    assert (
      "error: the config of process(es) [1] differs from process 0's (this is process "
      f"{i}); every process must be started with the same flags"
      in (logs / f"stderr{i}.txt").read_text()
    ), stderr_tail(logs)
  assert not workdir.exists()  # refused before any data, log or checkpoint
