"""Data, expert and FSDP parallelism with JAX's own SPMD machinery.

The mesh has three named axes, `data`, `fsdp` and `expert` (config section
`config.mesh`, defaults in `config_lib.build`), with `expert` innermost so that
the all-to-all traffic stays between neighbouring devices.

Layouts are `RULES` over the logical axis names every param is created with
(`coe_jax.nn.logical_axes`, DESIGN.md 11), read as flax reads
`nn.logical_axis_rules` (in priority order):

* Batch: the leading (`batch`) axis of every batch array is split over all
  three axes (`BATCH_AXES`): every device holds different sequences.
  Attention, norms, the head and the loss run data-parallel under `jax.jit`;
  XLA's SPMD partitioner propagates that sharding and inserts the gradient
  all-reduces.
* Params and optimizer state (`state_shardings`): the routed experts' `expert`
  axis is split over `expert`; with `fsdp > 1` every matrix is also split over
  `fsdp` on its `vocab` axis (embedding, head), else its `heads` axis (q_proj,
  kv_b_proj, o_proj), else its `embed` axis (experts, routers, kv_a_proj), and
  XLA all-gathers it where it is used (ZeRO-3). A rule whose mesh axes do not
  divide the dimension is passed over. Adam's moments have the params' tree
  structure, so they are laid out exactly like the params they track.
* Expert dispatch: `Parallelism.expert_parallel()` is the
  `coe_jax.nn.expert_parallel.ExpertParallel` that the train loop hands the model
  (and so every CoE layer) explicitly: batch over all three axes, experts over
  `expert`. Each CoE iteration's routed pass then runs per device under
  `jax.shard_map` with all-to-all exchanges (see that module). With
  `fsdp == expert == 1` the layer still routes per device (data parallel), so
  nothing outside the batch axes is ever gathered.
* Multi-host: `initialize_distributed` calls `jax.distributed.initialize`
  from `config.mesh` or the `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` /
  `JAX_PROCESS_ID` environment variables (empty values: JAX's own cluster
  detection on TPU pods, SLURM, Open MPI). Every process builds only the rows
  of each global batch that its own devices hold (`process_rows`) and
  `global_batch` assembles the global array from those process-local rows
  (`jax.make_array_from_process_local_data`); `shard_batch` places a batch
  that every process holds in full (validation batches). `StopVote` lets the
  processes agree on the step at which a SIGTERM/SIGINT that reached any one
  of them stops the run, without making the host wait for the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from coe_jax.errors import ConfigError
from coe_jax.nn import logical_axes as axes
from coe_jax.nn.expert_parallel import ExpertParallel
from coe_jax.nn.model_config import ModelConfig
from coe_jax.nn.params import param_axes
from coe_jax.training import multihost, train_config

MESH_AXES = ("data", "fsdp", "expert")
BATCH_AXES = MESH_AXES

# Our layouts as logical axis rules, highest priority first: each rule gives its
# mesh axes to the dimension of that name unless the mesh axes are taken.
RULES = (
  (axes.BATCH, BATCH_AXES),  # data parallel over every device
  (axes.EXPERT, "expert"),  # the routed experts split on their E axis
  (axes.VOCAB, "fsdp"),  # fsdp (ZeRO-3): the embedding's and the head's vocabulary,
  (axes.HEADS, "fsdp"),  # else the attention projections' heads,
  (axes.EMBED, "fsdp"),  # else the model width (experts, routers, kv_a_proj)
)


# ---------------------------------------------------------------------------
# Mesh construction
# ---------------------------------------------------------------------------


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
    raise ConfigError(
      f"mesh: data x fsdp x expert = {sizes} must multiply to the {num_devices} devices"
    )
  return sizes["data"], sizes["fsdp"], sizes["expert"]


def make_mesh(
  data: int = -1, fsdp: int = 1, expert: int = 1, devices: Optional[list] = None
) -> Mesh:
  """A (data, fsdp, expert) mesh over `devices` (default: all), automatic sharding mode."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, fsdp, expert, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def mesh_from_config(config: ml_collections.ConfigDict) -> Optional[Mesh]:
  """The mesh of `config.mesh`, or None (plain single-device code) on one device."""
  mesh_config = config.get("mesh")
  if mesh_config is None:
    return None
  multihost.initialize_distributed(mesh_config)
  if jax.device_count() == 1:
    mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.expert, 1)  # still validate
    return None
  return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.expert)


