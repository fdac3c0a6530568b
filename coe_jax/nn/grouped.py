"""Dropless dispatch on a grouped matmul kernel (`dropless_impl='grouped'`, the GPU default).

MegaBlocks' / tokamax's design written with Pallas (Triton backend): assignments
sorted by expert, each expert's rows padded to whole tiles of `tile` rows
(`grouped_layout`), and one kernel launch computes every tile against its own
expert's weights, read in place (`gmm`; gate and up in one launch, each row tile
read once; no per-tile weight copies, no dense [experts, rows, ...] expansion).
Its custom VJP is the same kernel on the transposed weights, summing the input
gradients, and a transposed grouped matmul that sums each expert's tiles into
its weight gradients (`_tgmm_call`). 6 kernels a layer pass, with the backward.

Static shapes, no XLA while loops: the grid has a fixed number of row tiles,
`(tokens * K + N * (tile - 1)) // tile`, so the work is tokens x K plus at most
one tile per expert; tiles past the used ones write zeros without a matmul.
The only data-dependent trip count is `_tgmm_call`'s loop over one expert's tiles,
inside the kernel. On CPU the kernels run in Pallas' interpreter (tests).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Bool, Float, Int

from coe_jax.nn import tuning
from coe_jax.nn.experts import SwiGLUWeights
from coe_jax.nn.manual_axes import varying_like
from coe_jax.nn.token_rows import DispatchOutput, combine_rows, expert_order, gather_rows


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static kernel settings: rows per tile, Triton blocks, launch options, interpreter."""

  tile: int = tuning.GROUPED_TILE_ROWS
  block_n: int = tuning.GROUPED_BLOCK_N
  block_k: int = tuning.GROUPED_BLOCK_K
  num_warps: int = 4
  num_stages: int = 3
  interpret: bool = False

  def call(self, kernel, **kwargs):
    """`pl.pallas_call` with this config's compiler params (Triton) or the interpreter."""
    if self.interpret:
      return pl.pallas_call(kernel, interpret=True, **kwargs)
    from jax.experimental.pallas import triton as plgpu

    params = plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)
    return pl.pallas_call(kernel, compiler_params=params, **kwargs)


@flax.struct.dataclass
class GroupLayout:
  """Expert-sorted rows in whole tiles of one expert each.

  Attributes:
    row_of_assignment: <int32>[tokens, K] row of each assignment (`rows` if masked out).
    assignment_of_row: <int32>[rows] assignment (t * K + slot) each row holds; tokens * K
      for padding rows.
    tile_expert: <int32>[tiles] the expert of each tile, -1 past the used tiles.
    first_tile / num_tiles: <int32>[experts] each expert's first tile and tile count.
    kept: <bool>[tokens, K] False only for assignments of masked-out tokens.
  """

  row_of_assignment: Array
  assignment_of_row: Array
  tile_expert: Array
  first_tile: Array
  num_tiles: Array
  kept: Array


def num_row_tiles(num_assignments: int, num_experts: int, tile: int) -> int:
  """Static bound on sum_e ceil(n_e / tile) over all loads with sum_e n_e = num_assignments."""
  busy = max(1, min(num_experts, num_assignments))
  return max(1, (num_assignments + busy * (tile - 1)) // tile)


def grouped_layout(
  expert_ids: Int[Array, "tokens k"],
  num_experts: int,
  tile: int,
  token_mask: Optional[Bool[Array, "tokens"]] = None,
) -> GroupLayout:
  """Sorts assignments by expert (stable) and pads each expert's group to whole tiles."""
  num_tokens, k = expert_ids.shape
  if token_mask is not None:
    expert_ids = jnp.where(token_mask[:, None], expert_ids, num_experts)
  flat = expert_ids.reshape(-1).astype(jnp.int32)
  n = flat.shape[0]
  tiles = num_row_tiles(n, num_experts, tile)
  rows = tiles * tile
  order = expert_order(flat, num_experts)
  counts = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  num_tiles = (counts + tile - 1) // tile
  end_tile = jnp.cumsum(num_tiles)
  first_tile = end_tile - num_tiles
  start = jnp.cumsum(counts) - counts
  sorted_ids = flat[order]
  safe = jnp.minimum(sorted_ids, num_experts - 1)
  sorted_rows = first_tile[safe] * tile + jnp.arange(n, dtype=jnp.int32) - start[safe]
  sorted_rows = jnp.where(sorted_ids < num_experts, sorted_rows, rows)
  row_of_assignment = jnp.zeros((n,), jnp.int32).at[order].set(sorted_rows)
  assignment_of_row = (
    jnp.full((rows,), n, jnp.int32)
    .at[row_of_assignment]
    .set(jnp.arange(n, dtype=jnp.int32), mode="drop")
  )
  index = jnp.arange(tiles, dtype=jnp.int32)
  owner = jnp.searchsorted(end_tile, index, side="right", method="compare_all").astype(jnp.int32)
  return GroupLayout(
    row_of_assignment=row_of_assignment.reshape(num_tokens, k),
    assignment_of_row=assignment_of_row,
    tile_expert=jnp.where(index < end_tile[-1], owner, -1),
    first_tile=first_tile,
    num_tiles=num_tiles,
    kept=(flat < num_experts).reshape(num_tokens, k),
  )


def _like(x: Array, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  """A kernel output's type: `shape` and `dtype`, varying over the manual axes `x` varies
  over (inside `jax.shard_map`; nothing elsewhere)."""
  manual = getattr(jax.typeof(x), "manual_axis_type", None)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)


def _dot(a, b, trans_a=False, trans_b=False):
  """float32-accumulated tile product (IEEE float32 for float32 inputs, never TF32)."""
  allow_tf32 = False if a.dtype == jnp.float32 else None
  return pl.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=allow_tf32)


