"""Dropless dispatch on a grouped matmul kernel (`dropless_impl='grouped'`, the GPU default).

MegaBlocks' / tokamax's design written with Pallas (Triton backend): assignments
sorted by expert, each expert's rows padded to whole tiles of `tile` rows
(`grouped_layout`), and one kernel launch per projection computes every tile
against its own expert's weights, read in place (`gmm`: no per-tile weight
copies, no dense [experts, rows, ...] expansion). Its custom VJP is the same
kernel on the transposed weights (input gradient) and a transposed grouped
matmul that sums each expert's tiles into its weight gradient (`tgmm`).

Static shapes, no XLA while loops: the grid has a fixed number of row tiles,
`(tokens * K + N * (tile - 1)) // tile`, so the work is tokens x K plus at most
one tile per expert; tiles past the used ones write zeros without a matmul.
The only data-dependent trip count is `tgmm`'s loop over one expert's tiles,
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
from coe_jax.nn.blocked import _varying_like
from coe_jax.nn.experts import SwiGLUWeights
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


def _gmm_call(x, w, tile_expert, cfg: KernelConfig, transpose: bool):
  """out[r] = x[r] @ w[e(r)] (w[e(r)].T if transpose), tile by tile; [rows, K] -> [rows, N]."""
  rows, depth = x.shape
  width = w.shape[1] if transpose else w.shape[2]
  bn, bk = tuning.block_for(width, cfg.block_n), tuning.block_for(depth, cfg.block_k)
  tile = cfg.tile

  def kernel(expert_ref, x_ref, w_ref, o_ref):
    e, j = expert_ref[pl.program_id(0)], pl.program_id(1)

    def step(kk, acc):
      a = x_ref[:, pl.ds(kk * bk, bk)]
      if transpose:
        return acc + _dot(a, w_ref[e, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)], trans_b=True)
      return acc + _dot(a, w_ref[e, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)])

    @pl.when(e >= 0)
    def _():
      acc = jax.lax.fori_loop(0, depth // bk, step, jnp.zeros((tile, bn), jnp.float32))
      o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(e < 0)
    def _():
      o_ref[...] = jnp.zeros((tile, bn), o_ref.dtype)

  return cfg.call(
    kernel,
    grid=(rows // tile, width // bn),
    in_specs=[
      pl.no_block_spec,
      pl.BlockSpec((tile, depth), lambda i, j: (i, 0)),
      pl.no_block_spec,
    ],
    out_specs=pl.BlockSpec((tile, bn), lambda i, j: (i, j)),
    out_shape=_like(x, (rows, width), x.dtype),
  )(tile_expert, x, w)


def _tgmm_call(x, dy, first_tile, num_tiles, cfg: KernelConfig, dtype):
  """dw[e] = sum over expert e's tiles of x_tile.T @ dy_tile: [rows, K], [rows, N] -> [E, K, N]."""
  depth, width = x.shape[1], dy.shape[1]
  bk, bn = tuning.block_for(depth, cfg.block_k), tuning.block_for(width, cfg.block_n)
  tile = cfg.tile

  def kernel(first_ref, count_ref, x_ref, dy_ref, o_ref):
    e, kk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first = first_ref[e]

    def step(t, acc):
      rows = pl.ds((first + t) * tile, tile)
      a = x_ref[rows, pl.ds(kk * bk, bk)]
      return acc + _dot(a, dy_ref[rows, pl.ds(j * bn, bn)], trans_a=True)

    acc = jax.lax.fori_loop(0, count_ref[e], step, jnp.zeros((bk, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  num_experts = first_tile.shape[0]
  return cfg.call(
    kernel,
    grid=(num_experts, depth // bk, width // bn),
    in_specs=[pl.no_block_spec] * 4,
    out_specs=pl.BlockSpec((pl.squeezed, bk, bn), lambda e, kk, j: (e, kk, j)),
    out_shape=_like(x, (num_experts, depth, width), dtype),
  )(first_tile, num_tiles, x, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gmm(
  x: Float[Array, "rows depth"],
  w: Float[Array, "experts depth width"],
  tile_expert: Int[Array, "tiles"],
  first_tile: Int[Array, "experts"],
  num_tiles: Int[Array, "experts"],
  cfg: KernelConfig,
) -> Float[Array, "rows width"]:
  """Grouped matmul: rows of tile i times the weights of expert tile_expert[i] (zeros if -1).

  rows = tiles * cfg.tile; expert e's tiles are first_tile[e] .. + num_tiles[e] (used by
  the weight gradient). Gradients: x by `gmm` on w transposed, w by `tgmm`.
  """
  return _gmm_call(x, w, tile_expert, cfg, transpose=False)


def _gmm_fwd(x, w, tile_expert, first_tile, num_tiles, cfg):
  residuals = (x, w, tile_expert, first_tile, num_tiles)
  return gmm(x, w, tile_expert, first_tile, num_tiles, cfg), residuals


def _gmm_bwd(cfg, residuals, dy):
  x, w, tile_expert, first_tile, num_tiles = residuals
  dy = dy.astype(x.dtype)
  dx = _gmm_call(dy, w, tile_expert, cfg, transpose=True)
  dw = _tgmm_call(x, dy, first_tile, num_tiles, cfg, w.dtype)
  return dx, dw, None, None, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_swiglu(
  rows: Float[Array, "rows hidden"], layout: GroupLayout, weights: SwiGLUWeights, cfg: KernelConfig
) -> Float[Array, "rows hidden"]:
  """Every used tile's rows through its expert's SwiGLU (three grouped matmuls)."""
  groups = (layout.tile_expert, layout.first_tile, layout.num_tiles)
  # Under shard_map the kernels see weights typed like the rows; the cast's transpose sums the
  # weight gradients over the axes the weights are replicated on.
  weights = jax.tree.map(lambda w: _varying_like(w, rows), weights)
  g = gmm(rows, weights.gate, *groups, cfg)
  u = gmm(rows, weights.up, *groups, cfg)
  h = jax.nn.silu(g) * u
  return gmm(h, weights.down, *groups, cfg)


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
