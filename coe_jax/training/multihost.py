"""Several processes, one program: starting `jax.distributed`, which process writes the
artefacts (`is_primary`), a stop every process agrees on (`StopVote`), barriers and the check
that every process was started with the same flags."""

from __future__ import annotations

import hashlib
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from coe_jax.errors import ConfigError


def initialize_distributed(mesh_config: ml_collections.ConfigDict) -> bool:
  """Starts JAX's multi-process runtime when asked to; returns whether it did.

  Asked to: `mesh_config.distributed` is True, or `JAX_COORDINATOR_ADDRESS` is
  set. Config fields win over the environment; unset ones are left to JAX's
  cluster auto-detection.
  """
  if not wants_distributed(mesh_config, os.environ):
    return False
  address = _coordinator_address(mesh_config, os.environ)
  num_processes = mesh_config.get("num_processes", 0) or int(os.environ.get("JAX_NUM_PROCESSES", 0))
  process_id = mesh_config.get("process_id", -1)
  if process_id < 0:
    process_id = int(os.environ.get("JAX_PROCESS_ID", -1))
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(
    coordinator_address=address or None,
    num_processes=num_processes or None,
    process_id=None if process_id < 0 else process_id,
  )
  return True


def wants_distributed(mesh_config: ml_collections.ConfigDict, environ: Mapping[str, str]) -> bool:
  """Whether the run asks for several processes: `mesh.distributed`, or a coordinator address
  in the config or in `JAX_COORDINATOR_ADDRESS`."""
  return bool(mesh_config.get("distributed", False) or _coordinator_address(mesh_config, environ))


def _coordinator_address(mesh_config: ml_collections.ConfigDict, environ: Mapping[str, str]) -> str:
  return mesh_config.get("coordinator_address", "") or environ.get("JAX_COORDINATOR_ADDRESS", "")


class StopVote:
  """A stop request that any process raises, seen by all processes at the same step.

  `cast(local_request)` dispatches a tiny collective (the max of every
  process's flag) and returns it as a device scalar without waiting; the loop
  reads it one step later (when the step it followed has run anyway), so the
  host never blocks on the device for it. Every process reads every vote at
  the same point of the step schedule, so all of them see the same value
  there and stop at the same step.
  """

  def __init__(self, mesh: Mesh):
    self._mesh = mesh
    self._sharding = NamedSharding(mesh, P(mesh.axis_names))
    self._local_devices = len(self._sharding.addressable_devices)
    self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

  def cast(self, local_request: bool) -> jax.Array:
    flags = np.full((self._local_devices,), int(local_request), np.int32)
    votes = jax.make_array_from_process_local_data(self._sharding, flags, (self._mesh.size,))
    return self._max(votes)


def is_primary() -> bool:
  """Whether this is process 0, the one that writes logs and run artefacts."""
  return jax.process_index() == 0


def check_same_on_all_processes(text: str, what: str) -> None:
  """ConfigError on every process unless all processes pass the same `text` (e.g. their config).

  Processes launched with different flags (another seed, batch size or data)
  would otherwise train on inconsistent batches without any error.
  """
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(digest))
  differing = [i for i, other in enumerate(gathered) if not np.array_equal(other, gathered[0])]
  if differing:
    raise ConfigError(
      f"{what} of process(es) {differing} differs from process 0's (this is process "
      f"{jax.process_index()}); every process must be started with the same flags"
    )


def barrier(name: str) -> None:
  """All processes wait here for each other (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
