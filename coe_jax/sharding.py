"""Data, expert and FSDP parallelism with JAX's own SPMD machinery.

The mesh has three named axes, `data`, `fsdp` and `expert` (config section
`config.mesh`, defaults in `config_lib.build`), with `expert` innermost so that
the all-to-all traffic stays between neighbouring devices.

* Batch: the leading axis of every batch array is split over all three axes
  (`BATCH_AXES`): every device holds different sequences. Attention, norms,
  the head and the loss run data-parallel under `jax.jit`; XLA's SPMD
  partitioner propagates that sharding and inserts the gradient all-reduces.
* Params and optimizer state (`state_shardings`): the stacked routed-expert
  weights `[layers, E, ...]` are split over `expert` on their E axis; with
  `fsdp > 1` every matrix (experts included) is also split over `fsdp` on its
  largest divisible axis, and XLA all-gathers it where it is used (ZeRO-3).
  The rules look only at a leaf's tree path and shape, and Optax's moment
  trees repeat the param paths, so the AdamW state is sharded exactly like the
  params it tracks.
* Expert dispatch (`shard_expert_pass`): each CoE iteration's routed pass runs
  under `jax.shard_map` over the whole mesh. A device routes its own tokens,
  packs them into its local [E, capacity, hidden] buffer (capacity and drops
  are per device, computed from its local token count, as in GShard/Switch),
  and `jax.lax.all_to_all` over `expert` sends each expert's rows to the device
  that holds that expert. The device runs its E/n experts on the n * capacity
  rows it received and a second all-to-all returns the results; the combine
  is local. The transpose of an all-to-all is an all-to-all, so the backward
  pass has the same two exchanges, and shard_map's replication checks make
  the router and shared-expert gradients sum over the mesh.
  Why shard_map and not sharding constraints on the buffer: the buffer is
  built by a data-dependent gather, which the SPMD partitioner cannot prove
  to be a permutation between token shards and expert shards, so it
  all-gathers tokens (or the buffer) instead of emitting an all-to-all.
  shard_map makes the exchange explicit, its size static (E x capacity x
  hidden per device each way) and the routing and sorting device-local.
  Dropless dispatch under expert parallelism uses the same exchange with
  capacity = the device's token count (nothing can drop); with `expert == 1`
  every dispatch mode runs unchanged per device (dropless: `dropless_impl`).
  With `fsdp == expert == 1` the layer still routes per device (data
  parallel), so nothing outside the batch axes is ever gathered.
  Equality with one device: exact (up to float summation order) whenever no
  assignment is dropped; with drops, capacity is per device by design.
* Multi-host: `initialize_distributed` calls `jax.distributed.initialize`
  from `config.mesh` or the `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` /
  `JAX_PROCESS_ID` environment variables (empty values: JAX's own cluster
  detection on TPU pods, SLURM, Open MPI). Every process computes the same
  global batch; `shard_batch` hands each device its rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from coe_jax.dispatch import expert_capacity
from coe_jax.model_config import ConfigError, ModelConfig
from coe_jax.router import RouterOutput

MESH_AXES = ("data", "fsdp", "expert")
BATCH_AXES = MESH_AXES
EXPERT_PARAM_NAME = "routed_experts"


# ---------------------------------------------------------------------------
# Mesh construction and multi-host start
# ---------------------------------------------------------------------------

def initialize_distributed(mesh_config: ml_collections.ConfigDict) -> bool:
  """Starts JAX's multi-process runtime when asked to; returns whether it did.

  Asked to: `mesh_config.distributed` is True, or `JAX_COORDINATOR_ADDRESS` is
  set. Config fields win over the environment; unset ones are left to JAX's
  cluster auto-detection.
  """
  address = mesh_config.get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not (mesh_config.get("distributed", False) or address):
    return False
  num_processes = mesh_config.get("num_processes", 0) or int(os.environ.get("JAX_NUM_PROCESSES", 0))
  process_id = mesh_config.get("process_id", -1)
  if process_id < 0:
    process_id = int(os.environ.get("JAX_PROCESS_ID", -1))
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=address or None,
                             num_processes=num_processes or None,
                             process_id=None if process_id < 0 else process_id)
  return True


def mesh_shape(data: int, fsdp: int, expert: int, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, expert) with one -1 filled in so that the product is `num_devices`."""
  sizes = {"data": data, "fsdp": fsdp, "expert": expert}
  for name, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{name}: got {size!r}; must be an integer >= 1 or -1 (the rest)")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1; got {free}")
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh: {num_devices} devices do not divide into the fixed axes' {fixed}")
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ConfigError(f"mesh: data x fsdp x expert = {sizes} must multiply to the {num_devices} devices")
  return sizes["data"], sizes["fsdp"], sizes["expert"]


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1,
              devices: Optional[list] = None) -> Mesh:
  """A (data, fsdp, expert) mesh over `devices` (default: all), automatic sharding mode."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, fsdp, expert, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_from_config(config: ml_collections.ConfigDict) -> Optional[Mesh]:
  """The mesh of `config.mesh`, or None (plain single-device code) on one device."""
  mesh_config = config.get("mesh")
  if mesh_config is None:
    return None
  initialize_distributed(mesh_config)
  if jax.device_count() == 1:
    mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.expert, 1)  # still validate
    return None
  return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.expert)


def validate_for_mesh(mesh: Mesh, model: ModelConfig, batch_sizes: dict[str, int]) -> None:
  """ConfigError unless experts and every batch split evenly over `mesh`."""
  experts = mesh.shape["expert"]
  if model.n_routed_experts % experts:
    divisors = [n for n in range(1, model.n_routed_experts + 1) if model.n_routed_experts % n == 0]
    raise ConfigError(f"mesh.expert: got {experts}; must divide model.n_routed_experts="
                      f"{model.n_routed_experts} (allowed: {divisors})")
  shards = batch_shards(mesh)
  for field, size in batch_sizes.items():
    if size % shards:
      raise ConfigError(f"{field}: got {size}; must be divisible by data x fsdp x expert = {shards}")


def batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[name] for name in BATCH_AXES]))


# ---------------------------------------------------------------------------
# Param, optimizer-state and batch shardings
# ---------------------------------------------------------------------------

def _path_names(path) -> list[str]:
  return [str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path]


def param_spec(path_names: list[str], shape: tuple[int, ...], axis_sizes: dict[str, int]) -> P:
  """PartitionSpec of one param (or optimizer-moment) leaf from its tree path and shape.

  Routed experts `[..., E, a, b]`: E over `expert`. Any leaf of rank >= 2:
  its largest axis divisible by the fsdp size (and not already split) over `fsdp`.
  """
  spec: list[Any] = [None] * len(shape)
  if EXPERT_PARAM_NAME in path_names and len(shape) >= 3 and axis_sizes["expert"] > 1:
    spec[len(shape) - 3] = "expert"
  fsdp = axis_sizes["fsdp"]
  if fsdp > 1 and len(shape) >= 2:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*spec)


def state_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a param / TrainState tree (see `param_spec`)."""
  sizes = dict(mesh.shape)

  def sharding(path, leaf):
    return NamedSharding(mesh, param_spec(_path_names(path), tuple(np.shape(leaf)), sizes))

  return jax.tree_util.tree_map_with_path(sharding, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over every mesh axis, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from a host batch that every process holds in full."""
  sharding = batch_sharding(mesh)

  def put(value):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return {name: put(value) for name, value in batch.items()}


def constrain_micro_batches(micro_batches: Any) -> Any:
  """Keeps each micro-batch split over the batch axes after the [accum, micro] reshape.

  A no-op outside a mesh; inside one, without it the partitioner would split
  the accumulation axis instead and run each micro-batch on a few devices.
  """
  mesh = active_mesh()
  if mesh is None:
    return micro_batches
  return jax.lax.with_sharding_constraint(micro_batches, P(None, BATCH_AXES))


# ---------------------------------------------------------------------------
# Expert parallelism inside the CoE layer
# ---------------------------------------------------------------------------

def active_mesh(batch_size: Optional[int] = None) -> Optional[jax.sharding.AbstractMesh]:
  """The mesh set by `jax.set_mesh` while tracing, if it has this module's axes.

  With `batch_size`: None also when the batch does not split evenly over the
  batch axes (e.g. a one-sequence init or decode call), where the layer's
  plain code runs and XLA's partitioner handles the sharding.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  if batch_size is not None and batch_size % batch_shards(mesh):
    return None
  return mesh


def shard_expert_pass(expert_pass: Callable, cfg: ModelConfig, capacity_factor: float,
                      mesh: jax.sharding.AbstractMesh) -> Callable:
  """`expert_pass` of `coe_layer` run per device under shard_map (see module docstring).

  Returns `fn(u, router_weight, routed, shared, token_mask) -> (m, routing, kept)`
  with global shapes; the capacity is recomputed from each device's tokens.
  `expert_pass(u, router_weight, routed, shared, cfg, capacity, token_mask,
  expert_axis)` is the single-device pass.
  """
  expert_axis = "expert" if mesh.shape["expert"] > 1 else None
  tokens = P(BATCH_AXES)
  expert_weights = P("expert") if expert_axis else P()

  def local_pass(u, router_weight, routed, shared, token_mask):
    batch, seq, _ = u.shape
    capacity = expert_capacity(batch * seq, cfg.num_experts_per_tok, cfg.n_routed_experts,
                               capacity_factor, cfg.min_capacity)
    m, routing, kept = expert_pass(u, router_weight, routed, shared, cfg, capacity, token_mask,
                                   expert_axis=expert_axis)
    routing = routing.replace(aux_loss=jax.lax.pmean(routing.aux_loss, BATCH_AXES),
                              z_loss=jax.lax.pmean(routing.z_loss, BATCH_AXES))
    return m, routing, kept

  def fn(u, router_weight, routed, shared, token_mask):
    in_specs = (tokens, P(), jax.tree.map(lambda _: expert_weights, routed),
                jax.tree.map(lambda _: P(), shared), tokens)
    return jax.shard_map(local_pass, mesh=mesh, in_specs=in_specs,
                         out_specs=(tokens, _router_output_specs(tokens), tokens))(
                             u, router_weight, routed, shared, token_mask)

  return fn


def _router_output_specs(tokens: P) -> RouterOutput:
  return RouterOutput(expert_ids=tokens, combine_weights=tokens, probs=tokens, aux_loss=P(),
                      z_loss=P())


# ---------------------------------------------------------------------------
# What the training loop uses
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Parallelism:
  """How the train loop places state and batches; every method is plain JAX without a mesh.

  Attributes:
    mesh: the device mesh, or None for single-device code.
  """

  mesh: Optional[Mesh] = None

  @classmethod
  def for_run(cls, config: ml_collections.ConfigDict, model: ModelConfig) -> "Parallelism":
    """The mesh of `config.mesh`, checked against the model and the train batch sizes."""
    mesh = mesh_from_config(config)
    if mesh is not None:
      train = config.train
      validate_for_mesh(mesh, model, {
          "train.batch_size / grad_accum_steps": train.batch_size // train.grad_accum_steps,
          "train.eval_batch_size": train.eval_batch_size})
    return cls(mesh)

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """Tracing inside this makes the CoE layers use expert-parallel dispatch."""
    if self.mesh is None:
      yield
    else:
      with jax.set_mesh(self.mesh):
        yield

  def init_state(self, make_state: Callable[[], Any]) -> Any:
    """`make_state()` (e.g. a TrainState), created directly in its sharded layout."""
    if self.mesh is None:
      return make_state()
    shardings = state_shardings(jax.eval_shape(make_state), self.mesh)
    return jax.jit(make_state, out_shardings=shardings)()

  def shard_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
    return batch if self.mesh is None else shard_batch(batch, self.mesh)

  def jit_train_step(self, train_step: Callable, state: Any) -> "MeshJit":
    """`train_step(state, batch, rng)` jitted with the state donated and laid out like `state`."""
    if self.mesh is None:
      return MeshJit(jax.jit(train_step, donate_argnums=0), None)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    replicated = NamedSharding(self.mesh, P())
    jitted = jax.jit(train_step, donate_argnums=0,
                     in_shardings=(shardings, batch_sharding(self.mesh), replicated),
                     out_shardings=(shardings, replicated))
    return MeshJit(jitted, self)

  def jit_eval_step(self, eval_step: Callable) -> Callable:
    """`eval_step(params, batch)` jitted; host batches are sharded on the way in."""
    jitted = MeshJit(jax.jit(eval_step), None if self.mesh is None else self)

    def run(params, batch):
      return jitted(params, self.shard_batch(batch))

    return run


@dataclasses.dataclass
class MeshJit:
  """A jitted function whose tracing (call or `.lower`) happens inside the mesh context."""

  jitted: Any
  parallelism: Optional[Parallelism]

  def _context(self):
    return contextlib.nullcontext() if self.parallelism is None else self.parallelism.context()

  def lower(self, *args, **kwargs):
    with self._context():
      return self.jitted.lower(*args, **kwargs)

  def __call__(self, *args, **kwargs):
    with self._context():
      return self.jitted(*args, **kwargs)
