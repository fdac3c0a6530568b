"""Sending tokens to their chosen experts and combining the results.

Two interchangeable implementations (SPEC 3, config `model.dispatch`):

* capacity: each expert takes at most `capacity` (token, slot) assignments into
  an [experts, capacity, hidden] buffer; assignments over capacity are dropped
  from that expert only. Priority is slot-major: every token's first choice is
  placed before any token's second choice, then by token order. Memory stays
  O(tokens * K + experts * capacity * hidden): positions come from one stable
  sort of the expert ids, tokens move by gather, results come back by gather.
* dropless: nothing is dropped (what the authors' code computes). Three
  implementations (`dropless_impl`), equal to float rounding:
  - 'blocked' (`blocked_dispatch`): MegaBlocks' block-sparse layout in plain
    XLA. Assignments sorted by expert, each expert's group padded to a multiple
    of a row tile, every used tile run against its expert's weights in a loop
    (`blocked_swiglu`, a custom VJP). Work and memory grow with tokens x K
    (at most tokens * K + experts * (tile - 1) rows), not with tokens x N.
  - 'ragged_dot': grouped matmuls over expert-sorted rows (`jax.lax.ragged_dot`),
    which XLA lowers to a dense all-experts computation on CPU (and, by public
    reports, on GPU): work grows with N.
  - 'gather': the capacity path with capacity = tokens (an expert is chosen at
    most once per token, so nothing can drop): every expert runs on a buffer of
    `tokens` rows, N/K times the useful expert work.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from coe_jax.coe_config import DISPATCHES
from coe_jax.experts import SwiGLUWeights, swiglu, swiglu_grouped, swiglu_per_expert




@flax.struct.dataclass
class DispatchOutput:
  """Result of one dispatch.

  Attributes:
    output: <float>[tokens, hidden] sum_k weight_k * expert_k(x) over kept assignments.
    kept: <bool>[tokens, K] whether each assignment was processed (all True if
      dropless); assignments of masked-out (padding) tokens are never kept.
  """

  output: Float[Array, "tokens hidden"]
  kept: Bool[Array, "tokens k"]


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> int:
  """ceil(capacity_factor * tokens * K / N), at least min_capacity, at most tokens."""
  capacity = math.ceil(capacity_factor * num_tokens * k / num_experts)
  return int(min(max(capacity, min_capacity), num_tokens))


def resolve_dropless_impl(impl: str) -> str:
  """'auto' is 'blocked' on every backend (measured on CPU, predicted on GPU: PERF.md)."""
  if impl != "auto":
    return impl
  return "blocked"


def default_dropless_tile(num_assignments: int, num_experts: int) -> int:
  """Rows per tile of 'blocked' when `dropless_tile` is 0.

  The largest power of two <= the mean load per expert, between 8 and a
  per-backend cap: 64 on CPU (PERF.md 11, skewed routing at the paper width:
  mean load 65 -> 64 best, 32 within 2%; mean load 33 -> 32 best, 16 +4%,
  64 +14%), 256 elsewhere (a prediction: GPU matmuls want taller tiles, and
  loads are ~4K rows per expert there).
  """
  cap = 64 if jax.default_backend() == "cpu" else 256
  mean_load = max(num_assignments // max(num_experts, 1), 1)
  return int(min(cap, max(8, 1 << (mean_load.bit_length() - 1))))


def blocked_tiles_per_step(weights: SwiGLUWeights, tile: int) -> int:
  """Tiles per loop iteration of 'blocked': one on CPU, a weight-gather budget elsewhere.

  CPU: one tile per iteration, the expert's weights read by dynamic slice (PERF.md 11).
  GPU/TPU (unmeasured, a prediction): a sequential loop of small matmuls
  would be launch-bound, so each iteration gathers the weights of as many
  tiles as fit in ~1 GiB (3 [d, f] matrices per tile, plus as much again for
  their weight gradients in the backward pass) and runs one batched matmul.
  """
  if jax.default_backend() == "cpu":
    return 1
  per_tile = 3 * weights.gate[0].size * jnp.dtype(weights.gate.dtype).itemsize
  return max(1, (1 << 30) // (2 * per_tile))


def expert_order(flat_ids: Int[Array, "n"], num_experts: int) -> Int[Array, "n"]:
  """Stable argsort of expert ids in [0, num_experts]: ids grouped, ties in index order.

  Sorts one packed int32 key (id * n + index) instead of (id, index) pairs:
  XLA's CPU sort is a comparator loop, and one key is ~3x faster than argsort's
  two-operand comparator (PERF.md). Falls back to argsort if the key would overflow.
  """
  n = flat_ids.shape[0]
  if (num_experts + 1) * n >= 2 ** 31:
    return jnp.argsort(flat_ids, stable=True)
  index = jnp.arange(n, dtype=jnp.int32)
  return jax.lax.sort(flat_ids.astype(jnp.int32) * n + index, is_stable=False) % n  # keys are unique


def assignment_slots(expert_ids: Int[Array, "tokens k"], num_experts: int, capacity: int,
                     token_mask: Optional[Bool[Array, "tokens"]] = None
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


@jax.custom_vjp
def gather_rows(source: Float[Array, "rows hidden"], index: Int[Array, "out"],
                inverse: Int[Array, "rows j"]) -> Float[Array, "out hidden"]:
  """`source[index]`, with index == rows reading a zero row, and a gather as its transpose.

  `inverse[r]` lists every output position whose index is r (padded with
  `out`, the position of an appended zero cotangent), so the gradient is
  `sum_j d_out[inverse[r, j]]`: a gather instead of the scatter-add JAX would
  emit. XLA's CPU scatter is a serial loop; this makes a dispatch's backward
  pass ~4x faster there (PERF.md) and costs nothing elsewhere.
  """
  return _pad_zero_row(source)[index]


def _gather_rows_fwd(source, index, inverse):
  return gather_rows(source, index, inverse), (index, inverse)


def _gather_rows_bwd(residuals, d_out):
  index, inverse = residuals
  return _pad_zero_row(d_out)[inverse].sum(axis=1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _pad_zero_row(rows: Float[Array, "n hidden"]) -> Float[Array, "n+1 hidden"]:
  return jnp.concatenate([rows, jnp.zeros_like(rows[:1])], axis=0)


def _combine(expert_rows: Float[Array, "rows hidden"], row_of_assignment: Int[Array, "tokens k"],
             assignment_of_row: Int[Array, "rows"],
             combine_weights: Float[Array, "tokens k"]) -> Float[Array, "tokens hidden"]:
  """sum_k weight[t, k] * expert_rows[row[t, k]], rows past the end reading as zero.

  `assignment_of_row[r]` is the flat assignment (t * k + slot) row r holds,
  or tokens * k if none. The weighted sum runs in float32 (the reference
  multiplies by float32 weights).
  """
  num_tokens, k = row_of_assignment.shape
  per_assignment = gather_rows(expert_rows, row_of_assignment.reshape(-1), assignment_of_row[:, None])
  per_assignment = per_assignment.reshape(num_tokens, k, -1)
  combined = jnp.einsum("tkd,tk->td", per_assignment.astype(jnp.float32),
                        combine_weights.astype(jnp.float32))
  return combined.astype(expert_rows.dtype)


def capacity_dispatch(x: Float[Array, "tokens hidden"], expert_ids: Int[Array, "tokens k"],
                      combine_weights: Float[Array, "tokens k"],
                      expert_fn: Callable[[Array], Array], num_experts: int,
                      capacity: int, token_mask: Optional[Bool[Array, "tokens"]] = None
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
      jnp.arange(num_assignments, dtype=jnp.int32), mode="drop")
  token_of_slot = jnp.where(assignment_of_slot < num_assignments, assignment_of_slot // k, num_tokens)
  buffer = gather_rows(x, token_of_slot, slots).reshape(num_experts, capacity, hidden)
  expert_out = expert_fn(buffer).reshape(num_experts * capacity, hidden)
  return DispatchOutput(output=_combine(expert_out, slots, assignment_of_slot, combine_weights),
                        kept=kept)


def ragged_dispatch(x: Float[Array, "tokens hidden"], expert_ids: Int[Array, "tokens k"],
                    combine_weights: Float[Array, "tokens k"],
                    grouped_fn: Callable[[Array, Array], Array],
                    num_experts: int, token_mask: Optional[Bool[Array, "tokens"]] = None
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
  row_of_assignment = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  row_of_assignment = row_of_assignment.reshape(num_tokens, k)
  rows = gather_rows(x, order // k, row_of_assignment)  # Shape: [tokens * k, hidden]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  sorted_out = grouped_fn(rows, group_sizes)
  return DispatchOutput(output=_combine(sorted_out, row_of_assignment, order, combine_weights),
                        kept=kept)


# ---------------------------------------------------------------------------
# Dropless, block-sparse: expert-sorted rows padded to whole tiles
# ---------------------------------------------------------------------------

@flax.struct.dataclass
class BlockedLayout:
  """Where every (token, slot) assignment sits in the tiled, expert-sorted rows.

  Attributes:
    row_of_assignment: <int32>[tokens, K] row of each assignment; `rows` (one
      past the last) for assignments of masked-out tokens.
    assignment_of_row: <int32>[rows] assignment (t * K + slot) each row holds;
      tokens * K for padding rows.
    tile_expert: <int32>[tiles] the expert whose weights each tile uses (tiles
      past `used_tiles` hold zeros and are never run).
    used_tiles: <int32>[] tiles holding at least one assignment: sum_e ceil(n_e / tile).
    kept: <bool>[tokens, K] False only for assignments of masked-out tokens.
  """

  row_of_assignment: Array
  assignment_of_row: Array
  tile_expert: Array
  used_tiles: Array
  kept: Array


def num_blocked_tiles(num_assignments: int, num_experts: int, tile: int) -> int:
  """Static bound on sum_e ceil(n_e / tile) over all loads with sum_e n_e = num_assignments.

  Each expert wastes at most tile - 1 padding rows, so the rows never exceed
  num_assignments + num_experts * (tile - 1); at least one tile.
  """
  return max(1, (num_assignments + num_experts * (tile - 1)) // tile)


def blocked_layout(expert_ids: Int[Array, "tokens k"], num_experts: int, tile: int,
                   num_tiles: int, token_mask: Optional[Bool[Array, "tokens"]] = None
                   ) -> BlockedLayout:
  """Sorts assignments by expert and pads each expert's group to a multiple of `tile` rows.

  Expert e's rows start at tile boundary `tile * sum_{e' < e} ceil(n_e' / tile)`,
  in token order (the sort is stable). Assignments of masked-out tokens go to
  a virtual expert past the last and get no row.
  """
  num_tokens, k = expert_ids.shape
  if token_mask is not None:
    expert_ids = jnp.where(token_mask[:, None], expert_ids, num_experts)
  flat = expert_ids.reshape(-1).astype(jnp.int32)  # assignment t * k + slot
  n = flat.shape[0]
  num_rows = num_tiles * tile
  order = expert_order(flat, num_experts)  # sorted position -> assignment
  counts = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  tiles_per_expert = (counts + tile - 1) // tile
  tile_end = jnp.cumsum(tiles_per_expert)  # [E] first tile after expert e's
  padded_start = (tile_end - tiles_per_expert) * tile  # first row of expert e
  start = jnp.cumsum(counts) - counts  # first sorted position of expert e
  sorted_ids = flat[order]
  real = sorted_ids < num_experts
  safe_ids = jnp.minimum(sorted_ids, num_experts - 1)
  sorted_rows = padded_start[safe_ids] + jnp.arange(n, dtype=jnp.int32) - start[safe_ids]
  sorted_rows = jnp.where(real, sorted_rows, num_rows)
  row_of_assignment = jnp.zeros((n,), jnp.int32).at[order].set(sorted_rows)
  assignment_of_row = jnp.full((num_rows,), n, jnp.int32).at[row_of_assignment].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop")
  tile_index = jnp.arange(num_tiles, dtype=jnp.int32)
  tile_expert = jnp.sum(tile_end[None, :] <= tile_index[:, None], axis=1, dtype=jnp.int32)
  return BlockedLayout(row_of_assignment=row_of_assignment.reshape(num_tokens, k),
                       assignment_of_row=assignment_of_row,
                       tile_expert=jnp.minimum(tile_expert, num_experts - 1),
                       used_tiles=tile_end[-1].astype(jnp.int32),
                       kept=(flat < num_experts).reshape(num_tokens, k))


def _take_experts(w: Array, experts: Int[Array, "g"]) -> Array:
  """w[experts] as a dynamic slice when one tile runs per step (no gather copy of [E, ...])."""
  if experts.shape[0] == 1:
    return jax.lax.dynamic_slice_in_dim(w, experts[0], 1, axis=0)
  return jnp.take(w, experts, axis=0)


def _add_to_experts(acc: Array, experts: Int[Array, "g"], update: Array) -> Array:
  """acc[experts] += update, in place (one dynamic-update-slice when one tile runs per step)."""
  if experts.shape[0] == 1:
    e = experts[0]
    current = jax.lax.dynamic_slice_in_dim(acc, e, 1, axis=0)
    return jax.lax.dynamic_update_slice_in_dim(acc, current + update, e, axis=0)
  return acc.at[experts].add(update, indices_are_sorted=True)  # tiles are in expert order


def _varying_axes(a: Array) -> set[str]:
  """The manual mesh axes `a` varies over inside `jax.shard_map` (empty elsewhere)."""
  return set(getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", None) or ())


def _varying_like(x: Array, reference: Array) -> Array:
  """`x` typed as varying over the manual axes `reference` varies over (so that a loop's
  zero-initialised carry has its body's output type under shard_map); `x` elsewhere."""
  axes = tuple(sorted(_varying_axes(reference) - _varying_axes(x)))
  return jax.lax.pcast(x, axes, to="varying") if axes else x


def _sum_to_type_of(grad: Array, primal: Array) -> Array:
  """`grad` summed over the manual axes its primal is replicated over, as JAX's own
  transposes do (a custom VJP under shard_map must return the primal's type)."""
  axes = tuple(sorted(_varying_axes(grad) - _varying_axes(primal)))
  return jax.lax.psum(grad, axes) if axes else grad


def _blocked_forward(tiles, tile_expert, used_tiles, gate, up, down, tiles_per_step):
  """The loop over used tile groups; returns (outputs, gate pre-activations, up activations)."""
  num_tiles, tile, hidden = tiles.shape
  inter = gate.shape[-1]
  steps = num_tiles // tiles_per_step
  xs = tiles.reshape(steps, tiles_per_step, tile, hidden)
  experts = tile_expert.reshape(steps, tiles_per_step)

  def body(s, carry):
    y, g_all, u_all = carry
    x, e = xs[s], experts[s]
    g = jnp.einsum("gwd,gdf->gwf", x, _take_experts(gate, e))
    u = jnp.einsum("gwd,gdf->gwf", x, _take_experts(up, e))
    out = jnp.einsum("gwf,gfd->gwd", jax.nn.silu(g) * u, _take_experts(down, e))
    return (jax.lax.dynamic_update_index_in_dim(y, out, s, 0),
            jax.lax.dynamic_update_index_in_dim(g_all, g, s, 0),
            jax.lax.dynamic_update_index_in_dim(u_all, u, s, 0))

  zeros = lambda width: _varying_like(jnp.zeros((steps, tiles_per_step, tile, width), tiles.dtype),
                                      tiles)
  used_steps = (used_tiles + tiles_per_step - 1) // tiles_per_step
  y, g_all, u_all = jax.lax.fori_loop(0, used_steps, body, (zeros(hidden), zeros(inter),
                                                           zeros(inter)))
  return y.reshape(tiles.shape), g_all, u_all


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def blocked_swiglu(tiles: Float[Array, "tiles tile hidden"], tile_expert: Int[Array, "tiles"],
                   used_tiles: Int[Array, ""], gate: Array, up: Array, down: Array,
                   tiles_per_step: int = 1) -> Float[Array, "tiles tile hidden"]:
  """Tile i's rows through expert tile_expert[i]'s SwiGLU, for the first `used_tiles` tiles.

  `tile_expert` must be non-decreasing (tiles in expert order, as `blocked_layout` makes them).

  The loop runs `tiles_per_step` tiles per iteration (weights gathered per
  tile when > 1; `num_tiles` must be a multiple of it); steps past the one
  holding tile `used_tiles - 1` are not run and their outputs read as zeros
  (in `blocked_dispatch` every tile past `used_tiles` holds zero rows anyway). A custom VJP so that the backward
  pass is one loop too, accumulating each tile's weight gradient into its
  expert's slice in place (float32 accumulators), instead of the full-size
  zero-padded cotangent per iteration that differentiating `dynamic_slice`
  in a loop would produce. A while loop with a data-dependent trip count:
  only used tiles cost anything.
  """
  return _blocked_forward(tiles, tile_expert, used_tiles, gate, up, down, tiles_per_step)[0]


def _blocked_swiglu_fwd(tiles, tile_expert, used_tiles, gate, up, down, tiles_per_step):
  y, g_all, u_all = _blocked_forward(tiles, tile_expert, used_tiles, gate, up, down, tiles_per_step)
  return y, (tiles, tile_expert, used_tiles, gate, up, down, g_all, u_all)


def _blocked_swiglu_bwd(tiles_per_step, residuals, d_y):
  tiles, tile_expert, used_tiles, gate, up, down, g_all, u_all = residuals
  num_tiles, tile, hidden = tiles.shape
  steps = num_tiles // tiles_per_step
  xs = tiles.reshape(steps, tiles_per_step, tile, hidden)
  dys = d_y.reshape(steps, tiles_per_step, tile, hidden).astype(tiles.dtype)
  experts = tile_expert.reshape(steps, tiles_per_step)
  f32 = jnp.float32

  def body(s, carry):
    d_x, d_gate, d_up, d_down = carry
    x, dy, e, g, u = xs[s], dys[s], experts[s], g_all[s], u_all[s]
    sig = jax.nn.sigmoid(g.astype(f32))
    silu_g = g.astype(f32) * sig
    h = (silu_g * u.astype(f32)).astype(x.dtype)
    d_h = jnp.einsum("gwd,gfd->gwf", dy, _take_experts(down, e), preferred_element_type=f32)
    d_u = (d_h * silu_g).astype(x.dtype)
    d_g = (d_h * u.astype(f32) * sig * (1 + g.astype(f32) * (1 - sig))).astype(x.dtype)
    dx = (jnp.einsum("gwf,gdf->gwd", d_g, _take_experts(gate, e), preferred_element_type=f32)
          + jnp.einsum("gwf,gdf->gwd", d_u, _take_experts(up, e), preferred_element_type=f32))
    return (jax.lax.dynamic_update_index_in_dim(d_x, dx.astype(x.dtype), s, 0),
            _add_to_experts(d_gate, e, jnp.einsum("gwd,gwf->gdf", x, d_g, preferred_element_type=f32)),
            _add_to_experts(d_up, e, jnp.einsum("gwd,gwf->gdf", x, d_u, preferred_element_type=f32)),
            _add_to_experts(d_down, e, jnp.einsum("gwf,gwd->gfd", h, dy, preferred_element_type=f32)))

  init = jax.tree.map(lambda z: _varying_like(z, xs),
                      (jnp.zeros_like(xs), jnp.zeros(gate.shape, f32), jnp.zeros(up.shape, f32),
                       jnp.zeros(down.shape, f32)))
  used_steps = (used_tiles + tiles_per_step - 1) // tiles_per_step
  d_x, d_gate, d_up, d_down = jax.lax.fori_loop(0, used_steps, body, init)
  d_gate, d_up, d_down = (_sum_to_type_of(g, w).astype(w.dtype)
                          for g, w in ((d_gate, gate), (d_up, up), (d_down, down)))
  return d_x.reshape(tiles.shape), None, None, d_gate, d_up, d_down


blocked_swiglu.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd)


def blocked_dispatch(x: Float[Array, "tokens hidden"], expert_ids: Int[Array, "tokens k"],
                     combine_weights: Float[Array, "tokens k"], weights: SwiGLUWeights,
                     tile: int, tiles_per_step: int = 1,
                     token_mask: Optional[Bool[Array, "tokens"]] = None) -> DispatchOutput:
  """Dropless routed output through expert-sorted rows padded to whole `tile`-row tiles.

  Static shapes: `num_blocked_tiles` tiles (rounded up to a multiple of
  `tiles_per_step`), i.e. at most tokens * K + N * (tile - 1) rows, filled by
  the gather in `gather_rows` (padding rows are exact zeros, never
  uninitialised memory), run by `blocked_swiglu` (only the used tiles), and
  combined by gather as in the capacity path.
  """
  num_tokens, k = expert_ids.shape
  num_experts = weights.gate.shape[0]
  tile = max(1, min(tile, num_tokens * k))
  num_tiles = num_blocked_tiles(num_tokens * k, num_experts, tile)
  tiles_per_step = max(1, min(tiles_per_step, num_tiles))
  num_tiles = -(-num_tiles // tiles_per_step) * tiles_per_step
  layout = blocked_layout(expert_ids, num_experts, tile, num_tiles, token_mask)
  token_of_row = jnp.where(layout.assignment_of_row < num_tokens * k,
                           layout.assignment_of_row // k, num_tokens)
  rows = gather_rows(x, token_of_row, layout.row_of_assignment)  # [tiles * tile, hidden]
  out_rows = blocked_swiglu(rows.reshape(num_tiles, tile, -1), layout.tile_expert,
                            layout.used_tiles, weights.gate, weights.up, weights.down,
                            tiles_per_step)
  output = _combine(out_rows.reshape(num_tiles * tile, -1), layout.row_of_assignment,
                    layout.assignment_of_row, combine_weights)
  return DispatchOutput(output=output, kept=layout.kept)


def run_on_expert_shards(buffer: Float[Array, "experts capacity hidden"],
                         local_experts_fn: Callable[[Array], Array],
                         axis_name: str) -> Float[Array, "experts capacity hidden"]:
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


def dispatch_to_experts(x: Float[Array, "tokens hidden"], expert_ids: Int[Array, "tokens k"],
                        combine_weights: Float[Array, "tokens k"], weights: Any, *,
                        mode: str, capacity: int, dropless_impl: str = "auto",
                        dropless_tile: int = 0,
                        token_mask: Optional[Bool[Array, "tokens"]] = None,
                        expert_axis: Optional[str] = None,
                        expert_fn: Callable[[Any, Array], Array] = swiglu) -> DispatchOutput:
  """Routed-expert output for every token under the chosen dispatch mode.

  Args:
    x: <float>[tokens, hidden] token representations (compute dtype).
    expert_ids / combine_weights: <int32|float32>[tokens, K] from the router.
    weights: stacked expert weights (compute dtype), leaves with a leading [E] axis.
    mode: 'capacity' or 'dropless'.
    capacity: per-expert capacity for mode='capacity' (see `expert_capacity`).
    dropless_impl: 'auto' | 'gather' | 'ragged_dot' | 'blocked' for mode='dropless'.
    dropless_tile: rows per tile of the 'blocked' implementation (0: `default_dropless_tile`).
    token_mask: <bool>[tokens] False for padding: those tokens take no expert
      capacity and get no routed output (None: every token is real).
    expert_axis: inside `jax.shard_map`, the mesh axis the experts are split
      over; `weights` are then this device's E/n experts and the buffer rows
      travel by all-to-all (`run_on_expert_shards`). Dropless then uses the
      buffer with capacity = tokens.
    expert_fn: one expert, `(weights of one expert, rows <[..., hidden]>) -> [..., hidden]`;
      `dropless_impl='ragged_dot'` needs the default SwiGLU.
  """
  run_experts = per_expert_fn(expert_fn)
  num_tokens = x.shape[0]
  num_experts = jax.tree.leaves(weights)[0].shape[0]
  if expert_axis is not None:
    if mode not in DISPATCHES:
      raise ValueError(f"dispatch mode: got {mode!r}; allowed values: capacity, dropless")

    def exchanged_experts(buffer):
      return run_on_expert_shards(buffer, lambda rows: run_experts(weights, rows),
                                  expert_axis)

    return capacity_dispatch(x, expert_ids, combine_weights, exchanged_experts,
                             num_experts * jax.lax.axis_size(expert_axis),
                             capacity if mode == "capacity" else num_tokens, token_mask)
  if mode == "capacity":
    return capacity_dispatch(x, expert_ids, combine_weights,
                             lambda buf: run_experts(weights, buf), num_experts, capacity,
                             token_mask)
  if mode != "dropless":
    raise ValueError(f"dispatch mode: got {mode!r}; allowed values: capacity, dropless")
  impl = resolve_dropless_impl(dropless_impl)
  if expert_fn is not swiglu:  # the fast dropless kernels are written for SwiGLU
    impl = "gather" if dropless_impl == "auto" else dropless_impl
    if impl != "gather":
      raise ValueError(f"dropless_impl={impl!r} computes SwiGLU experts only; allowed with a "
                       "custom expert_fn: 'auto' (= 'gather'), 'gather'")
  if impl == "blocked":
    tile = dropless_tile or default_dropless_tile(expert_ids.size, num_experts)
    return blocked_dispatch(x, expert_ids, combine_weights, weights, tile,
                            blocked_tiles_per_step(weights, tile), token_mask)
  if impl == "ragged_dot":
    return ragged_dispatch(x, expert_ids, combine_weights,
                           lambda rows, sizes: swiglu_grouped(weights, rows, sizes), num_experts,
                           token_mask)
  return capacity_dispatch(x, expert_ids, combine_weights,
                           lambda buf: run_experts(weights, buf), num_experts, num_tokens,
                           token_mask)
