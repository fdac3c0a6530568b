"""Dropless expert parallelism that moves exactly the routed rows (inside `jax.shard_map`).

Each device sorts its (token, slot) assignments by global expert, so the rows for
device p's experts are one contiguous block; a ragged all-to-all sends each block
to its device (the wire carries tokens x K rows, not the [E, tokens] buffer of the
capacity exchange), the receiver runs what arrived as a K=1 dropless dispatch over
its local experts (compute on the used rows only), and a second ragged all-to-all
with the offsets swapped brings the outputs home, where they are combined as in
every other path. Static shapes: the receive buffer holds the worst case, n x
tokens x min(K, E/n) rows (every device's assignments to one device's experts).

`jax.lax.ragged_all_to_all` runs on GPUs (and compiles deviceless); XLA:CPU in
0.10.2 lacks it, so elsewhere `exchange_rows` sends the same blocks padded to
their bound by `all_to_all` and unpacks them into the same layout (the CPU tests
compare that with one device).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from coe_jax.nn.manual_axes import varying_like
from coe_jax.nn.token_rows import DispatchOutput, combine_rows, expert_order, gather_rows


def _exclusive_cumsum(a: Array, axis: int = -1) -> Array:
  return jnp.cumsum(a, axis=axis) - a


def _peer_of_row(recv_sizes: Int[Array, "n"], num_rows: int) -> tuple[Array, Array, Array]:
  """For rows laid out peer after peer (`recv_sizes` each): (peer, index within, real)."""
  row = jnp.arange(num_rows, dtype=jnp.int32)
  peers = recv_sizes.shape[0]
  peer = jnp.searchsorted(jnp.cumsum(recv_sizes), row, side="right", method="compare_all")
  peer = peer.astype(jnp.int32)
  safe = jnp.minimum(peer, peers - 1)
  return safe, row - _exclusive_cumsum(recv_sizes)[safe], peer < peers


def exchange_rows(
  operand: Float[Array, "rows hidden"],
  num_out: int,
  send_offsets: Int[Array, "n"],
  send_sizes: Int[Array, "n"],
  remote_offsets: Int[Array, "n"],
  recv_sizes: Int[Array, "n"],
  axis: str,
  block: int,
  ragged: bool,
) -> Float[Array, "out hidden"]:
  """Rows send_offsets[p] .. + send_sizes[p] of `operand` to peer p, landing there at
  remote_offsets[p]; returns [num_out, hidden] holding each peer's rows one after another
  (recv_sizes), zeros past them. `block` bounds any send_sizes (the padded stand-in's block)."""
  if ragged:
    out = varying_like(jnp.zeros((num_out, operand.shape[1]), operand.dtype), operand)
    return jax.lax.ragged_all_to_all(
      operand, out, send_offsets, send_sizes, remote_offsets, recv_sizes, axis_name=axis
    )
  j = jnp.arange(block, dtype=jnp.int32)
  index = jnp.minimum(send_offsets[:, None] + j, operand.shape[0] - 1)  # [n, block]
  blocks = jnp.where((j < send_sizes[:, None])[..., None], operand[index], 0)
  got = jax.lax.all_to_all(blocks, axis, 0, 0, tiled=True)  # [source, block, hidden]
  peer, within, real = _peer_of_row(recv_sizes, num_out)
  return jnp.where(real[:, None], got[peer, jnp.minimum(within, block - 1)], 0)


def exchange_dispatch(
  x: Float[Array, "tokens hidden"],
  expert_ids: Int[Array, "tokens k"],
  combine_weights: Float[Array, "tokens k"],
  weights,
  axis: str,
  local_dispatch: Callable[..., DispatchOutput],
  ragged: bool,
  token_mask: Optional[Bool[Array, "tokens"]] = None,
) -> DispatchOutput:
  """Dropless routed output with the experts split over `axis` (this device: E/n of them).

  `local_dispatch(rows, ids <[rows, 1]>, weights <[rows, 1]>, token_mask <[rows]>)` runs the
  received rows through the local experts (a K=1 dropless dispatch).
  """
  num_tokens, k = expert_ids.shape
  peers = jax.lax.axis_size(axis)
  local = jax.tree.leaves(weights)[0].shape[0]
  num_experts = peers * local
  if token_mask is not None:
    expert_ids = jnp.where(token_mask[:, None], expert_ids, num_experts)
  flat = expert_ids.reshape(-1).astype(jnp.int32)
  n = flat.shape[0]
  order = expert_order(flat, num_experts)  # sorted position -> assignment
  real = flat[order] < num_experts
  assignment_of_row = jnp.where(real, order, n)
  row_of_assignment = (
    jnp.zeros((n,), jnp.int32).at[order].set(jnp.where(real, jnp.arange(n, dtype=jnp.int32), n))
  )
  row_of_assignment = row_of_assignment.reshape(num_tokens, k)
  token_of_row = jnp.where(real, order // k, num_tokens)
  rows = gather_rows(x, token_of_row, row_of_assignment)  # [n, hidden], this device's sorted rows
  counts = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  counts = counts.reshape(peers, local)  # rows for each peer's local experts
  recv_counts = jax.lax.all_to_all(counts, axis, 0, 0, tiled=True)  # [source, local]
  send_sizes, recv_sizes = counts.sum(1), recv_counts.sum(1)
  send_offsets, recv_offsets = _exclusive_cumsum(send_sizes), _exclusive_cumsum(recv_sizes)
  remote_recv = jax.lax.all_to_all(recv_offsets, axis, 0, 0, tiled=True)  # where mine land
  remote_send = jax.lax.all_to_all(send_offsets, axis, 0, 0, tiled=True)  # where theirs go home
  block = num_tokens * min(k, local)
  got = exchange_rows(
    rows, peers * block, send_offsets, send_sizes, remote_recv, recv_sizes, axis, block, ragged
  )
  peer, within, valid = _peer_of_row(recv_sizes, peers * block)
  expert = jnp.sum(jnp.cumsum(recv_counts, axis=1)[peer] <= within[:, None], axis=1)
  expert = jnp.minimum(expert, local - 1).astype(jnp.int32)
  ones = jnp.ones((peers * block, 1), jnp.float32)
  out = local_dispatch(got, expert[:, None], ones, valid).output
  back = exchange_rows(
    out, n, recv_offsets, recv_sizes, remote_send, send_sizes, axis, block, ragged
  )
  output = combine_rows(back, row_of_assignment, assignment_of_row, combine_weights)
  return DispatchOutput(output=output, kept=(flat < num_experts).reshape(num_tokens, k))