def _gmm_call(xs, ws, tile_expert, cfg: KernelConfig, transpose: bool):
  """Tile by tile, e = the tile's expert. Forward (one x, transpose False): one output per w,
  x @ w[e] ([rows, K] -> [rows, N] each; x's row tile read once for all of them). Input
  gradient (pairs, transpose True): one output, sum_i xs[i] @ ws[i][e].T."""
  fan_in = len(xs) > 1 or transpose
  rows, depth = xs[0].shape
  width = ws[0].shape[1] if transpose else ws[0].shape[2]
  bn, bk = tuning.block_for(width, cfg.block_n), tuning.block_for(depth, cfg.block_k)
  tile, num_x, num_w = cfg.tile, len(xs), len(ws)
  num_out = 1 if fan_in else num_w

  def kernel(expert_ref, *refs):
    x_refs, w_refs, o_refs = refs[:num_x], refs[num_x : num_x + num_w], refs[num_x + num_w :]
    e, j = expert_ref[pl.program_id(0)], pl.program_id(1)

    def product(x_ref, w_ref, kk):
      a = x_ref[:, pl.ds(kk * bk, bk)]
      if transpose:
        return _dot(a, w_ref[e, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)], trans_b=True)
      return _dot(a, w_ref[e, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)])

    def step(kk, accs):
      if fan_in:
        return (accs[0] + sum(product(x, w, kk) for x, w in zip(x_refs, w_refs)),)
      return tuple(acc + product(x_refs[0], w, kk) for acc, w in zip(accs, w_refs))

    @pl.when(e >= 0)
    def _():
      zeros = tuple(jnp.zeros((tile, bn), jnp.float32) for _ in o_refs)
      for o_ref, acc in zip(o_refs, jax.lax.fori_loop(0, depth // bk, step, zeros)):
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(e < 0)
    def _():
      for o_ref in o_refs:
        o_ref[...] = jnp.zeros((tile, bn), o_ref.dtype)

  row_block = pl.BlockSpec((tile, depth), lambda i, j: (i, 0))
  return cfg.call(
    kernel,
    grid=(rows // tile, width // bn),
    in_specs=[pl.no_block_spec, *[row_block] * num_x, *[pl.no_block_spec] * num_w],
    out_specs=[pl.BlockSpec((tile, bn), lambda i, j: (i, j))] * num_out,
    out_shape=[_like(xs[0], (rows, width), xs[0].dtype)] * num_out,
  )(tile_expert, *xs, *ws)


def _tgmm_call(x, dys, first_tile, num_tiles, cfg: KernelConfig, dtypes):
  """dw_i[e] = sum over expert e's tiles of x_tile.T @ dys[i]_tile: [rows, K], [rows, N] ->
  [E, K, N] each (x's tiles read once for all of them)."""
  depth, width = x.shape[1], dys[0].shape[1]
  bk, bn = tuning.block_for(depth, cfg.block_k), tuning.block_for(width, cfg.block_n)
  tile, num_dy = cfg.tile, len(dys)

  def kernel(first_ref, count_ref, x_ref, *refs):
    dy_refs, o_refs = refs[:num_dy], refs[num_dy:]
    e, kk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first = first_ref[e]

    def step(t, accs):
      rows = pl.ds((first + t) * tile, tile)
      a = x_ref[rows, pl.ds(kk * bk, bk)]
      return tuple(
        acc + _dot(a, dy[rows, pl.ds(j * bn, bn)], trans_a=True) for acc, dy in zip(accs, dy_refs)
      )

    zeros = tuple(jnp.zeros((bk, bn), jnp.float32) for _ in o_refs)
    for o_ref, acc in zip(o_refs, jax.lax.fori_loop(0, count_ref[e], step, zeros)):
      o_ref[...] = acc.astype(o_ref.dtype)

  num_experts = first_tile.shape[0]
  return cfg.call(
    kernel,
    grid=(num_experts, depth // bk, width // bn),
    in_specs=[pl.no_block_spec] * (3 + num_dy),
    out_specs=[pl.BlockSpec((pl.squeezed, bk, bn), lambda e, kk, j: (e, kk, j))] * num_dy,
    out_shape=[_like(x, (num_experts, depth, width), dtype) for dtype in dtypes],
  )(first_tile, num_tiles, x, *dys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gmm(
  x: Float[Array, "rows depth"],
  ws: tuple[Float[Array, "experts depth width"], ...],
  tile_expert: Int[Array, "tiles"],
  first_tile: Int[Array, "experts"],
  num_tiles: Int[Array, "experts"],
  cfg: KernelConfig,
) -> tuple[Float[Array, "rows width"], ...]:
  """Grouped matmuls: rows of tile i times each w of expert tile_expert[i] (zeros if -1).

  One kernel for all of `ws` (equal shapes): each row tile is read once. rows = tiles *
  cfg.tile; expert e's tiles are first_tile[e] .. + num_tiles[e] (used by the weight
  gradients). Gradients: x by one kernel summing each cotangent times its w transposed,
  the ws by one transposed grouped matmul (`_tgmm_call`).
  """
  return tuple(_gmm_call((x,), ws, tile_expert, cfg, transpose=False))


def _gmm_fwd(x, ws, tile_expert, first_tile, num_tiles, cfg):
  residuals = (x, ws, tile_expert, first_tile, num_tiles)
  return gmm(x, ws, tile_expert, first_tile, num_tiles, cfg), residuals


def _gmm_bwd(cfg, residuals, dys):
  x, ws, tile_expert, first_tile, num_tiles = residuals
  dys = tuple(dy.astype(x.dtype) for dy in dys)
  (dx,) = _gmm_call(dys, ws, tile_expert, cfg, transpose=True)
  dws = _tgmm_call(x, dys, first_tile, num_tiles, cfg, [w.dtype for w in ws])
  return dx, tuple(dws), None, None, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_swiglu(
  rows: Float[Array, "rows hidden"], layout: GroupLayout, weights: SwiGLUWeights, cfg: KernelConfig
) -> Float[Array, "rows hidden"]:
  """Every used tile's rows through its expert's SwiGLU: gate and up in one kernel, down in
  another (6 kernels with the backward pass)."""
  groups = (layout.tile_expert, layout.first_tile, layout.num_tiles)
  # Under shard_map the kernels see weights typed like the rows; the cast's transpose sums the
  # weight gradients over the axes the weights are replicated on.
  weights = jax.tree.map(lambda w: varying_like(w, rows), weights)
  g, u = gmm(rows, (weights.gate, weights.up), *groups, cfg)
  (out,) = gmm(jax.nn.silu(g) * u, (weights.down,), *groups, cfg)
  return out


def kernel_config(
  num_assignments: int, num_experts: int, tile: int = 0, platform: str = ""
) -> KernelConfig:
  """The target's kernel settings (`tuning`); the interpreter where the target is the CPU."""
  return KernelConfig(
    tile=tuning.grouped_tile_rows(num_assignments, num_experts, tile),
    interpret=tuning.target_platform(platform) == "cpu",
  )


def grouped_dispatch(
  x: Float[Array, "tokens hidden"],
  expert_ids: Int[Array, "tokens k"],
  combine_weights: Float[Array, "tokens k"],
  weights: SwiGLUWeights,
  cfg: KernelConfig,
  token_mask: Optional[Bool[Array, "tokens"]] = None,
) -> DispatchOutput:
  """Dropless routed output: expert-sorted rows in whole tiles through `grouped_swiglu`.

  Rows: `num_row_tiles(tokens * K, N, tile) * tile` (padding rows exact zeros), moved in
  and out by the same gathers as the capacity path (`gather_rows`, `combine_rows`).
  """
  num_tokens, k = expert_ids.shape
  layout = grouped_layout(expert_ids, weights.gate.shape[0], cfg.tile, token_mask)
  token_of_row = jnp.where(
    layout.assignment_of_row < num_tokens * k, layout.assignment_of_row // k, num_tokens
  )
  rows = gather_rows(x, token_of_row, layout.row_of_assignment)
  out_rows = grouped_swiglu(rows, layout, weights, cfg)
  output = combine_rows(
    out_rows, layout.row_of_assignment, layout.assignment_of_row, combine_weights
  )
  return DispatchOutput(output=output, kept=layout.kept)
