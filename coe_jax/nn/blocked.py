"""Dropless dispatch, block-sparse (MegaBlocks' layout in plain XLA; `dropless_impl='blocked'`).

Assignments are sorted by expert and each expert's group runs as whole tiles
of `tile` rows plus one last tile of the smallest of a few sizes that holds the
rest; every used tile runs against its expert's weights in one loop per
size (`blocked_swiglu_threaded`, a custom VJP whose backward is loops too). Work and
memory grow with tokens x K (at most tokens * K + experts * (widest step between
sizes - 1) rows, plus one tile of zero rows when several tiles run per step),
not with tokens x N. Padding rows are exact zeros (never uninitialised memory),
and only the used tiles run (data-dependent trip counts).

A chain of passes over the same experts (CoE, C > 1) can thread `DeferredWeights`
through them (`dispatch.chain_weights`): each pass's backward then leaves its rows
for one weight-gradient loop over all passes' rows, whose matmuls contract C times
as many rows (experiments/PERF.md 38-39).

This module is the kernel: it runs the tile sizes and tiles per step it is
given. Which ones a target gets (`dropless_tile`, `dropless_tile_sizes` and the
platform's defaults) is policy, in `coe_jax.nn.tuning`.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from coe_jax.nn.experts import SwiGLUWeights
from coe_jax.nn.manual_axes import sum_to_type_of, varying_like
from coe_jax.nn.token_rows import DispatchOutput, combine_rows, expert_order, gather_rows

TILES_BWD_SCOPE = "blocked_tiles_bwd"


def blocked_bounds(
  num_assignments: int, num_experts: int, tile_sizes: Sequence[int]
) -> tuple[int, tuple[int, ...]]:
  """Static bounds over all loads with sum_e n_e = num_assignments: rows, and tiles of each size.

  An expert's last tile of size s_i holds more than s_{i-1} of its rows (s_0 = 0),
  so it pads fewer than the widest step between sizes, and there are at most
  min(experts, assignments // (s_{i-1} + 1)) such tiles. Tiles of the largest
  size (whole tiles and last tiles of that size) hold more than s_{m-1} rows
  each, and number at most sum_e ceil(n_e / s_m).
  """
  busy = max(1, min(num_experts, num_assignments))  # experts that can hold an assignment
  edges = (0, *tile_sizes)
  steps = [size - lower for lower, size in zip(edges, edges[1:])]
  rows = num_assignments + busy * (max(steps) - 1)
  tiles = [min(busy, num_assignments // (lower + 1)) for lower in edges[:-1]]
  top = tile_sizes[-1]
  tiles[-1] = min(num_assignments // (edges[-2] + 1), (num_assignments + busy * (top - 1)) // top)
  return rows, tuple(max(1, t) for t in tiles)


@flax.struct.dataclass
class TileSchedule:
  """The tiles 'blocked' runs, for each tile size: their experts and first rows.

  Attributes:
    expert: per size, <int32>[tiles] the expert whose weights each tile uses,
      non-decreasing (entries past `used` hold expert N - 1, which keeps it so).
    start: per size, <int32>[tiles] each tile's first row (used tiles never
      overlap); past `used`, the first row after the expert rows (a block of
      zero rows when several tiles run per step, never read otherwise).
    used: <int32>[sizes] tiles of each size holding at least one assignment.
    expert_rows: <int32>[N] rows of each expert's tiles (its block, from row 0 in
      expert order; its rows past its load are zero).
    sizes: the tile sizes (rows), ascending.
  """

  expert: tuple[Array, ...]
  start: tuple[Array, ...]
  used: Array
  expert_rows: Array
  sizes: tuple[int, ...] = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class BlockedLayout:
  """Where every (token, slot) assignment sits in the expert-sorted, tile-padded rows.

  Attributes:
    row_of_assignment: <int32>[tokens, K] row of each assignment; `rows` (one
      past the last) for assignments of masked-out tokens.
    assignment_of_row: <int32>[rows] assignment (t * K + slot) each row holds;
      tokens * K for padding rows.
    schedule: the tiles covering every expert's rows.
    kept: <bool>[tokens, K] False only for assignments of masked-out tokens.
  """

  row_of_assignment: Array
  assignment_of_row: Array
  schedule: TileSchedule
  kept: Array


def blocked_layout(
  expert_ids: Int[Array, "tokens k"],
  num_experts: int,
  tile_sizes: Sequence[int],
  token_mask: Optional[Bool[Array, "tokens"]] = None,
  tiles_per_step: int = 1,
) -> BlockedLayout:
  """Sorts assignments by expert and pads each expert's group to its tiles.

  Expert e's n_e rows (in token order: the sort is stable) are ceil(n_e / s_m) - 1
  whole tiles of the largest size s_m and a last tile of the smallest size that
  holds the rest; each expert's rows start where the previous expert's tiles end.
  With `tiles_per_step` > 1, each size's tile list is padded to a multiple of it
  (or of its length bound, if smaller: `_tiles_per_step`), and the rows gain a
  block of s_m zero rows for the padding entries to read.
  Assignments of masked-out tokens go to a virtual expert past the last and get no row.
  """
  num_tokens, k = expert_ids.shape
  if token_mask is not None:
    expert_ids = jnp.where(token_mask[:, None], expert_ids, num_experts)
  flat = expert_ids.reshape(-1).astype(jnp.int32)  # assignment t * k + slot
  n = flat.shape[0]
  order = expert_order(flat, num_experts)  # sorted position -> assignment
  counts = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  padded_start, schedule, num_rows = tile_schedule(counts, n, tuple(tile_sizes), tiles_per_step)
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
  return BlockedLayout(
    row_of_assignment=row_of_assignment.reshape(num_tokens, k),
    assignment_of_row=assignment_of_row,
    schedule=schedule,
    kept=(flat < num_experts).reshape(num_tokens, k),
  )


def tile_schedule(
  counts: Int[Array, "experts"],
  max_rows: int,
  tile_sizes: tuple[int, ...],
  tiles_per_step: int = 1,
) -> tuple[Int[Array, "experts"], TileSchedule, int]:
  """Each expert's `counts[e]` rows (at most `max_rows` in all) padded to its tiles.

  Returns (first row of each expert, the schedule, the static row count). Expert
  e's rows are ceil(n_e / s_m) - 1 whole tiles of the largest size s_m and a last
  tile of the smallest size that holds the rest, from where expert e - 1's end.
  """
  num_experts = counts.shape[0]
  expert_rows, tiles_of_size = blocked_bounds(max_rows, num_experts, tile_sizes)
  num_rows = expert_rows + (tile_sizes[-1] if tiles_per_step > 1 else 0)
  top = tile_sizes[-1]
  sizes = jnp.asarray(tile_sizes, jnp.int32)
  whole = jnp.maximum(counts - 1, 0) // top  # whole tiles before the last one
  last = counts - whole * top  # rows in the last tile, in [1, top]; 0 for an idle expert
  last_size = jnp.sum(sizes[None, :] < last[:, None], axis=1, dtype=jnp.int32)  # its size's index
  padded = whole * top + jnp.where(last > 0, sizes[jnp.minimum(last_size, len(tile_sizes) - 1)], 0)
  padded_start = jnp.cumsum(padded) - padded  # first row of expert e
  experts, starts, used = [], [], []
  for i, (size, bound) in enumerate(zip(tile_sizes, tiles_of_size)):
    is_top = i == len(tile_sizes) - 1
    per_expert = ((last > 0) & (last_size == i)).astype(jnp.int32) + (whole if is_top else 0)
    end = jnp.cumsum(per_expert)  # tiles of this size up to and including expert e's
    per_step = _tiles_per_step(tiles_per_step, bound)
    index = jnp.arange(-(-bound // per_step) * per_step, dtype=jnp.int32)
    expert = jnp.minimum(
      jnp.sum(end[None, :] <= index[:, None], axis=1, dtype=jnp.int32), num_experts - 1
    )
    first = padded_start[expert] + (index - end[expert] + per_expert[expert]) * size
    if not is_top:  # after the expert's whole tiles
      first = first + whole[expert] * top
    experts.append(expert)
    starts.append(jnp.where(index < end[-1], first, expert_rows))
    used.append(end[-1])
  schedule = TileSchedule(tuple(experts), tuple(starts), jnp.stack(used), padded, tile_sizes)
  return padded_start, schedule, num_rows


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


def _read_tiles(a: Array, starts: Int[Array, "g"], size: int) -> Array:
  """[g, size, width] rows starts[i] .. starts[i] + size of a [rows, width] (a slice when g = 1)."""
  if starts.shape[0] == 1:
    return jax.lax.dynamic_slice_in_dim(a, starts[0], size, axis=0)[None]
  return a[starts[:, None] + jnp.arange(size, dtype=starts.dtype)]


def _write_tiles(a: Array, starts: Int[Array, "g"], value: Array) -> Array:
  """a with `_read_tiles(a, starts, size)` replaced by value [g, size, width], in place."""
  if starts.shape[0] == 1:
    return jax.lax.dynamic_update_slice_in_dim(a, value[0].astype(a.dtype), starts[0], axis=0)
  rows = (starts[:, None] + jnp.arange(value.shape[1], dtype=starts.dtype)).reshape(-1)
  return a.at[rows].set(value.reshape(rows.shape[0], -1).astype(a.dtype))


def _tiles_per_step(tiles_per_step: int, num_tiles: int) -> int:
  """Tiles per loop iteration for a list of at most `num_tiles` tiles: never more than it holds."""
  return max(1, min(tiles_per_step, num_tiles))


def _over_tiles(schedule: TileSchedule, tiles_per_step: int, body, carry):
  """carry through body(carry, size, experts <[g]>, starts <[g]>) for each size's used tile groups.

  One `fori_loop` per size with a data-dependent trip count: only used tiles cost anything.
  """
  for i, size in enumerate(schedule.sizes):
    per_step = _tiles_per_step(tiles_per_step, schedule.expert[i].shape[0])
    experts = schedule.expert[i].reshape(-1, per_step)
    starts = schedule.start[i].reshape(-1, per_step)
    used_steps = (schedule.used[i] + per_step - 1) // per_step
    carry = jax.lax.fori_loop(
      0,
      used_steps,
      lambda s, c, size=size, experts=experts, starts=starts: body(c, size, experts[s], starts[s]),
      carry,
    )
  return carry


def _blocked_forward(rows, schedule, gate, up, down, tiles_per_step):
  """The tile loops; returns (outputs, gate pre-activations, up activations), each per row."""
  inter = gate.shape[-1]

  def body(carry, size, e, starts):
    y, g_all, u_all = carry
    x = _read_tiles(rows, starts, size)
    g = jnp.einsum("gwd,gdf->gwf", x, _take_experts(gate, e))
    u = jnp.einsum("gwd,gdf->gwf", x, _take_experts(up, e))
    out = jnp.einsum("gwf,gfd->gwd", jax.nn.silu(g) * u, _take_experts(down, e))
    return (
      _write_tiles(y, starts, out),
      _write_tiles(g_all, starts, g),
      _write_tiles(u_all, starts, u),
    )

  zeros = lambda width: varying_like(jnp.zeros((rows.shape[0], width), rows.dtype), rows)
  init = (zeros(rows.shape[1]), zeros(inter), zeros(inter))
  return _over_tiles(schedule, tiles_per_step, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def blocked_swiglu_threaded(
  rows: Float[Array, "rows hidden"],
  schedule: TileSchedule,
  gate: Array,
  up: Array,
  down: Array,
  tiles_per_step: int = 1,
) -> tuple[Float[Array, "rows hidden"], Array, Array, Array]:
  """Each scheduled tile's rows through its expert's SwiGLU; rows outside every used tile stay zero.

  Returns (outputs, gate, up, down): the weights pass through unchanged. Their
  cotangent is where the backward pass starts accumulating the weight gradient
  (in place), so passes chained through the returned weights build one
  gradient for all of them, without a zeroed accumulator per pass and the sum
  of the passes' gradients afterwards (experiments/PERF.md 31).

  `schedule` as `blocked_layout` makes it: each size's experts non-decreasing
  (the weight gradients are added with sorted indices), used tiles disjoint.
  The tiles of one size run in a loop, `tiles_per_step` per iteration (their
  weights gathered when > 1; each size's list a multiple of that many long, or
  shorter, its padding entries reading a block of zero rows). A custom VJP so
  that the backward pass is loops too, accumulating each tile's weight gradient
  into its expert's slice in place (float32 accumulators), instead of the
  full-size zero-padded cotangent per iteration that differentiating
  `dynamic_slice` in a loop would produce.
  """
  y = _blocked_forward(rows, schedule, gate, up, down, tiles_per_step)[0]
  return y, gate, up, down


def _blocked_swiglu_fwd(rows, schedule, gate, up, down, tiles_per_step):
  # symbolic_zeros=True: every leaf comes wrapped, whether it is differentiated or not
  rows, schedule, gate, up, down = jax.tree.map(lambda p: p.value, (rows, schedule, gate, up, down))
  y, g_all, u_all = _blocked_forward(rows, schedule, gate, up, down, tiles_per_step)
  return (y, gate, up, down), (rows, schedule, gate, up, down, g_all, u_all)


def _blocked_swiglu_bwd(tiles_per_step, residuals, cotangents):
  with jax.named_scope(TILES_BWD_SCOPE):  # names the backward's ops for profiles
    return _blocked_swiglu_bwd_loops(tiles_per_step, residuals, *cotangents)


def _tile_backward(dy, g, u, gate, up, down, e, dtype):
  """A tile's backward through its expert's SwiGLU but the weight gradients:
  (d_x float32, d_g, d_u, h = silu(g) * u), from the output cotangent and the saved
  gate and up activations."""
  f32 = jnp.float32
  g, u = g.astype(f32), u.astype(f32)
  sig = jax.nn.sigmoid(g)
  silu_g = g * sig
  d_h = jnp.einsum("gwd,gfd->gwf", dy, _take_experts(down, e), preferred_element_type=f32)
  d_u = (d_h * silu_g).astype(dtype)
  d_g = (d_h * u * sig * (1 + g * (1 - sig))).astype(dtype)
  dx = jnp.einsum(
    "gwf,gdf->gwd", d_g, _take_experts(gate, e), preferred_element_type=f32
  ) + jnp.einsum("gwf,gdf->gwd", d_u, _take_experts(up, e), preferred_element_type=f32)
  return dx, d_g, d_u, (silu_g * u).astype(dtype)


def _blocked_swiglu_bwd_loops(tiles_per_step, residuals, d_y, d_gate_in, d_up_in, d_down_in):
  rows, schedule, gate, up, down, g_all, u_all = residuals
  d_y = d_y.astype(rows.dtype)
  f32 = jnp.float32

  def body(carry, size, e, starts):
    d_x, d_gate, d_up, d_down = carry
    x, dy = _read_tiles(rows, starts, size), _read_tiles(d_y, starts, size)
    g, u = _read_tiles(g_all, starts, size), _read_tiles(u_all, starts, size)
    dx, d_g, d_u, h = _tile_backward(dy, g, u, gate, up, down, e, x.dtype)
    return (
      _write_tiles(d_x, starts, dx),
      _add_to_experts(d_gate, e, jnp.einsum("gwd,gwf->gdf", x, d_g, preferred_element_type=f32)),
      _add_to_experts(d_up, e, jnp.einsum("gwd,gwf->gdf", x, d_u, preferred_element_type=f32)),
      _add_to_experts(d_down, e, jnp.einsum("gwf,gwd->gfd", h, dy, preferred_element_type=f32)),
    )

  # The weight gradients accumulate onto the cotangents of the passed-through weights: the
  # later passes' gradients in a chain, fresh zeros otherwise (not JAX's: `_fresh_zeros`).
  accumulators = tuple(
    _fresh_zeros(w, schedule.used, salt)
    if isinstance(incoming, jax.custom_derivatives.SymbolicZero)
    else incoming.astype(f32)
    for salt, (incoming, w) in enumerate(zip((d_gate_in, d_up_in, d_down_in), (gate, up, down)))
  )
  init = jax.tree.map(lambda z: varying_like(z, rows), (jnp.zeros_like(rows), *accumulators))
  d_x, d_gate, d_up, d_down = _over_tiles(schedule, tiles_per_step, body, init)
  d_gate, d_up, d_down = (
    sum_to_type_of(g, w).astype(w.dtype) for g, w in ((d_gate, gate), (d_up, up), (d_down, down))
  )
  return d_x, None, d_gate, d_up, d_down


blocked_swiglu_threaded.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd, symbolic_zeros=True)


@flax.struct.dataclass
class WeightGradRows:
  """What each pass of a chain leaves for one weight-gradient loop over all passes' rows.

  The cotangent of a value that is zeros in the forward (`defer_weight_grads`): pass c's
  backward writes its slot c, the function that made it reads every slot last. Per pass
  (leading axis C), each of its R rows' input x <[C, R, hidden]>, hidden activation h and
  the cotangents of its gate and up pre-activations d_g, d_u <[C, R, inter]>, the cotangent
  of its output dy <[C, R, hidden]>, and the rows of each expert's tiles <float32>[C, N].
  """

  x: Array
  h: Array
  dy: Array
  d_g: Array
  d_u: Array
  expert_rows: Array


@flax.struct.dataclass
class DeferredWeights:
  """Stacked SwiGLU weights whose gradient 'blocked' builds once over the C passes of a chain.

  Each pass's weight gradient is a matmul whose contraction is its tile's height (about
  tokens * K / N rows an expert); over all passes' rows at once it is C times taller and
  runs faster (experiments/PERF.md 38-39). `blocked_dispatch` runs the forward as usual and
  leaves each pass's rows in `rows` (`WeightGradRows`); `next_pass` is the slot the next
  pass fills. Made by `defer_weight_grads` for exactly C passes, each reading the one the
  previous returned (`DispatchOutput.weights`): one more pass would overwrite the last slot,
  and a copy used twice would add two passes' rows into one slot.
  """

  weights: SwiGLUWeights
  rows: WeightGradRows
  next_pass: Array


def blocked_rows(
  num_assignments: int, num_experts: int, tile_sizes: Sequence[int], tiles_per_step: int = 1
) -> tuple[int, tuple[int, ...]]:
  """(static rows of `blocked_dispatch`'s expert-sorted buffer, its tile sizes as it uses them)."""
  sizes = tuple(sorted({max(1, min(int(s), num_assignments)) for s in tile_sizes}))
  rows, _ = blocked_bounds(num_assignments, num_experts, sizes)
  return rows + (sizes[-1] if tiles_per_step > 1 else 0), sizes


def defer_weight_grads(
  weights: SwiGLUWeights, passes: int, rows_per_pass: int, grad_tile_sizes: Sequence[int]
) -> DeferredWeights:
  """`weights` for a chain of `passes` blocked dispatches of `rows_per_pass` rows each
  (`blocked_rows`), their gradient built once from every pass's rows in tiles of
  `grad_tile_sizes` (sized for passes x the assignments of one pass)."""
  sizes = tuple(sorted(set(int(s) for s in grad_tile_sizes)))
  rows = _weight_grad_rows(weights.gate, weights.up, weights.down, passes, rows_per_pass, sizes)
  return DeferredWeights(weights, rows, jnp.zeros((), jnp.int32))


def _zero_rows(gate: Array, passes: int, rows_per_pass: int) -> WeightGradRows:
  num_experts, hidden, inter = gate.shape
  zeros = lambda width: jnp.zeros((passes, rows_per_pass, width), gate.dtype)
  return WeightGradRows(
    x=zeros(hidden),
    h=zeros(inter),
    dy=zeros(hidden),
    d_g=zeros(inter),
    d_u=zeros(inter),
    expert_rows=jnp.zeros((passes, num_experts), jnp.float32),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _weight_grad_rows(gate, up, down, passes, rows_per_pass, grad_tile_sizes):
  """Zeros in the forward; the backward turns their cotangent into the weights' gradient."""
  del up, down, grad_tile_sizes
  return _zero_rows(gate, passes, rows_per_pass)


def _weight_grad_rows_fwd(gate, up, down, passes, rows_per_pass, grad_tile_sizes):
  del grad_tile_sizes
  return _zero_rows(gate, passes, rows_per_pass), (gate, up, down)


def _weight_grad_rows_bwd(passes, rows_per_pass, grad_tile_sizes, weights, rows):
  del passes, rows_per_pass
  with jax.named_scope(TILES_BWD_SCOPE):
    return weight_grads_over_passes(rows, *weights, grad_tile_sizes)


_weight_grad_rows.defvjp(_weight_grad_rows_fwd, _weight_grad_rows_bwd)


def weight_grads_over_passes(
  rows: WeightGradRows, gate: Array, up: Array, down: Array, tile_sizes: tuple[int, ...]
) -> tuple[Array, Array, Array]:
  """The gradients of gate, up and down from every pass's rows: each expert's rows of all
  passes side by side (pass after pass), one tile loop over them."""
  passes, per_pass, _ = rows.x.shape
  num_experts = gate.shape[0]
  counts = jnp.round(rows.expert_rows).astype(jnp.int32)  # [C, N]
  first_row, schedule, num_rows = tile_schedule(counts.sum(0), passes * per_pass, tile_sizes)
  ends = jnp.cumsum(counts, axis=1)  # [C, N] one past each expert's last row in its pass
  row = jnp.arange(per_pass, dtype=jnp.int32)
  expert = jax.vmap(lambda e: jnp.searchsorted(e, row, side="right"))(ends).astype(jnp.int32)
  safe = jnp.minimum(expert, num_experts - 1)
  in_pass = row - jnp.take_along_axis(ends - counts, safe, axis=1)  # place in its expert's block
  earlier = jnp.take_along_axis(jnp.cumsum(counts, axis=0) - counts, safe, axis=1)
  target = jnp.where(expert < num_experts, first_row[safe] + earlier + in_pass, num_rows)
  source = (
    jnp.full((num_rows,), passes * per_pass, jnp.int32)
    .at[target.reshape(-1)]
    .set(jnp.arange(passes * per_pass, dtype=jnp.int32), mode="drop")
  )

  def side_by_side(a):  # [C, R, w] -> [num_rows, w], zero rows where no pass's row goes
    flat = a.reshape(passes * per_pass, a.shape[-1])
    return jnp.concatenate([flat, jnp.zeros((1, flat.shape[1]), flat.dtype)])[source]

  x, h, dy, d_g, d_u = (side_by_side(a) for a in (rows.x, rows.h, rows.dy, rows.d_g, rows.d_u))
  f32 = jnp.float32

  def body(carry, size, e, starts):
    d_gate, d_up, d_down = carry
    xt, ht, dyt = (_read_tiles(a, starts, size) for a in (x, h, dy))
    dgt, dut = _read_tiles(d_g, starts, size), _read_tiles(d_u, starts, size)
    return (
      _add_to_experts(d_gate, e, jnp.einsum("gwd,gwf->gdf", xt, dgt, preferred_element_type=f32)),
      _add_to_experts(d_up, e, jnp.einsum("gwd,gwf->gdf", xt, dut, preferred_element_type=f32)),
      _add_to_experts(d_down, e, jnp.einsum("gwf,gwd->gfd", ht, dyt, preferred_element_type=f32)),
    )

  init = tuple(_fresh_zeros(w, schedule.used, i) for i, w in enumerate((gate, up, down)))
  grads = _over_tiles(schedule, 1, body, init)
  return tuple(g.astype(w.dtype) for g, w in zip(grads, (gate, up, down)))


def _fresh_zeros(weight: Array, used: Array, salt: int) -> Array:
  """A float32 zero accumulator of `weight`'s shape, 0.0 times a number that differs per
  `salt` and call: XLA would merge identical zero broadcasts and then copy the merged one into
  each loop's state, a read and a write of [E, d, f] where one write does (PERF.md 18)."""
  zero = (jnp.sum(used) + salt).astype(jnp.float32) * 0.0
  return jnp.broadcast_to(zero, weight.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def blocked_swiglu_deferred(
  rows: Float[Array, "rows hidden"],
  schedule: TileSchedule,
  gate: Array,
  up: Array,
  down: Array,
  grad_rows: WeightGradRows,
  pass_index: Int[Array, ""],
  tiles_per_step: int = 1,
) -> tuple[Float[Array, "rows hidden"], WeightGradRows]:
  """`blocked_swiglu_threaded`'s outputs, with the weight gradient left to `grad_rows`.

  Returns (outputs, grad_rows unchanged). The backward computes the rows' cotangent
  only, and writes this pass's rows into slot `pass_index` of `grad_rows`'s cotangent
  (`WeightGradRows`), for `defer_weight_grads`'s backward to build the weights' gradient.
  """
  del pass_index
  return _blocked_forward(rows, schedule, gate, up, down, tiles_per_step)[0], grad_rows


def _blocked_swiglu_deferred_fwd(rows, schedule, gate, up, down, grad_rows, pass_index, per_step):
  y, g_all, u_all = _blocked_forward(rows, schedule, gate, up, down, per_step)
  return (y, grad_rows), (rows, schedule, gate, up, down, g_all, u_all, pass_index)


def _blocked_swiglu_deferred_bwd(tiles_per_step, residuals, cotangents):
  rows, schedule, gate, up, down, g_all, u_all, pass_index = residuals
  d_y, d_grad_rows = cotangents
  with jax.named_scope(TILES_BWD_SCOPE):
    d_x, d_g, d_u = _blocked_swiglu_bwd_rows(
      tiles_per_step, rows, schedule, gate, up, down, g_all, u_all, d_y
    )
    g32 = g_all.astype(jnp.float32)
    h = (g32 * jax.nn.sigmoid(g32) * u_all.astype(jnp.float32)).astype(rows.dtype)
    mine = dict(
      x=rows,
      h=h,
      dy=d_y.astype(rows.dtype),
      d_g=d_g,
      d_u=d_u,
      expert_rows=schedule.expert_rows.astype(jnp.float32),
    )
    d_grad_rows = d_grad_rows.replace(
      **{
        name: jax.lax.dynamic_update_index_in_dim(
          getattr(d_grad_rows, name), value.astype(getattr(d_grad_rows, name).dtype), pass_index, 0
        )
        for name, value in mine.items()
      }
    )
  return d_x, None, None, None, None, d_grad_rows, None


blocked_swiglu_deferred.defvjp(_blocked_swiglu_deferred_fwd, _blocked_swiglu_deferred_bwd)


def _blocked_swiglu_bwd_rows(tiles_per_step, rows, schedule, gate, up, down, g_all, u_all, d_y):
  """The backward's loops without weight gradients: (d_x, d_g, d_u), each per row."""
  d_y = d_y.astype(rows.dtype)

  def body(carry, size, e, starts):
    d_x, d_g_all, d_u_all = carry
    dy = _read_tiles(d_y, starts, size)
    g, u = _read_tiles(g_all, starts, size), _read_tiles(u_all, starts, size)
    dx, d_g, d_u, _ = _tile_backward(dy, g, u, gate, up, down, e, rows.dtype)
    return (
      _write_tiles(d_x, starts, dx),
      _write_tiles(d_g_all, starts, d_g),
      _write_tiles(d_u_all, starts, d_u),
    )

  zeros = lambda a: varying_like(jnp.zeros_like(a), rows)
  return _over_tiles(schedule, tiles_per_step, body, (zeros(rows), zeros(g_all), zeros(u_all)))


def blocked_dispatch(
  x: Float[Array, "tokens hidden"],
  expert_ids: Int[Array, "tokens k"],
  combine_weights: Float[Array, "tokens k"],
  weights: SwiGLUWeights,
  tile_sizes: int | Sequence[int],
  tiles_per_step: int = 1,
  token_mask: Optional[Bool[Array, "tokens"]] = None,
) -> DispatchOutput:
  """Dropless routed output through expert-sorted rows padded to whole tiles.

  Static shapes: at most tokens * K + N * (widest step between `tile_sizes` - 1)
  rows (`blocked_bounds`; one more tile of zero rows when several tiles run per
  step), filled by the gather in `gather_rows` (padding rows
  are exact zeros, never uninitialised memory), run by `blocked_swiglu_threaded` (only
  the used tiles), and combined by gather as in the capacity path. An int is
  one tile size; sizes over tokens * K are cut to it.
  """
  num_tokens, k = expert_ids.shape
  deferred = weights if isinstance(weights, DeferredWeights) else None
  weights = weights.weights if deferred else weights
  num_experts = weights.gate.shape[0]
  if isinstance(tile_sizes, int):
    tile_sizes = (tile_sizes,)
  tile_sizes = tuple(sorted({max(1, min(int(s), num_tokens * k)) for s in tile_sizes}))
  tiles_per_step = max(1, tiles_per_step)
  with jax.named_scope("layout"):
    layout = blocked_layout(expert_ids, num_experts, tile_sizes, token_mask, tiles_per_step)
    token_of_row = jnp.where(
      layout.assignment_of_row < num_tokens * k, layout.assignment_of_row // k, num_tokens
    )
  with jax.named_scope("gather"):
    rows = gather_rows(x, token_of_row, layout.row_of_assignment)  # [rows, hidden]
  with jax.named_scope("tiles"):
    if deferred:
      if deferred.rows.x.shape[1] != rows.shape[0]:
        raise ValueError(
          f"defer_weight_grads was made for {deferred.rows.x.shape[1]} rows a pass; this "
          f"dispatch has {rows.shape[0]} (blocked_rows gives the count)"
        )
      out_rows, grad_rows = blocked_swiglu_deferred(
        rows,
        layout.schedule,
        weights.gate,
        weights.up,
        weights.down,
        deferred.rows,
        deferred.next_pass,
        tiles_per_step,
      )
      threaded = deferred.replace(rows=grad_rows, next_pass=deferred.next_pass + 1)
    else:
      out_rows, gate, up, down = blocked_swiglu_threaded(
        rows, layout.schedule, weights.gate, weights.up, weights.down, tiles_per_step
      )
      threaded = weights.replace(gate=gate, up=up, down=down)
  with jax.named_scope("combine"):
    output = combine_rows(
      out_rows, layout.row_of_assignment, layout.assignment_of_row, combine_weights
    )
  return DispatchOutput(output=output, kept=layout.kept, weights=threaded)
