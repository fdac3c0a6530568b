"""A CPU host split into several XLA devices that train data-parallel (`config.mesh.cpu_devices`).

XLA:CPU runs a program's ops one after another, each op on the host's threads.
A narrow model's ops are too small for that to keep two cores busy (hidden 128:
[184, 128] x [128, 96] expert tiles, 4-head attention), so its one-device step
leaves part of the host idle. Split into d devices, the host runs d copies of
the step at once, each on its own rows of the batch: the data parallelism of d
accelerators (`coe_jax.training.sharding`), with the same result as one device
up to the order of float sums, because dropless routing is per token and the
load-balancing loss per sequence. Measured on 2 cores (experiments/PERF.md 37):
faster at hidden 128 and 256, not at 512, and slower with too few tokens a device.

JAX fixes the CPU's device count when its backend starts, so `split_host_for_run`
runs before anything touches a device: `coe_jax.main` calls it first. Libraries
and notebooks whose JAX is already running keep the devices they have.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import jax
import ml_collections

from coe_jax import host_memory
from coe_jax.errors import ConfigError

AUTO = 0  # mesh.cpu_devices: let `auto_cpu_devices` pick
MAX_AUTO_HIDDEN = 256  # wider models keep one device: their ops use the cores (512: 1.04x)
MIN_TOKENS_PER_DEVICE = 2048  # at 1024 the split gained nothing (0.95-1.06x), at 512 it lost
_FORCED_COUNT_FLAG = "--xla_force_host_platform_device_count"


def auto_cpu_devices(
  *,
  cores: int,
  batch_sizes: tuple[int, ...],
  seq: int,
  hidden: int,
  dropless: bool,
) -> int:
  """What `cpu_devices=0` splits a host of `cores` CPUs into for a single-process run.

  The most devices, at most `cores`, that divide every one of `batch_sizes`
  (the first is the train step's micro-batch) and leave each at least
  `MIN_TOKENS_PER_DEVICE` of its tokens; 1 for models wider than
  `MAX_AUTO_HIDDEN` and for capacity dispatch (per-device capacity would
  change which assignments drop).
  """
  if not dropless or hidden > MAX_AUTO_HIDDEN or not batch_sizes:
    return 1
  for devices in range(max(cores, 1), 1, -1):
    divides = all(size % devices == 0 for size in batch_sizes)
    if divides and batch_sizes[0] * seq // devices >= MIN_TOKENS_PER_DEVICE:
      return devices
  return 1


def requested_cpu_devices(config: ml_collections.ConfigDict, cores: int) -> int:
  """The device count `config.mesh.cpu_devices` asks for on a host of `cores` CPUs.

  `n >= 1` is n; `0` (auto) is `auto_cpu_devices` when the mesh is the default
  one (every device data-parallel) and one process runs, else 1.
  """
  mesh = config.get("mesh")
  if mesh is None:
    return 1
  value = mesh.get("cpu_devices", AUTO)
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ConfigError(
      f"mesh.cpu_devices: got {value!r}; must be an integer >= 0 "
      "(0 = auto: split a CPU host where that trains faster, 1 = one device, n = n devices)"
    )
  if value != AUTO:
    return value
  default_mesh = (mesh.get("data", -1), mesh.get("fsdp", 1), mesh.get("expert", 1)) == (-1, 1, 1)
  if not default_mesh or _distributed(mesh, os.environ):
    return 1
  train = config.train
  batch_sizes = [train.batch_size // max(train.get("grad_accum_steps", 1), 1)]
  batch_sizes.append(train.eval_batch_size)
  if train.get("paper_val", False):
    batch_sizes.append(train.paper_val_batch_size)
  return auto_cpu_devices(
    cores=cores,
    batch_sizes=tuple(batch_sizes),
    seq=config.data.max_length,
    hidden=config.model.hidden_size,
    dropless=config.model.get("dispatch", "dropless") == "dropless",
  )


def usable_cores() -> int:
  """The CPUs this process may run on (its affinity mask, e.g. under `taskset`)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_host_for_run(
  config: ml_collections.ConfigDict, environ: Optional[Mapping[str, str]] = None
) -> int:
  """Splits the CPU host into the devices `config.mesh.cpu_devices` asks for (`split_host`)."""
  return split_host(requested_cpu_devices(config, usable_cores()), environ)


def split_host(devices: int, environ: Optional[Mapping[str, str]] = None) -> int:
  """Makes JAX's CPU backend `devices` devices; returns how many it will have (1: unchanged).

  Nothing changes when JAX will not run on the CPU, when `XLA_FLAGS` already
  sets the host's device count (that flag wins), or when JAX's backend is
  already running (a notebook: it keeps its devices).
  """
  environ = os.environ if environ is None else environ
  if devices == 1 or not host_memory.jax_runs_on_cpu(environ):
    return 1
  if _FORCED_COUNT_FLAG in environ.get("XLA_FLAGS", ""):
    return 1
  try:
    jax.config.update("jax_num_cpu_devices", devices)
  except RuntimeError:  # the backend has started: its device count is fixed
    return 1
  return devices


def _distributed(mesh: ml_collections.ConfigDict, environ: Mapping[str, str]) -> bool:
  """Whether several processes will run (`multihost.initialize_distributed`'s test)."""
  return bool(mesh.get("distributed", False) or mesh.get("coordinator_address", "")) or bool(
    environ.get("JAX_COORDINATOR_ADDRESS", "")
  )
