"""The CPU allocator settings: when a command re-executes, and that they stop per-step page faults."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coe_jax import host_memory

REPO = Path(__file__).resolve().parents[1]
ON_GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
CPU = {"JAX_PLATFORMS": "cpu"}


ALL_NAMES = (*host_memory.GLIBC_MALLOC_SETTINGS, host_memory.OPT_OUT, host_memory._REEXECUTED)


def without_settings(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ALL_NAMES}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
  return {**env, **extra}


@pytest.mark.skipif(not ON_GLIBC, reason="glibc's allocator settings")
def test_missing_settings_are_added_and_the_users_own_values_kept():
  env = host_memory.malloc_environment({**CPU, "MALLOC_ARENA_MAX": "4", "HOME": "/h"})
  assert env["MALLOC_ARENA_MAX"] == "4"
  assert env["MALLOC_MMAP_MAX_"] == "0"
  assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 40
  assert env["HOME"] == "/h"
  assert env[host_memory._REEXECUTED] == "1"


@pytest.mark.parametrize(
  "environ",
  [
    {**CPU, **host_memory.GLIBC_MALLOC_SETTINGS},  # already there
    {**CPU, host_memory.OPT_OUT: "system"},  # the user's opt-out
    {**CPU, host_memory._REEXECUTED: "1"},  # never a second re-exec
    {"JAX_PLATFORMS": "cuda,cpu"},  # an accelerator: host memory is not the step's memory
    {"JAX_PLATFORMS": "tpu"},
  ],
)
def test_no_reexec_when_the_settings_are_set_unwanted_or_for_an_accelerator(environ):
  assert host_memory.malloc_environment(environ) is None


def test_jax_platforms_decides_before_the_installed_plugins(monkeypatch):
  monkeypatch.setattr(host_memory, "_accelerator_plugins_installed", lambda: True)
  assert host_memory.jax_runs_on_cpu({"JAX_PLATFORMS": " CPU "})
  assert not host_memory.jax_runs_on_cpu({"JAX_PLATFORMS": "cuda"})
  assert not host_memory.jax_runs_on_cpu({})  # a GPU plugin installed: JAX would pick the GPU
  assert host_memory.malloc_environment({}) is None
  monkeypatch.setattr(host_memory, "_accelerator_plugins_installed", lambda: False)
  assert host_memory.jax_runs_on_cpu({})


@pytest.mark.skipif(not ON_GLIBC, reason="glibc's allocator settings")
def test_inside_ipython_or_when_exec_fails_the_process_just_goes_on(monkeypatch, capsys):
  for name in ALL_NAMES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  calls = []

  def failing_execve(*args):
    calls.append(args)
    raise OSError("no such interpreter")

  monkeypatch.setattr(os, "execve", failing_execve)
  monkeypatch.setattr(sys, "gettrace", lambda: None)  # also under a coverage tracer
  monkeypatch.setitem(sys.modules, "IPython", object())
  host_memory.reexec_keeping_host_memory()  # `%run` in a notebook: never replace the kernel
  assert calls == []
  monkeypatch.delitem(sys.modules, "IPython")
  host_memory.reexec_keeping_host_memory()
  assert len(calls) == 1 and calls[0][2]["MALLOC_ARENA_MAX"] == "1"
  assert "continuing with its defaults" in capsys.readouterr().err


SHOW_ENV = """
import json, os, sys
from coe_jax import host_memory
print("started", flush=True)
host_memory.reexec_keeping_host_memory()
names = (*host_memory.GLIBC_MALLOC_SETTINGS, host_memory.OPT_OUT)
env = {k: os.environ.get(k) for k in names}
print(json.dumps(dict(argv=sys.argv[1:], utf8_mode=sys.flags.utf8_mode, env=env)))
"""


@pytest.mark.skipif(not ON_GLIBC, reason="glibc's allocator settings")
@pytest.mark.parametrize("opt_out", [False, True])
def test_a_command_reexecutes_itself_once_with_its_arguments(tmp_path, opt_out):
  script = tmp_path / "show_env.py"
  script.write_text(SHOW_ENV)
  env = without_settings(**CPU, **({host_memory.OPT_OUT: "system"} if opt_out else {}))
  out = subprocess.run(
    [sys.executable, "-X", "utf8", str(script), "--flag=1", "two words"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert out[:-1] == ["started"] * (1 if opt_out else 2)  # the re-executed process starts again
  shown = json.loads(out[-1])
  assert shown["argv"] == ["--flag=1", "two words"]
  assert shown["utf8_mode"] == 1  # interpreter flags survive the re-exec
  expected = (
    {k: None for k in host_memory.GLIBC_MALLOC_SETTINGS}
    if opt_out
    else host_memory.GLIBC_MALLOC_SETTINGS
  )
  assert {k: shown["env"][k] for k in host_memory.GLIBC_MALLOC_SETTINGS} == expected


COUNT_FAULTS = """
import json, resource, sys
from coe_jax import host_memory
host_memory.reexec_keeping_host_memory()
import jax, jax.numpy as jnp
n = 4096  # the [n, n] float32 temporary is 64 MiB: over glibc's largest mmap threshold
step = jax.jit(lambda a, b: jnp.sum((a @ b + 1.0) @ a))
a, b = jnp.ones((n, 8), jnp.float32), jnp.ones((8, n), jnp.float32)
for _ in range(2):
  step(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  step(a, b).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps(dict(faults_per_call=(after - before) / 4, pages=n * n * 4 // 4096)))
"""


def transparent_huge_pages_always() -> bool:
  try:
    return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
  except OSError:
    return False


@pytest.mark.skipif(not ON_GLIBC, reason="glibc's allocator settings")
def test_with_the_settings_a_programs_temporary_memory_is_reused_not_faulted_in_again(tmp_path):
  script = tmp_path / "count_faults.py"
  script.write_text(textwrap.dedent(COUNT_FAULTS))

  def faults(**extra):
    result = subprocess.run(
      [sys.executable, str(script)],
      env=without_settings(**CPU, XLA_FLAGS="", **extra),
      capture_output=True,
      text=True,
      check=True,
    )
    return json.loads(result.stdout.splitlines()[-1])

  reused = faults()
  assert reused["faults_per_call"] < 0.1 * reused["pages"]
  if not transparent_huge_pages_always():  # then each fresh 2 MiB page is a single fault
    fresh = faults(**{host_memory.OPT_OUT: "system"})
    assert fresh["faults_per_call"] > 0.5 * fresh["pages"]


def test_available_memory_is_memavailable_or_a_cgroups_room_if_smaller(tmp_path):
  meminfo = tmp_path / "meminfo"
  meminfo.write_text("MemTotal:       8000 kB\nMemAvailable:   4000 kB\n")
  v2, v1 = tmp_path / "v2", tmp_path / "v1"
  v2.mkdir()
  v1.mkdir()
  dirs = [
    (str(v2), "memory.max", "memory.current", "inactive_file"),
    (str(v1), "limit", "usage", "total_inactive_file"),
    (str(tmp_path / "absent"), "limit", "usage", "total_inactive_file"),
  ]
  (v2 / "memory.max").write_text("max\n")
  (v2 / "memory.current").write_text("100\n")
  (v1 / "limit").write_text("9223372036854771712\n")  # v1's "no limit"
  (v1 / "usage").write_text("100\n")
  assert host_memory.available_bytes(str(meminfo), dirs) == 4000 * 1024
  (v2 / "memory.max").write_text(f"{3000 * 1024 + 100}\n")
  assert host_memory.available_bytes(str(meminfo), dirs) == 3000 * 1024
  # Page cache the kernel can reclaim is room too.
  (v2 / "memory.current").write_text(f"{2000 * 1024 + 100}\n")
  (v2 / "memory.stat").write_text(f"anon 100\ninactive_file {1000 * 1024}\n")
  assert host_memory.available_bytes(str(meminfo), dirs) == 2000 * 1024
  assert host_memory.available_bytes(str(tmp_path / "absent"), []) is None
  if sys.platform == "linux":
    assert host_memory.available_bytes() is not None


def test_the_memory_cgroups_are_this_processs_own_and_its_parents(tmp_path):
  proc = tmp_path / "cgroup"
  proc.write_text("4:memory:/jobs/42\n3:cpu,cpuacct:/jobs/42\n0::/user.slice/job\n")
  dirs = host_memory.cgroup_memory_dirs(str(proc), "/cg")
  assert [d[0] for d in dirs] == [
    "/cg/memory/jobs/42",
    "/cg/memory/jobs",
    "/cg/memory",
    "/cg/user.slice/job",
    "/cg/user.slice",
    "/cg",
  ]
  assert dirs[0][1:] == ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
  assert dirs[-1][1:] == ("memory.max", "memory.current", "inactive_file")
  assert host_memory.cgroup_memory_dirs(str(tmp_path / "absent")) == []
