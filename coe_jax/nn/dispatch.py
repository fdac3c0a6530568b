"""Sending tokens to their chosen experts and combining the results.

Two interchangeable implementations (DESIGN.md 3, config `model.dispatch`):

* capacity: each expert takes at most `capacity` (token, slot) assignments into
  an [experts, capacity, hidden] buffer; assignments over capacity are dropped
  from that expert only. Priority is slot-major: every token's first choice is
  placed before any token's second choice, then by token order. Memory stays
  O(tokens * K + experts * capacity * hidden): positions come from one stable
  sort of the expert ids, tokens move by gather, results come back by gather.
* dropless: nothing is dropped (what the authors' code computes). Four
  implementations (`dropless_impl`), equal to float rounding; 'auto' picks
  'grouped' when the program is compiled for GPUs, 'blocked' elsewhere (`tuning`):
  - 'grouped' (`coe_jax.nn.grouped`): a Pallas (Triton) grouped matmul over
    expert-sorted rows in whole tiles: static shapes, no XLA loops, each
    expert's weights read in place; work tokens x K plus a tile per expert.
  - 'blocked' (`coe_jax.nn.blocked`): MegaBlocks' block-sparse layout in plain
    XLA. Assignments sorted by expert, each expert's group padded to whole
    tiles (a smaller last tile on CPU), every used tile run against its
    expert's weights in a loop (`blocked_swiglu_threaded`, a custom VJP). Work and memory
    grow with tokens x K (at most tokens * K + (experts + 1) * tile rows), not
    with tokens x N.
  - 'ragged_dot': grouped matmuls over expert-sorted rows (`jax.lax.ragged_dot`),
    which XLA lowers to a dense all-experts computation on CPU (and, by public
    reports, on GPU): work grows with N.
  - 'gather': the capacity path with capacity = tokens (an expert is chosen at
    most once per token, so nothing can drop): every expert runs on a buffer of
    `tokens` rows, N/K times the useful expert work.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from coe_jax.nn import tuning
from coe_jax.nn.blocked import DeferredWeights, blocked_dispatch, blocked_rows, defer_weight_grads
from coe_jax.nn.coe_config import DISPATCHES
from coe_jax.nn.expert_exchange import exchange_dispatch
from coe_jax.nn.experts import SwiGLUWeights, swiglu, swiglu_grouped, swiglu_per_expert
from coe_jax.nn.grouped import grouped_dispatch, kernel_config
from coe_jax.nn.token_rows import DispatchOutput, combine_rows, expert_order, gather_rows
from coe_jax.nn.tuning import blocked_tiles_per_step, default_tiling, expert_weight_bytes


def expert_capacity(
  num_tokens: int, k: int, num_experts: int, capacity_factor: float, min_capacity: int
) -> int:
  """ceil(capacity_factor * tokens * K / N), at least min_capacity, at most tokens."""
  capacity = math.ceil(capacity_factor * num_tokens * k / num_experts)
  return int(min(max(capacity, min_capacity), num_tokens))


def resolve_dropless_impl(impl: str, platform: str = "") -> str:
  """What `dropless_impl` runs on the target platform (`tuning.resolve_dropless_impl`)."""
  return tuning.resolve_dropless_impl(impl, platform)


def assignment_slots(
  expert_ids: Int[Array, "tokens k"],
  num_experts: int,
  capacity: int,
  token_mask: Optional[Bool[Array, "tokens"]] = None,
) -> tuple[Int[Array, "tokens k"], Bool[Array, "tokens k"]]:
  """Buffer slot (expert * capacity + position) of every assignment, and whether it fits.

  Dropped assignments get the sentinel slot `num_experts * capacity`. Tokens
  with `token_mask` False (padding) are sorted into a virtual expert past the
  last one, so they never take capacity from real tokens.
  """
  num_tokens, k = expert_ids.shape
  if token_mask is not None:
    expert_ids = jnp.where(token_mask[:, None], expert_ids, num_experts)
  flat = expert_ids.T.reshape(-1)  # slot-major priority; Shape: [k * tokens]
  order = expert_order(flat, num_experts)
  counts = jnp.bincount(flat, length=num_experts + 1)
  starts = jnp.cumsum(counts) - counts
  sorted_positions = jnp.arange(flat.shape[0], dtype=jnp.int32) - starts[flat[order]]
  positions = jnp.zeros_like(flat).at[order].set(sorted_positions.astype(flat.dtype))
  kept = (positions < capacity) & (flat < num_experts)
  slots = jnp.where(kept, flat * capacity + positions, num_experts * capacity)
  return slots.reshape(k, num_tokens).T, kept.reshape(k, num_tokens).T


def capacity_dispatch(
  x: Float[Array, "tokens hidden"],
  expert_ids: Int[Array, "tokens k"],
  combine_weights: Float[Array, "tokens k"],
  expert_fn: Callable[[Array], Array],
  num_experts: int,
  capacity: int,
  token_mask: Optional[Bool[Array, "tokens"]] = None,
) -> DispatchOutput:
  """Gather tokens into [experts, capacity, hidden], run `expert_fn`, gather back.

  Empty buffer rows are zero (never uninitialised memory). Both gathers have
  gathers as gradients (`gather_rows`): the slot -> assignment map is built
  once, by one int32 scatter.
  """
  num_tokens, hidden = x.shape
  k = expert_ids.shape[1]
  num_assignments = num_tokens * k
  slots, kept = assignment_slots(expert_ids, num_experts, capacity, token_mask)
  # Which assignment (t * k + slot) fills each buffer row; empty rows hold the sentinel.
  assignment_of_slot = jnp.full((num_experts * capacity,), num_assignments, jnp.int32)
  assignment_of_slot = assignment_of_slot.at[slots.reshape(-1)].set(
    jnp.arange(num_assignments, dtype=jnp.int32), mode="drop"
  )
  token_of_slot = jnp.where(
    assignment_of_slot < num_assignments, assignment_of_slot // k, num_tokens
  )
  buffer = gather_rows(x, token_of_slot, slots).reshape(num_experts, capacity, hidden)
  expert_out = expert_fn(buffer).reshape(num_experts * capacity, hidden)
  return DispatchOutput(
    output=combine_rows(expert_out, slots, assignment_of_slot, combine_weights), kept=kept
  )


def ragged_dispatch(
  x: Float[Array, "tokens hidden"],
  expert_ids: Int[Array, "tokens k"],
  combine_weights: Float[Array, "tokens k"],
  grouped_fn: Callable[[Array, Array], Array],
  num_experts: int,
  token_mask: Optional[Bool[Array, "tokens"]] = None,
) -> DispatchOutput:
  """Sort assignments by expert, run `grouped_fn(rows, group_sizes)`, unsort, combine.

  Masked-out tokens still run through their experts (the shapes are static)
  but get zero combine weight, matching the capacity path.
  """
  num_tokens, k = expert_ids.shape
  kept = jnp.ones(expert_ids.shape, bool)
  if token_mask is not None:
    kept = jnp.broadcast_to(token_mask[:, None], expert_ids.shape)
    combine_weights = jnp.where(kept, combine_weights, 0)
  flat = expert_ids.reshape(-1)
  order = expert_order(flat, num_experts)  # row r of the sorted rows holds assignment order[r]
  row_of_assignment = (
    jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  )
  row_of_assignment = row_of_assignment.reshape(num_tokens, k)
  rows = gather_rows(x, order // k, row_of_assignment)  # Shape: [tokens * k, hidden]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  sorted_out = grouped_fn(rows, group_sizes)
  return DispatchOutput(
    output=combine_rows(sorted_out, row_of_assignment, order, combine_weights), kept=kept
  )


# ---------------------------------------------------------------------------
# Dropless, block-sparse: expert-sorted rows padded to whole tiles
# ---------------------------------------------------------------------------


def run_on_expert_shards(
  buffer: Float[Array, "experts capacity hidden"],
  local_experts_fn: Callable[[Array], Array],
  axis_name: str,
) -> Float[Array, "experts capacity hidden"]:
  """Runs each expert's buffer rows on the device that holds that expert.

  Inside `jax.shard_map`, with n devices on `axis_name` each holding E/n
  experts: `buffer` <float>[E, cap, d] (this device's rows for every expert)
  goes out by all-to-all; `local_experts_fn` sees <float>[E/n, n * cap, d]
  (every device's rows for this device's experts); a second all-to-all brings
  the outputs back in the buffer's layout.
  """
  num_experts, capacity, hidden = buffer.shape
  shards = jax.lax.axis_size(axis_name)
  local = num_experts // shards
  outgoing = buffer.reshape(shards, local, capacity, hidden)  # Shape: [dest shard, local, cap, d]
  incoming = jax.lax.all_to_all(outgoing, axis_name, 0, 0, tiled=True)  # [source, local, cap, d]
  rows = incoming.transpose(1, 0, 2, 3).reshape(local, shards * capacity, hidden)
  out = local_experts_fn(rows).reshape(local, shards, capacity, hidden).transpose(1, 0, 2, 3)
  returned = jax.lax.all_to_all(out, axis_name, 0, 0, tiled=True)  # [expert shard, local, cap, d]
  return returned.reshape(num_experts, capacity, hidden)


def per_expert_fn(expert_fn: Callable[[Any, Array], Array]) -> Callable[[Any, Array], Array]:
  """`(stacked weights [E, ...], buffer <[E, rows, hidden]>) -> [E, rows, hidden]`: `expert_fn`
  on every expert's own rows (SwiGLU as three batched einsums, anything else by vmap)."""
  if expert_fn is swiglu:
    return swiglu_per_expert
  return jax.vmap(expert_fn)


def dispatch_to_experts(
  x: Float[Array, "tokens hidden"],
  expert_ids: Int[Array, "tokens k"],
  combine_weights: Float[Array, "tokens k"],
  weights: Any,
  *,
  mode: str,
  capacity: int,
  dropless_impl: str = "auto",
  dropless_tile: int = 0,
  dropless_tile_sizes: int = 0,
  target_platform: str = "",
  token_mask: Optional[Bool[Array, "tokens"]] = None,
  expert_axis: Optional[str] = None,
  expert_fn: Callable[[Any, Array], Array] = swiglu,
) -> DispatchOutput:
  """Routed-expert output for every token under the chosen dispatch mode.

  Args:
    x: <float>[tokens, hidden] token representations (compute dtype).
    expert_ids / combine_weights: <int32|float32>[tokens, K] from the router.
    weights: stacked expert weights (compute dtype), leaves with a leading [E] axis.
    mode: 'capacity' or 'dropless'.
    capacity: per-expert capacity for mode='capacity' (see `expert_capacity`).
    dropless_impl: 'auto' | 'grouped' | 'blocked' | 'gather' | 'ragged_dot' for
      mode='dropless' ('auto': 'grouped' on GPU, 'blocked' elsewhere).
    dropless_tile: rows per whole tile of 'blocked' (0: from the load, `default_tiling`)
      or per tile of 'grouped' (0: `tuning.grouped_tile_rows`).
    dropless_tile_sizes: how many sizes up to that tile each expert's last tile
      picks from (0: the target's default, `default_tiling`).
    target_platform: '' | 'cpu' | 'gpu' | 'tpu', the platform 'auto' and the tilings are
      chosen for ('': the devices the program is compiled for, `tuning.target_platform`).
    token_mask: <bool>[tokens] False for padding: those tokens take no expert
      capacity and get no routed output (None: every token is real).
    expert_axis: inside `jax.shard_map`, the mesh axis the experts are split
      over; `weights` are then this device's E/n experts. Capacity: the buffer
      rows travel by all-to-all (`run_on_expert_shards`). Dropless with SwiGLU:
      exactly the routed rows travel (`expert_exchange.exchange_dispatch`); a
      custom `expert_fn` uses the buffer with capacity = tokens.
    expert_fn: one expert, `(weights of one expert, rows <[..., hidden]>) -> [..., hidden]`;
      `dropless_impl='ragged_dot'` needs the default SwiGLU.
  """
  run_experts = per_expert_fn(expert_fn)
  num_tokens = x.shape[0]
  num_experts = jax.tree.leaves(weights)[0].shape[0]
  platform = tuning.target_platform(target_platform)
  if expert_axis is not None:
    if isinstance(weights, DeferredWeights):
      raise ValueError(
        "deferred weight gradients run on one device's experts, not under expert_axis"
      )
    if mode not in DISPATCHES:
      raise ValueError(f"dispatch mode: got {mode!r}; allowed values: capacity, dropless")
    if mode == "dropless" and expert_fn is swiglu:

      def local_dispatch(rows, ids, ones, mask):
        return dispatch_to_experts(
          rows,
          ids,
          ones,
          weights,
          mode="dropless",
          capacity=0,
          dropless_impl=dropless_impl,
          dropless_tile=dropless_tile,
          dropless_tile_sizes=dropless_tile_sizes,
          target_platform=platform,
          token_mask=mask,
        )

      return exchange_dispatch(
        x,
        expert_ids,
        combine_weights,
        weights,
        expert_axis,
        local_dispatch,
        ragged=platform == "gpu",
        token_mask=token_mask,
      )

    def exchanged_experts(buffer):
      return run_on_expert_shards(buffer, lambda rows: run_experts(weights, rows), expert_axis)

    return capacity_dispatch(
      x,
      expert_ids,
      combine_weights,
      exchanged_experts,
      num_experts * jax.lax.axis_size(expert_axis),
      capacity if mode == "capacity" else num_tokens,
      token_mask,
    )
  if mode == "capacity":
    return capacity_dispatch(
      x,
      expert_ids,
      combine_weights,
      lambda buf: run_experts(weights, buf),
      num_experts,
      capacity,
      token_mask,
    )
  if mode != "dropless":
    raise ValueError(f"dispatch mode: got {mode!r}; allowed values: capacity, dropless")
  impl = resolve_dropless_impl(dropless_impl, platform)
  if expert_fn is not swiglu:  # the fast dropless kernels are written for SwiGLU
    impl = "gather" if dropless_impl == "auto" else dropless_impl
    if impl != "gather":
      raise ValueError(
        f"dropless_impl={impl!r} computes SwiGLU experts only; allowed with a "
        "custom expert_fn: 'auto' (= 'gather'), 'gather'"
      )
  if impl == "blocked":
    base = weights.weights if isinstance(weights, DeferredWeights) else weights
    sizes, per_step = blocked_tiling(
      base, expert_ids.size, dropless_tile, dropless_tile_sizes, platform
    )
    return blocked_dispatch(x, expert_ids, combine_weights, weights, sizes, per_step, token_mask)
  if isinstance(weights, DeferredWeights):
    raise ValueError(f"deferred weight gradients are for dropless_impl='blocked'; got {impl!r}")
  if impl == "grouped":
    cfg = kernel_config(expert_ids.size, num_experts, dropless_tile, platform)
    return grouped_dispatch(x, expert_ids, combine_weights, weights, cfg, token_mask)
  if impl == "ragged_dot":
    return ragged_dispatch(
      x,
      expert_ids,
      combine_weights,
      lambda rows, sizes: swiglu_grouped(weights, rows, sizes),
      num_experts,
      token_mask,
    )
  return capacity_dispatch(
    x,
    expert_ids,
    combine_weights,
    lambda buf: run_experts(weights, buf),
    num_experts,
    num_tokens,
    token_mask,
  )


def chain_weights(
  weights: Any,
  passes: int,
  num_assignments: int,
  *,
  dropless_tile: int = 0,
  dropless_tile_sizes: int = 0,
  target_platform: str = "",
) -> Any:
  """The routed weights a chain of `passes` dropless dispatches of `num_assignments`
  (tokens x K) each should thread through its passes: `DeferredWeights` where they run
  'blocked' on CPU (one weight-gradient loop over all passes' rows, at `passes` times the tile
  heights: experiments/PERF.md 39, measured there only), `weights` as they are otherwise. The
  weight-gradient loop's tiles are sized for the passes' rows together (`default_tiling`'s own
  choice: a set `dropless_tile` sizes the passes' tiles only)."""
  platform = tuning.target_platform(target_platform)
  if passes < 2 or not isinstance(weights, SwiGLUWeights) or platform != "cpu":
    return weights
  num_experts = weights.gate.shape[0]
  sizes, per_step = blocked_tiling(
    weights, num_assignments, dropless_tile, dropless_tile_sizes, platform
  )
  rows, _ = blocked_rows(num_assignments, num_experts, sizes, per_step)
  grad_sizes, _ = blocked_tiling(
    weights, passes * num_assignments, 0, dropless_tile_sizes, platform
  )
  _, grad_sizes = blocked_rows(passes * num_assignments, num_experts, grad_sizes)
  return defer_weight_grads(weights, passes, rows, grad_sizes)


def blocked_tiling(
  weights: Any, num_assignments: int, dropless_tile: int, dropless_tile_sizes: int, platform: str
) -> tuple[tuple[int, ...], int]:
  """(tile sizes, tiles per step) 'blocked' runs for `num_assignments` rows of `weights`'
  experts on `platform` (`tuning.default_tiling`, `tuning.blocked_tiles_per_step`)."""
  num_experts = jax.tree.leaves(weights)[0].shape[0]
  sizes = default_tiling(
    num_assignments,
    num_experts,
    expert_weight_bytes(weights),
    dropless_tile,
    dropless_tile_sizes,
    platform,
  )
  return sizes, blocked_tiles_per_step(weights, sizes[-1], platform)
