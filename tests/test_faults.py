"""Fault injection: kill -9, damaged checkpoints, a full disk, two runs on one workdir, bad input.

Each fault ends in one line (a warning when the run goes on, `error: ...` when it stops),
loses nothing and leaves nothing partial. Runs are the shrunk config of `run_helpers`
(`small_config`, the session's compilation cache; the CLI subprocesses pass the same values as
flags). Nothing here depends on how fast the machine is: a kill lands wherever it lands, and the
assertions hold for any point. Bad input at the command line: test_cli_errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import (
  CLI_TIMEOUT_S,
  REPO,
  STEPS,
  cli_flags,
  metric_rows,
  one_error_line,
  run_cli,
  small_config,
  tree,
)

from coe_jax.errors import CheckpointError, WorkdirLocked
from coe_jax.inference.run_dir import load_run
from coe_jax.training import train, workdir_lock
from coe_jax.training.metrics import read_metrics
from coe_jax.training.workdir_lock import LOCK_FILE, WorkdirLock

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_compilation")]  # runs, CLI
TMP_GLOB = "*.orbax-checkpoint-tmp*"


# ---------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------


def truncate_largest_file(step_dir: Path) -> Path:
  largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=os.path.getsize)
  os.truncate(largest, 10)
  return largest


def truncate_every_data_file(step_dir: Path) -> None:
  """Truncates every array data file of the step: its params too, wherever Orbax put them
  (the largest file alone may hold only optimizer state, which a params-only read skips)."""
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      os.truncate(path, 10)


def delete_metadata(step_dir: Path) -> Path:
  (step_dir / "state" / "_METADATA").unlink()
  return step_dir / "state" / "_METADATA"


@pytest.mark.parametrize("damage", [truncate_largest_file, delete_metadata])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
  reference_run, run_copy, capsys, damage
):
  damage(run_copy / "checkpoints" / "30")
  capsys.readouterr()
  summary = train.train_and_evaluate(small_config(), str(run_copy), progress=False)
  out, err = capsys.readouterr()
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "Traceback" not in err, err[-3000:]
  assert warnings[0].startswith("warning: checkpoint step 30 is damaged (")
  assert f"{run_copy}/checkpoints/30" in warnings[0] and "resuming from step 25" in warnings[0]
  assert "Resumed from" in out and "at step 25" in out
  assert (run_copy / "damaged_checkpoints" / "30" / "state").is_dir()  # kept, not deleted
  assert summary["completed"] and summary["step"] == STEPS
  # Rows 26..30 of the damaged run were truncated and trained again: once each, as before.
  assert [row["step"] for row in read_metrics(str(run_copy))] == list(range(1, STEPS + 1))
  assert metric_rows(run_copy) == metric_rows(reference_run)


def test_when_no_checkpoint_restores_the_run_stops_with_one_line_and_moves_nothing(run_copy):
  truncate_largest_file(run_copy / "checkpoints" / "30")
  delete_metadata(run_copy / "checkpoints" / "25")
  before = tree(run_copy)
  with pytest.raises(
    CheckpointError, match=r"no checkpoint restores \(step 30: .*; step 25: "
  ) as e:
    train.train_and_evaluate(small_config(), str(run_copy), progress=False)
  assert "\n" not in str(e.value) and "nothing was moved or deleted" in str(e.value)
  assert tree(run_copy) == before


def test_readers_skip_a_damaged_latest_checkpoint_and_change_nothing(run_copy, capsys):
  truncate_every_data_file(run_copy / "checkpoints" / "30")
  before = tree(run_copy)
  capsys.readouterr()
  assert load_run(str(run_copy)).step == 25
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("warning: checkpoint step 30 is damaged ("), err
  assert tree(run_copy) == before
  with pytest.raises(CheckpointError, match="no checkpoint restores \\(step 30: "):
    load_run(str(run_copy), step=30)


# ---------------------------------------------------------------------------
# kill -9 during checkpointing, then resume
# ---------------------------------------------------------------------------

LONG = dict(train__steps=30000, train__warmup_fraction=1e-4, train__eval_every=0)


def test_kill_9_during_saves_then_resume_is_exact_and_logs_each_step_once(
  cli_env, tmp_path, capsys
):
  workdir = tmp_path / "killed"
  command = [
    sys.executable,
    "-m",
    "coe_jax.main",
    f"--workdir={workdir}",
    *cli_flags(**LONG, train__checkpoint_every=1),  # a save every step: kills land in saves
  ]
  with open(tmp_path / "stderr.txt", "w") as err, open(tmp_path / "stdout.txt", "w") as out:
    process = subprocess.Popen(
      command, cwd=REPO, env={**os.environ, **cli_env}, stdout=out, stderr=err
    )
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + CLI_TIMEOUT_S
  while time.monotonic() < deadline and process.poll() is None:
    if metrics.is_file() and len(metrics.read_text().splitlines()) >= 8:
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]
  assert (workdir / LOCK_FILE).is_file()  # left behind by the killed run
  logged = [row["step"] for row in read_metrics(str(workdir))]
  stop = max(logged) + 3

  capsys.readouterr()
  config = small_config(**LONG, train__checkpoint_every=1)
  train.train_and_evaluate(config, str(workdir), stop_at_step=stop, progress=False)
  err = capsys.readouterr().err
  assert f"taking over the lock of a run that is gone (pid {process.pid} " in err
  assert not list((workdir / "checkpoints").glob(TMP_GLOB))  # the killed save's partial dir
  assert [row["step"] for row in read_metrics(str(workdir))] == list(range(1, stop + 1))

  uninterrupted = tmp_path / "uninterrupted"
  train.train_and_evaluate(config, str(uninterrupted), stop_at_step=stop, progress=False)
  assert metric_rows(workdir) == metric_rows(uninterrupted)


# ---------------------------------------------------------------------------
# Two runs on one workdir
# ---------------------------------------------------------------------------

HOLD = (
  "import sys, time; from coe_jax.training.workdir_lock import WorkdirLock; "
  "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
)


@contextlib.contextmanager
def lock_held_by_another_process(workdir: Path):
  """A process holding `workdir`'s lock, as a training run would; killed with -9 at the end."""
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    yield holder
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_a_second_run_is_refused_at_once_and_a_dead_holders_lock_is_taken_over(
  run_copy, cli_env, capsys
):
  with lock_held_by_another_process(run_copy) as holder:
    before = tree(run_copy)
    with pytest.raises(WorkdirLocked, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
      train.train_and_evaluate(small_config(train__steps=40), str(run_copy), progress=False)
    result = run_cli("coe_jax.main", f"--workdir={run_copy}", *cli_flags(), env=cli_env)
    line = one_error_line(result, 1)
    assert f"another training run holds it (pid {holder.pid} on host" in line
    # Readers do not take the lock.
    assert load_run(str(run_copy)).step == STEPS
    assert tree(run_copy) == before
    lock_record = (run_copy / LOCK_FILE).read_text()
  capsys.readouterr()
  with WorkdirLock(str(run_copy)):  # the holder was killed with -9: its lock is stale
    pass
  err = capsys.readouterr().err
  assert err.strip() == (
    f"warning: {run_copy}/{LOCK_FILE}: taking over the lock of a run that is gone "
    f"(pid {holder.pid} on host {socket.gethostname()} (since {json.loads(lock_record)['started']}))"
  )
  assert not (run_copy / LOCK_FILE).exists()  # released on exit


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
  with WorkdirLock(str(tmp_path)):
    pass
  assert capsys.readouterr().err == (
    f"warning: {tmp_path}/{LOCK_FILE}: No locks available; one run per workdir is not enforced\n"
  )


# ---------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------


FORCE_FILE_SIZE_LIMIT = os.environ.get("COE_JAX_TEST_FILE_SIZE_LIMIT") == "1"  # the non-root way


@contextlib.contextmanager
def small_disk(path: Path, kilobytes: int):
  """True with `path` on a tmpfs of `kilobytes` (as root), else False (limit file sizes)."""
  path.mkdir()
  command = ["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)]
  mounted = (
    not FORCE_FILE_SIZE_LIMIT
    and os.geteuid() == 0
    and subprocess.run(command, capture_output=True).returncode == 0
  )
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(["umount", str(path)], check=True)


def file_size_limit(kilobytes: int):
  """preexec_fn: no file of the child grows past `kilobytes` (EFBIG; Python ignores SIGXFSZ)."""
  limit = kilobytes * 1024
  return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


NO_CHECKPOINT = "no complete checkpoint was written yet"
# case: (flags, on a tmpfs: (KB, what, what is intact), with a file size limit: (KB, ...)).
FULL_DISK = {
  # The token cache (~60 KB, its largest file ~50 KB) does not fit: nothing is left behind.
  "token_cache": (
    {},
    (40, "the token cache", NO_CHECKPOINT),
    (40, "the token cache", NO_CHECKPOINT),
  ),
  # tmpfs: step 5's checkpoint (~560 KB) fits, step 10's does not. Limit: no checkpoint fits
  # (its largest file is ~430 KB), found by Orbax's writer after the save started.
  "checkpoint": (
    {"train__steps": 10},
    (1024, "checkpoint step 10", "the last complete checkpoint (step 5) is intact"),
    (100, "checkpoint step 5", NO_CHECKPOINT),
  ),
}


@pytest.mark.parametrize("case", FULL_DISK)
def test_a_full_disk_is_one_line_naming_the_path_and_what_is_intact(tmp_path, cli_env, case):
  changes, on_tmpfs, limited = FULL_DISK[case]
  disk = tmp_path / "disk"
  with small_disk(disk, on_tmpfs[0]) as mounted:
    kilobytes, what, kept = on_tmpfs if mounted else limited
    workdir = disk / "run"
    result = run_cli(
      "coe_jax.main",
      f"--workdir={workdir}",
      *cli_flags(**changes),
      env={**cli_env, **({} if mounted else {"JAX_ENABLE_COMPILATION_CACHE": "false"})},
      preexec_fn=None if mounted else file_size_limit(kilobytes),
    )
    line = one_error_line(result, 1)
    assert f"writing {what}" in line and kept in line and str(workdir) in line, line
    if mounted:
      assert "no space left on device" in line and "needs about" in line, line
    else:
      assert "file too large" in line or "write cut short" in line, line
    assert not list(disk.rglob(TMP_GLOB)) and not list(disk.rglob(".*.tmp"))
    if case == "token_cache":
      assert not workdir.exists()
    else:
      complete = [p.name for p in (workdir / "checkpoints").iterdir()]
      assert complete == (["5"] if mounted else [])


def test_a_read_only_disk_is_one_line_naming_the_path(tmp_path, cli_env):
  disk = tmp_path / "disk"
  disk.mkdir()
  command = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(disk)]
  if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
    pytest.skip("needs root to mount a read-only tmpfs (root ignores file permissions)")
  try:
    result = run_cli("coe_jax.main", f"--workdir={disk / 'run'}", *cli_flags(), env=cli_env)
  finally:
    subprocess.run(["umount", str(disk)], check=True)
  assert one_error_line(result, 1) == (
    f"error: {disk / 'run'}: read-only file system writing the run's files ; "
    f"{NO_CHECKPOINT} ; make it writable or use another --workdir"
  )
