"""Dropless dispatch, block-sparse (MegaBlocks' layout in plain XLA; `dropless_impl='blocked'`).

Assignments are sorted by expert and each expert's group is padded to a
multiple of a row tile; every used tile runs against its expert's weights in
a loop (`blocked_swiglu`, a custom VJP whose backward is one loop too). Work
and memory grow with tokens x K (at most tokens * K + experts * (tile - 1)
rows), not with tokens x N. Padding rows are exact zeros (never uninitialised
memory), and only the used tiles run (a data-dependent trip count).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from coe_jax.nn.experts import SwiGLUWeights
from coe_jax.nn.token_rows import DispatchOutput, combine_rows, expert_order, gather_rows

TILE_CAP = 256  # most rows in one default tile; an expert's larger load is split into equal tiles


def default_dropless_tile(num_assignments: int, num_experts: int) -> int:
  """Rows per tile of 'blocked' when `dropless_tile` is 0.

  Sized for balanced routing (what the load-balancing loss trains towards; an
  expert's load is then about mean +- sqrt(mean)): one tile holds a load up to
  one standard deviation above the mean, so ~84% of the experts run a single
  tile (one read of their weights) and the rest two. Above `TILE_CAP` rows that
  target is split into equal tiles (mean load 520 -> 3 tiles of 184 rows: 0.73-0.97x
  capacity, 64: 1.27-1.41x). A multiple of 8, at least 8. PERF.md 20, the routed-expert
  layer at the paper width on CPU, time relative to the capacity path, balanced
  loads: mean load 65 -> 80 rows 0.88-0.98x (the old power of two, 64:
  1.20-1.22x), mean load 32.5 -> 40 rows 1.06-1.42x (32: 1.11-1.82x; processes
  vary); with an untrained router's skewed loads, 1.21-1.23x (64: 1.25-1.27x)
  and 1.29-1.90x (32: 1.30-1.61x).
  """
  mean = num_assignments / max(num_experts, 1)
  target = mean + math.sqrt(mean)
  pieces = max(1, math.ceil(target / TILE_CAP))
  return int(max(8, 8 * math.ceil(target / pieces / 8)))


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


def blocked_layout(
  expert_ids: Int[Array, "tokens k"],
  num_experts: int,
  tile: int,
  num_tiles: int,
  token_mask: Optional[Bool[Array, "tokens"]] = None,
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
  assignment_of_row = (
    jnp.full((num_rows,), n, jnp.int32)
    .at[row_of_assignment]
    .set(jnp.arange(n, dtype=jnp.int32), mode="drop")
  )
  tile_index = jnp.arange(num_tiles, dtype=jnp.int32)
  tile_expert = jnp.sum(tile_end[None, :] <= tile_index[:, None], axis=1, dtype=jnp.int32)
  return BlockedLayout(
    row_of_assignment=row_of_assignment.reshape(num_tokens, k),
    assignment_of_row=assignment_of_row,
    tile_expert=jnp.minimum(tile_expert, num_experts - 1),
    used_tiles=tile_end[-1].astype(jnp.int32),
    kept=(flat < num_experts).reshape(num_tokens, k),
  )


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
    return (
      jax.lax.dynamic_update_index_in_dim(y, out, s, 0),
      jax.lax.dynamic_update_index_in_dim(g_all, g, s, 0),
      jax.lax.dynamic_update_index_in_dim(u_all, u, s, 0),
    )

  zeros = lambda width: _varying_like(
    jnp.zeros((steps, tiles_per_step, tile, width), tiles.dtype), tiles
  )
  used_steps = (used_tiles + tiles_per_step - 1) // tiles_per_step
  y, g_all, u_all = jax.lax.fori_loop(
    0, used_steps, body, (zeros(hidden), zeros(inter), zeros(inter))
  )
  return y.reshape(tiles.shape), g_all, u_all


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def blocked_swiglu(
  tiles: Float[Array, "tiles tile hidden"],
  tile_expert: Int[Array, "tiles"],
  used_tiles: Int[Array, ""],
  gate: Array,
  up: Array,
  down: Array,
  tiles_per_step: int = 1,
) -> Float[Array, "tiles tile hidden"]:
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
    dx = jnp.einsum(
      "gwf,gdf->gwd", d_g, _take_experts(gate, e), preferred_element_type=f32
    ) + jnp.einsum("gwf,gdf->gwd", d_u, _take_experts(up, e), preferred_element_type=f32)
    return (
      jax.lax.dynamic_update_index_in_dim(d_x, dx.astype(x.dtype), s, 0),
      _add_to_experts(d_gate, e, jnp.einsum("gwd,gwf->gdf", x, d_g, preferred_element_type=f32)),
      _add_to_experts(d_up, e, jnp.einsum("gwd,gwf->gdf", x, d_u, preferred_element_type=f32)),
      _add_to_experts(d_down, e, jnp.einsum("gwf,gwd->gfd", h, dy, preferred_element_type=f32)),
    )

  # Each accumulator starts from a zero of its own: 0.0 times a finite number that differs per
  # accumulator and per call (each call routes its own way). XLA merges identical constant
  # broadcasts, across accumulators and across the model's calls of this loop, and then copies
  # the merged buffer into every loop's state: a read and a write of [E, d, f] float32 where one
  # write does (PERF.md 18).
  zeros = (used_tiles + jnp.arange(3, dtype=used_tiles.dtype)).astype(f32) * 0.0
  init = jax.tree.map(
    lambda z: _varying_like(z, xs),
    (
      jnp.zeros_like(xs),
      *(jnp.broadcast_to(z, w.shape) for z, w in zip(zeros, (gate, up, down))),
    ),
  )
  used_steps = (used_tiles + tiles_per_step - 1) // tiles_per_step
  d_x, d_gate, d_up, d_down = jax.lax.fori_loop(0, used_steps, body, init)
  d_gate, d_up, d_down = (
    _sum_to_type_of(g, w).astype(w.dtype) for g, w in ((d_gate, gate), (d_up, up), (d_down, down))
  )
  return d_x.reshape(tiles.shape), None, None, d_gate, d_up, d_down


blocked_swiglu.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd)


def blocked_dispatch(
  x: Float[Array, "tokens hidden"],
  expert_ids: Int[Array, "tokens k"],
  combine_weights: Float[Array, "tokens k"],
  weights: SwiGLUWeights,
  tile: int,
  tiles_per_step: int = 1,
  token_mask: Optional[Bool[Array, "tokens"]] = None,
) -> DispatchOutput:
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
  token_of_row = jnp.where(
    layout.assignment_of_row < num_tokens * k, layout.assignment_of_row // k, num_tokens
  )
  rows = gather_rows(x, token_of_row, layout.row_of_assignment)  # [tiles * tile, hidden]
  out_rows = blocked_swiglu(
    rows.reshape(num_tiles, tile, -1),
    layout.tile_expert,
    layout.used_tiles,
    weights.gate,
    weights.up,
    weights.down,
    tiles_per_step,
  )
  output = combine_rows(
    out_rows.reshape(num_tiles * tile, -1),
    layout.row_of_assignment,
    layout.assignment_of_row,
    combine_weights,
  )
  return DispatchOutput(output=output, kept=layout.kept)
