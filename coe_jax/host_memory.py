"""Host memory that stays mapped between steps, for CPU runs (glibc's allocator settings).

XLA:CPU allocates each program's temporary buffer (gigabytes for one
paper-width train step) when the program starts and frees it when it ends.
With glibc's defaults a block that large is a fresh `mmap` every time, so the
kernel zero-fills every page of it again on every step, and the step pays for
those page faults (measurements: experiments/PERF.md 19).
Three of glibc's settings make the allocator keep and reuse the memory:

- `MALLOC_ARENA_MAX=1`: every thread allocates from the main heap (blocks over
  64 MiB from any other arena are always `mmap`ed);
- `MALLOC_MMAP_MAX_=0`: no block is `mmap`ed, however large;
- `MALLOC_TRIM_THRESHOLD_`: freed memory at the top of the heap is not given back.

The settings must be in the environment when the process starts, so the
command-line programs re-execute themselves once with them
(`reexec_keeping_host_memory`, first thing in `__main__`; the imports done
before it, JAX's included, are done again). The process keeps its peak
host memory until it exits. Nothing changes where the settings do not apply (not
Linux with glibc, or JAX runs on an accelerator), when `COE_JAX_HOST_MALLOC=system`,
inside IPython or under a debugger (a re-exec would end the session), or if the
re-exec itself fails. Libraries and notebooks that import coe_jax are never
re-executed; export the variables of `GLIBC_MALLOC_SETTINGS` before starting
Python to get the same speed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
from typing import Mapping, Optional

GLIBC_MALLOC_SETTINGS = {
  "MALLOC_ARENA_MAX": "1",
  "MALLOC_MMAP_MAX_": "0",
  "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
}
OPT_OUT = "COE_JAX_HOST_MALLOC"  # "system": keep glibc's defaults
_REEXECUTED = "_COE_JAX_HOST_MALLOC_REEXECUTED"  # set in the re-executed process
# A memory cgroup's limit, usage and reclaimable page cache (the key in its memory.stat): v2, v1.
_CGROUP_V2_FILES = ("memory.max", "memory.current", "inactive_file")
_CGROUP_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def jax_runs_on_cpu(environ: Mapping[str, str]) -> bool:
  """Whether JAX will pick the CPU, judged without initialising a backend (which would be
  wasted work before a re-exec).

  `JAX_PLATFORMS` decides when set (its first entry); otherwise the CPU is
  JAX's choice exactly when no accelerator plugin is installed (a machine with
  a plugin but no device: set `JAX_PLATFORMS=cpu`).
  """
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not _accelerator_plugins_installed()


def _accelerator_plugins_installed() -> bool:
  """JAX's own plugin discovery (the `jax_plugins` namespace and entry points), and libtpu."""
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  namespace = importlib.util.find_spec("jax_plugins")
  if namespace is not None and any(pkgutil.iter_modules(namespace.submodule_search_locations)):
    return True
  return importlib.util.find_spec("libtpu") is not None


def malloc_environment(environ: Mapping[str, str]) -> Optional[dict[str, str]]:
  """The environment to re-execute with, or None when the current one is already right.

  Variables the user set keep their values; only missing ones are added.
  """
  if environ.get(OPT_OUT, "").lower() == "system" or environ.get(_REEXECUTED):
    return None
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return None
  missing = {k: v for k, v in GLIBC_MALLOC_SETTINGS.items() if k not in environ}
  if not missing or not jax_runs_on_cpu(environ):
    return None
  return {**environ, **missing, _REEXECUTED: "1"}


def active_settings() -> dict[str, str]:
  """The allocator variables this process started with (for benchmark records)."""
  return {k: os.environ[k] for k in (*GLIBC_MALLOC_SETTINGS, OPT_OUT) if k in os.environ}


def available_bytes(
  meminfo: str = "/proc/meminfo", cgroup_dirs: Optional[list[tuple[str, ...]]] = None
) -> Optional[int]:
  """Host memory this process can still take: the kernel's MemAvailable, or less where a
  memory cgroup of this process (`cgroup_memory_dirs`) has a limit with less room under it;
  None where neither can be read. A cgroup's room is its limit less its usage, page cache
  that the kernel can reclaim (inactive files) not counted as used."""
  candidates = []
  fields = dict(line.split(":", 1) for line in _read_lines(meminfo) if ":" in line)
  if "MemAvailable" in fields:
    candidates.append(int(fields["MemAvailable"].split()[0]) * 1024)  # reported in kB
  for directory, limit_file, usage_file, inactive_key in (
    cgroup_memory_dirs() if cgroup_dirs is None else cgroup_dirs
  ):
    limit = _read_int(os.path.join(directory, limit_file))
    usage = _read_int(os.path.join(directory, usage_file))
    if limit is None or usage is None or limit >= 1 << 60:  # no limit: "max" (v2), ~2^63 (v1)
      continue
    stat_lines = _read_lines(os.path.join(directory, "memory.stat"))
    stat = dict(line.split(" ", 1) for line in stat_lines if " " in line)
    inactive = stat.get(inactive_key, "0").strip()
    inactive = int(inactive) if inactive.isdigit() else 0
    candidates.append(max(limit - max(usage - inactive, 0), 0))
  return min(candidates) if candidates else None


def cgroup_memory_dirs(
  proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> list[tuple[str, ...]]:
  """(directory, limit file, usage file, inactive-file key) of this process's memory cgroups,
  from its own up to the root, v2 and v1 (directories that do not exist are read as no limit)."""
  dirs = []
  for line in _read_lines(proc_cgroup):
    hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
    if hierarchy == "0" and not controllers:
      base, files = root, _CGROUP_V2_FILES
    elif "memory" in controllers.split(","):
      base, files = os.path.join(root, "memory"), _CGROUP_V1_FILES
    else:
      continue
    parts = [p for p in path.split("/") if p]
    dirs += [(os.path.join(base, *parts[:i]), *files) for i in range(len(parts), -1, -1)]
  return dirs


def _read_int(path: str) -> Optional[int]:
  lines = _read_lines(path)
  return int(lines[0]) if lines and lines[0].strip().isdigit() else None


def _read_lines(path: str) -> list[str]:
  try:
    with open(path) as f:
      return f.read().splitlines()
  except OSError:
    return []


def reexec_keeping_host_memory() -> None:
  """Re-executes this command (same interpreter, flags and arguments) with the allocator
  settings above when they apply and are missing; returns without doing anything otherwise
  (and, with a warning on stderr, when the re-exec fails)."""
  if "IPython" in sys.modules or sys.gettrace() is not None:  # `%run`, pdb, debugpy
    return
  environ = malloc_environment(os.environ)
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
  except OSError as error:
    print(
      f"coe_jax: could not re-execute with glibc's allocator settings ({error}); "
      "continuing with its defaults",
      file=sys.stderr,
    )