def validate_for_mesh(mesh: Mesh, model: ModelConfig, batch_sizes: dict[str, int]) -> None:
  """ConfigError unless experts and every batch split evenly over `mesh`."""
  experts, routed = mesh.shape["expert"], model.coe.n_routed_experts
  if routed % experts:
    divisors = [n for n in range(1, routed + 1) if routed % n == 0]
    raise ConfigError(
      f"mesh.expert: got {experts}; must divide model.n_routed_experts={routed} "
      f"(allowed: {divisors})"
    )
  shards = batch_shards(mesh)
  for field, size in batch_sizes.items():
    if size % shards:
      raise ConfigError(
        f"{field}: got {size}; must be divisible by data x fsdp x expert = {shards} "
        "(the devices: on a CPU host, mesh.cpu_devices)"
      )


def batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[name] for name in BATCH_AXES]))


# ---------------------------------------------------------------------------
# Param, optimizer-state and batch shardings
# ---------------------------------------------------------------------------


def mesh_spec(
  names: tuple[Optional[str], ...], shape: tuple[int, ...], axis_sizes: dict[str, int], rules=RULES
) -> P:
  """The PartitionSpec of an array with logical axis `names` under `rules`.

  `nn.logical_to_mesh_axes` (each rule, in order, gives its mesh axes to the
  dimension of that name if that dimension and those axes are still free), except
  that a rule is passed over where its mesh axes are missing from the mesh or their
  sizes do not divide the dimension: the next rule for that name, or none, applies.
  """
  spec: list[Any] = [None] * len(names)
  taken: set[str] = set()
  for name, mesh_axes in rules:
    dim = names.index(name) if name in names else None
    if dim is None or spec[dim] is not None:
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    if not mesh_axes or taken & set(mesh_axes) or not set(mesh_axes) <= set(axis_sizes):
      continue
    if shape[dim] % int(np.prod([axis_sizes[a] for a in mesh_axes])):
      continue
    spec[dim] = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
    taken |= set(mesh_axes)
  return P(*spec)


def state_shardings(abstract_tree: Any, mesh: Mesh, axes_tree: Any, rules=RULES) -> Any:
  """NamedShardings for every leaf of a params tree or a TrainState.

  `axes_tree`: the params' logical axes (`coe_jax.nn.params.param_axes`), a tree of
  PartitionSpecs. The params, and every subtree of the same structure (Adam's mu
  and nu), are laid out by `mesh_spec`; any other leaf (step, counts) is replicated.
  """
  sizes = dict(mesh.shape)
  params_structure = jax.tree.structure(axes_tree, is_leaf=_is_spec)

  def like_params(node) -> bool:
    return jax.tree.structure(node) == params_structure

  def layout(leaf, spec: P) -> NamedSharding:
    shape, names = tuple(np.shape(leaf)), tuple(spec)
    if len(shape) != len(names):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, mesh_spec(names, shape, sizes, rules))

  def shardings(node):
    if like_params(node):
      return jax.tree.map(layout, node, axes_tree)
    return NamedSharding(mesh, P())

  return jax.tree.map(shardings, abstract_tree, is_leaf=like_params)


def _is_spec(x) -> bool:
  return isinstance(x, P)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (`batch`) axis by `RULES` (over every mesh axis), the rest replicated."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes((axes.BATCH,), RULES))


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from a host batch that every process holds in full."""
  sharding = batch_sharding(mesh)

  def put(value):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return {name: put(value) for name, value in batch.items()}


def process_rows(mesh: Mesh, global_size: int) -> np.ndarray:
  """The global batch rows this process's devices hold, ascending (no duplicates).

  They are the rows `global_batch` expects in the process-local batch, in this
  order. One process (or no mesh): every row.
  """
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_size,))
  rows = {row for index in indices.values() for row in range(global_size)[index[0]]}
  return np.asarray(sorted(rows), np.int64)


def global_batch(local_batch: dict[str, Any], mesh: Mesh, global_size: int) -> dict[str, jax.Array]:
  """Global arrays of `global_size` rows from this process's rows (`process_rows`) of them."""
  sharding = batch_sharding(mesh)
  return {
    name: jax.make_array_from_process_local_data(
      sharding, np.asarray(value), (global_size, *np.shape(value)[1:])
    )
    for name, value in local_batch.items()
  }


