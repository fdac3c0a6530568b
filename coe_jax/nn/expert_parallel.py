"""Expert parallelism for the CoE layer, asked for explicitly: `CoELayer(..., expert_parallel=)`.

Without it the layer is plain single-program JAX whatever mesh the caller has
set: under `jax.jit` with sharded inputs XLA's partitioner shards it like any
other code. With `ExpertParallel(mesh, batch_axes, expert_axis)` each CoE
iteration's routed pass runs per device under `jax.shard_map`:

* a device routes its own tokens (the batch axis is split over `batch_axes`)
  and packs them into its local [E, capacity, hidden] buffer; capacity and
  drops are per device, from its local token count (GShard/Switch);
* with `expert_axis`, the routed experts' leading E axis is split over that
  mesh axis and `jax.lax.all_to_all` sends each expert's rows to the device
  that holds it, and back (the transpose of an all-to-all is an all-to-all,
  so the backward pass has the same two exchanges); dropless with SwiGLU experts
  sends exactly the routed rows instead (`expert_exchange`: ragged all-to-all
  on GPUs, a padded all-to-all stand-in on CPU); with a custom expert function
  it uses the buffer with capacity = the device's token count (nothing drops);
* the router and shared-expert weights are replicated; shard_map's
  replication rules sum their gradients over the mesh.

Why shard_map and not sharding constraints: the buffer is built by a
data-dependent gather, which the SPMD partitioner cannot prove to be a
permutation between token shards and expert shards, so it would all-gather.
Equality with one device: exact (up to float summation order) whenever no
assignment is dropped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh
from jax.sharding import PartitionSpec as P

from coe_jax.nn.router import RouterOutput

AnyMesh = Union[Mesh, AbstractMesh]


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Where the CoE layer's routed pass runs.

  Attributes:
    mesh: the device mesh (concrete or abstract).
    batch_axes: mesh axes the batch (leading) axis of the layer input is split over.
    expert_axis: mesh axis the routed experts are split over, or None to keep
      every expert on every device (routing is then per device, no exchange).
  """

  mesh: AnyMesh
  batch_axes: tuple[str, ...]
  expert_axis: Optional[str] = None

  def __post_init__(self):
    names = set(self.mesh.axis_names)
    missing = [a for a in (*self.batch_axes, self.expert_axis) if a is not None and a not in names]
    if missing:
      raise ValueError(f"ExpertParallel: axes {missing} are not in the mesh's {sorted(names)}")
    explicit = [
      name
      for name, kind in zip(self.mesh.axis_names, self.mesh.axis_types)
      if kind == AxisType.Explicit
    ]
    if explicit:
      raise ValueError(
        f"ExpertParallel: mesh axes {explicit} are AxisType.Explicit; the layer's "
        "shard_map needs AxisType.Auto axes (jax.make_mesh(..., axis_types=...))"
      )

  @property
  def batch_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.batch_axes)

  @property
  def expert_shards(self) -> int:
    return 1 if self.expert_axis is None else self.mesh.shape[self.expert_axis]

  def applies_to(self, batch_size: int) -> bool:
    """False for batches that do not split over the batch axes (a 1-row init or decode
    call): the layer then runs its plain code and XLA shards it as it likes."""
    return batch_size % self.batch_shards == 0

  def wrap(self, local_pass: Callable) -> Callable:
    """`local_pass(u, router_weight, routed, shared, token_mask, expert_axis) -> (m, routing,
    kept)` run per device; returns `fn(u, router_weight, routed, shared, token_mask)` with
    global shapes. The routing losses are averaged over the batch shards."""
    tokens = P(self.batch_axes)
    expert_weights = P(self.expert_axis) if self.expert_axis else P()
    axis = self.expert_axis if self.expert_shards > 1 else None

    def per_device(u, router_weight, routed, shared, token_mask):
      m, routing, kept = local_pass(u, router_weight, routed, shared, token_mask, axis)
      routing = routing.replace(
        aux_loss=jax.lax.pmean(routing.aux_loss, self.batch_axes),
        z_loss=jax.lax.pmean(routing.z_loss, self.batch_axes),
      )
      return m, routing, kept

    def fn(u, router_weight, routed, shared, token_mask):
      in_specs = (
        tokens,
        P(),
        jax.tree.map(lambda _: expert_weights, routed),
        jax.tree.map(lambda _: P(), shared),
        tokens,
      )
      routing_specs = RouterOutput(
        expert_ids=tokens, combine_weights=tokens, probs=tokens, aux_loss=P(), z_loss=P()
      )
      return jax.shard_map(
        per_device, mesh=self.mesh, in_specs=in_specs, out_specs=(tokens, routing_specs, tokens)
      )(u, router_weight, routed, shared, token_mask)

    return fn
