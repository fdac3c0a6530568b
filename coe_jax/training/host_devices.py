"""A CPU host split into several XLA devices that train data-parallel (`config.mesh.cpu_devices`).

XLA:CPU runs a program's ops one after another, each op on the host's threads.
A narrow model's ops are too small for that to keep two cores busy (hidden 128:
[184, 128] x [128, 96] expert tiles, 4-head attention), so its one-device step
leaves part of the host idle. Split into d devices, the host runs d copies of
the step at once, each on its own rows of the batch: the data parallelism of d
accelerators (`coe_jax.training.sharding`), with the same result as one device
up to the order of float sums, because dropless routing is per token and the
load-balancing loss per sequence. Measured on 2 cores (experiments/PERF.md 37):
faster at hidden 128 and 256 and vocabularies up to 16,384; not at hidden 512 or vocabulary
102,400, and slower with too few tokens a device.

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
from coe_jax.training import multihost, train_config

AUTO = 0  # mesh.cpu_devices: let `auto_cpu_devices` pick
MAX_AUTO_HIDDEN = 256  # wider models keep one device: their ops use the cores (512: 1.04x)
MAX_AUTO_DEVICES = 2  # the most auto splits into: what was measured (on 2 cores)
MIN_TOKENS_PER_DEVICE = 2048  # at 1024 the split gained nothing (0.95-1.06x), at 512 it lost
MAX_AUTO_VOCAB = 16384  # 5,620 and 16,384 gained 1.16-1.27x; at 102,400 the head's matmul uses
# the cores already and a mesh's logits path costs more than the fused head (0.81-1.07x)
_FORCED_COUNT_FLAG = "--xla_force_host_platform_device_count"


def auto_cpu_devices(
  *,
  cores: int,
  batch_sizes: tuple[int, ...],
  seq: int,
  hidden: int,
  vocab: Optional[int],
  dropless: bool,
) -> int:
  """What `cpu_devices=0` splits a host of `cores` CPUs into for a single-process run.

  The most devices, at most `cores`, that divide every one of `batch_sizes`
  (the first is the train step's micro-batch) and leave each at least
  `MIN_TOKENS_PER_DEVICE` of its tokens; 1 for models wider than
  `MAX_AUTO_HIDDEN`, for a vocabulary over `MAX_AUTO_VOCAB` or not known
  (None), and for capacity dispatch (per-device capacity would change which
  assignments drop).
  """
  small_head = vocab is not None and vocab <= MAX_AUTO_VOCAB
  if not dropless or hidden > MAX_AUTO_HIDDEN or not small_head or not batch_sizes:
    return 1
  for devices in range(max(cores, 1), 1, -1):
    divides = all(size % devices == 0 for size in batch_sizes)
    if divides and batch_sizes[0] * seq // devices >= MIN_TOKENS_PER_DEVICE:
      return devices
  return 1


def requested_cpu_devices(config: ml_collections.ConfigDict, cores: int) -> int:
  """The device count `config.mesh.cpu_devices` asks for on a host of `cores` CPUs.

  `n >= 1` is n; `0` (auto) is `auto_cpu_devices` over at most `MAX_AUTO_DEVICES`
  of the cores when the mesh is the default one (every device data-parallel) and
  one process runs, else 1.
  """
  mesh = config.get("mesh")
  if mesh is None:
    return 1
  train_config.validate_mesh_config(mesh)
  value = mesh.get("cpu_devices", AUTO)
  if value != AUTO:
    return value
  default_mesh = (mesh.get("data", -1), mesh.get("fsdp", 1), mesh.get("expert", 1)) == (-1, 1, 1)
  if not default_mesh or multihost.wants_distributed(mesh, os.environ):
    return 1
  return auto_cpu_devices(
    cores=min(cores, MAX_AUTO_DEVICES),
    batch_sizes=tuple(train_config.sharded_batch_sizes(config.train).values()),
    seq=config.data.max_length,
    hidden=config.model.hidden_size,
    vocab=expected_vocab(config),
    dropless=config.model.get("dispatch", "dropless") == "dropless",
  )


def expected_vocab(config: ml_collections.ConfigDict) -> Optional[int]:
  """The vocabulary as far as the config tells before any tokenizer loads (the split must be
  decided before JAX starts): `model.vocab_size`, else the trained BPE's `data.vocab_size`,
  else twice `data.trim_vocab` (a trimmed vocabulary also keeps the pieces its tokens merge
  from: 4,096 kept of OLMoE's gave 5,620); None for a tokenizer used whole."""
  model_vocab = config.model.get("vocab_size", 0)
  if model_vocab:
    return model_vocab
  data = config.data
  if data.get("tokenizer", "bpe") == "bpe":
    return data.get("vocab_size", 2048)
  return 2 * data.trim_vocab if data.get("trim_vocab", 0) else None


def user_set_cpu_devices() -> bool:
  """Whether JAX's CPU device count was set before us (`JAX_NUM_CPU_DEVICES` or the config)."""
  return jax.config.jax_num_cpu_devices >= 0


def usable_cores() -> int:
  """The CPUs this process may run on (its affinity mask, e.g. under `taskset`)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_host_for_run(
  config: ml_collections.ConfigDict, environ: Optional[Mapping[str, str]] = None
) -> int:
  """Splits the CPU host into the devices `config.mesh.cpu_devices` asks for (`split_host`)."""
  return split_host(requested_cpu_devices(config, usable_cores()), environ)


def split_message(config: ml_collections.ConfigDict, devices: int) -> str:
  """The line a run prints when its host was split into `devices` devices."""
  line = f"CPU host split into {devices} devices, data-parallel (mesh.cpu_devices=1: one)."
  if config.model.get("dispatch", "dropless") != "dropless":
    line += " Capacity dispatch: each device drops against the capacity of its own tokens."
  return line


def split_host(devices: int, environ: Optional[Mapping[str, str]] = None) -> int:
  """Makes JAX's CPU backend `devices` devices; returns how many it will have (1: unchanged).

  Nothing changes when JAX will not run on the CPU, when the user set the
  host's device count already (`--xla_force_host_platform_device_count` in
  `XLA_FLAGS`, or `JAX_NUM_CPU_DEVICES`: theirs wins), or when JAX's backend is
  already running (a notebook: it keeps its devices).
  """
  environ = os.environ if environ is None else environ
  if devices == 1 or not host_memory.jax_runs_on_cpu(environ):
    return 1
  if _FORCED_COUNT_FLAG in environ.get("XLA_FLAGS", "") or user_set_cpu_devices():
    return 1
  try:
    jax.config.update("jax_num_cpu_devices", devices)
  except RuntimeError:  # the backend has started: its device count is fixed
    return 1
  return devices