def constrain_micro_batches(micro_batches: Any) -> Any:
  """Keeps each micro-batch split over the batch axes after the [accum, micro] reshape.

  A no-op outside a mesh; inside one, without it the partitioner would split
  the accumulation axis instead and run each micro-batch on a few devices.
  """
  mesh = active_mesh()
  if mesh is None:
    return micro_batches
  return jax.lax.with_sharding_constraint(micro_batches, P(None, BATCH_AXES))


def active_mesh() -> Optional[jax.sharding.AbstractMesh]:
  """The mesh the train loop set with `jax.set_mesh` while tracing, if it has our axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


# ---------------------------------------------------------------------------
# What the training loop uses
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Parallelism:
  """How the train loop places state and batches; every method is plain JAX without a mesh.

  Attributes:
    mesh: the device mesh, or None for single-device code.
    axes_tree: the params' logical axes (`coe_jax.nn.params.param_axes`), which
      `init_state` lays the state out by; needed with a mesh.
  """

  mesh: Optional[Mesh] = None
  axes_tree: Any = None

  @classmethod
  def for_run(cls, config: ml_collections.ConfigDict, model: ModelConfig) -> "Parallelism":
    """The mesh of `config.mesh`, checked against the model and the train batch sizes."""
    mesh = mesh_from_config(config)
    if mesh is not None:
      validate_for_mesh(mesh, model, train_config.sharded_batch_sizes(config.train))
      return cls(mesh, param_axes(model))
    return cls(mesh)

  def expert_parallel(self) -> Optional[ExpertParallel]:
    """What the model's CoE layers get (`CoECausalLM(..., expert_parallel=)`); None off-mesh."""
    if self.mesh is None:
      return None
    return ExpertParallel(self.mesh, batch_axes=BATCH_AXES, expert_axis="expert")

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """Tracing inside this sets the mesh for sharding constraints in the train step."""
    if self.mesh is None:
      yield
    else:
      with jax.set_mesh(self.mesh):
        yield

  def init_state(self, make_state: Callable[[], Any]) -> Any:
    """`make_state()` (e.g. a TrainState), created directly in its sharded layout."""
    if self.mesh is None:
      return make_state()
    if self.axes_tree is None:
      raise ValueError("Parallelism.init_state with a mesh needs axes_tree (params.param_axes)")
    shardings = state_shardings(jax.eval_shape(make_state), self.mesh, self.axes_tree)
    return jax.jit(make_state, out_shardings=shardings)()

  def shard_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
    return batch if self.mesh is None else shard_batch(batch, self.mesh)

  def process_rows(self, global_size: int) -> Optional[np.ndarray]:
    """The rows of each global batch this process builds; None = all of them."""
    if self.mesh is None or jax.process_count() == 1:
      return None
    return process_rows(self.mesh, global_size)

  def global_batch(self, local_batch: dict[str, Any], global_size: int) -> dict[str, Any]:
    """The global batch from this process's rows of it (`process_rows`)."""
    if self.mesh is None:
      return local_batch
    return global_batch(local_batch, self.mesh, global_size)

  def stop_vote(self) -> Optional[multihost.StopVote]:
    """A `StopVote` when several processes must agree on a stop; None in one process."""
    if self.mesh is None or jax.process_count() == 1:
      return None
    return multihost.StopVote(self.mesh)

  def jit_train_step(self, train_step: Callable, state: Any) -> "MeshJit":
    """`train_step(state, batch, rng)` jitted with the state donated and laid out like `state`."""
    if self.mesh is None:
      return MeshJit(jax.jit(train_step, donate_argnums=0), None)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    replicated = NamedSharding(self.mesh, P())
    jitted = jax.jit(
      train_step,
      donate_argnums=0,
      in_shardings=(shardings, batch_sharding(self.mesh), replicated),
      out_shardings=(shardings, replicated),
    )
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
