"""experiments/ablation_runner.py: run locks, seed order, and concurrent runs pinned apart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import ablation, ablation_runner

PAIR = ("moe_k8", "coe_c2")


def test_run_lock_refuses_a_live_runner_and_takes_over_a_dead_ones(tmp_path):
  lock = tmp_path / ablation.LOCK_FILE
  lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # a live process: this one
  with pytest.raises(RuntimeError, match="being trained by another runner"):
    with ablation.run_lock(tmp_path):
      pass
  gone = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  lock.write_text(f"{socket.gethostname()} {int(gone.stdout)}")  # its process has exited
  with ablation.run_lock(tmp_path):
    assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
  assert not lock.exists()


class _FakeProcess:
  """A `subprocess.Popen` stand-in that records when it was started and waited for."""

  def __init__(self, events, command, **kwargs):
    self.name = Path(kwargs["stdout"].name).parent.as_posix()
    assert (Path(self.name) / ablation.LOCK_FILE).is_file()  # held while training
    self.returncode, self.events = 0, events
    events.append(("start", self.name, command))

  def poll(self):  # ends when first asked
    if not any(e[:2] == ("end", self.name) for e in self.events):
      self.events.append(("end", self.name, None))
    return self.returncode

  def wait(self):
    return self.poll()


def _fake_popen(monkeypatch) -> list:
  events, processes = [], []

  def popen(command, **kwargs):
    processes.append(_FakeProcess(events, command, **kwargs))
    return processes[-1]

  monkeypatch.setattr(subprocess, "Popen", popen)
  monkeypatch.setattr(ablation_runner, "core_groups", lambda n: [None] * n)  # pin nothing
  return events


def test_first_seed_trains_only_the_later_seeds(tmp_path, monkeypatch):
  events = _fake_popen(monkeypatch)
  workdirs = ablation.run_suite(
    PAIR, 5, ablation.Recipe(), tmp_path, log=lambda _: None, first_seed=3
  )
  assert [w.relative_to(tmp_path).as_posix() for w in workdirs] == [
    "moe_k8/seed3",
    "coe_c2/seed3",
    "moe_k8/seed4",
    "coe_c2/seed4",
  ]
  commands = [c for kind, _, c in events if kind == "start"]
  assert [c[c.index("-m") + 1] for c in commands] == ["coe_jax.main"] * 4
  assert [kind for kind, *_ in events] == ["start", "end"] * 4  # one run after another
  assert not any((w / ablation.LOCK_FILE).exists() for w in workdirs)


def test_concurrent_runs_a_seeds_configs_at_once_and_seeds_in_order(tmp_path, monkeypatch):
  events = _fake_popen(monkeypatch)
  ablation.run_suite(PAIR, 2, ablation.Recipe(), tmp_path, log=lambda _: None, concurrent=True)
  runs = [Path(name).relative_to(tmp_path).as_posix() for _, name, _ in events]
  assert [kind for kind, *_ in events] == ["start", "start", "end", "end"] * 2
  assert runs[:4] == ["moe_k8/seed0", "coe_c2/seed0"] * 2 and runs[4:6] == [
    "moe_k8/seed1",
    "coe_c2/seed1",
  ]
  assert not any((tmp_path / r / ablation.LOCK_FILE).exists() for r in runs)


def test_concurrent_finished_runs_are_skipped_and_a_failure_names_its_run(tmp_path, monkeypatch):
  events = _fake_popen(monkeypatch)
  monkeypatch.setattr(ablation_runner, "is_finished", lambda w: w.name == "seed0")
  real_popen = subprocess.Popen

  def failing(command, **kwargs):
    process = real_popen(command, **kwargs)
    if "coe_c2" in process.name:
      process.returncode = 3
    return process

  monkeypatch.setattr(subprocess, "Popen", failing)
  with pytest.raises(RuntimeError, match=r"coe_c2 seed 1 \(exit 3; see .*coe_c2/seed1/train.log"):
    ablation.run_suite(PAIR, 2, ablation.Recipe(), tmp_path, log=lambda _: None, concurrent=True)
  assert [kind for kind, *_ in events] == ["start", "start", "end", "end"]  # seed 1 only


def test_core_groups_deal_the_cpus_apart():
  assert ablation_runner.core_groups(2, [0, 1, 2, 3, 4]) == [{0, 2, 4}, {1, 3}]
  assert ablation_runner.core_groups(1, [5]) == [{5}]
  with pytest.raises(ValueError, match="3 concurrent runs need as many CPUs; this process has 2"):
    ablation_runner.core_groups(3, [0, 1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_concurrent_processes_really_run_pinned_to_disjoint_cpus(tmp_path, monkeypatch):
  """Real processes: each prints the CPUs it may run on into its train.log."""
  show = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
  monkeypatch.setattr(ablation_runner, "train_command", lambda *a: show)
  ablation.run_suite(PAIR, 1, ablation.Recipe(), tmp_path, log=lambda _: None, concurrent=True)
  seen = [json.loads((tmp_path / n / "seed0" / "train.log").read_text()) for n in PAIR]
  assert all(seen) and not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == os.sched_getaffinity(0)


def test_a_runner_that_stops_kills_the_runs_it_started_before_unlocking(tmp_path, monkeypatch):
  """coe_c2's run is locked by a live runner: the runner stops, and the moe_k8 trainer it had
  already started is killed, then its lock released."""
  sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
  monkeypatch.setattr(ablation_runner, "train_command", lambda *a: sleeper)
  monkeypatch.setattr(ablation_runner, "core_groups", lambda n: [None] * n)
  started, real_popen = [], subprocess.Popen
  monkeypatch.setattr(
    subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1]
  )
  busy = tmp_path / "coe_c2" / "seed0"
  busy.mkdir(parents=True)
  (busy / ablation.LOCK_FILE).write_text(f"{socket.gethostname()} {os.getpid()}")
  with pytest.raises(RuntimeError, match="being trained by another runner"):
    ablation.run_suite(PAIR, 1, ablation.Recipe(), tmp_path, log=lambda _: None, concurrent=True)
  assert len(started) == 1 and started[0].returncode is not None  # killed and reaped
  assert not (tmp_path / "moe_k8" / "seed0" / ablation.LOCK_FILE).exists()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_concurrent_runs_log_each_end_as_it_happens(tmp_path, monkeypatch):
  quick = [sys.executable, "-c", "pass"]
  slow = [sys.executable, "-c", "import time; time.sleep(1.5)"]
  monkeypatch.setattr(
    ablation_runner, "train_command", lambda n, *a: slow if n == "moe_k8" else quick
  )
  monkeypatch.setattr(ablation_runner, "POLL_SECONDS", 0.05)
  lines = []
  ablation.run_suite(PAIR, 1, ablation.Recipe(), tmp_path, log=lines.append, concurrent=True)
  ends = [line.split()[1] for line in lines if line.startswith("[done]")]
  assert ends == ["coe_c2", "moe_k8"]  # the quick run is logged first, not in start order


def test_concurrent_runs_at_most_one_run_a_cpu(tmp_path, monkeypatch):
  events = _fake_popen(monkeypatch)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one CPU: the runs take turns
  ablation.run_suite(PAIR, 1, ablation.Recipe(), tmp_path, log=lambda _: None, concurrent=True)
  assert [kind for kind, *_ in events] == ["start", "end", "start", "end"]
