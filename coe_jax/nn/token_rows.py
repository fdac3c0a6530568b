"""Moving token rows to and from expert-ordered layouts, shared by every dispatch.

`expert_order` sorts assignments by expert; `gather_rows` moves rows by an
index and has a gather (not a scatter-add) as its transpose; `combine_rows`
weights each token's K expert outputs back into one row; `DispatchOutput` is
what a dispatch returns.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


@flax.struct.dataclass
class DispatchOutput:
  """Result of one dispatch.

  Attributes:
    output: <float>[tokens, hidden] sum_k weight_k * expert_k(x) over kept assignments.
    kept: <bool>[tokens, K] whether each assignment was processed (all True if
      dropless); assignments of masked-out (padding) tokens are never kept.
    weights: the expert weights this dispatch read, passed through unchanged, or None.
      A chain of passes that feeds each pass the previous pass's `weights`
      (`CoELayer`) lets 'blocked' add every pass's weight gradient into one
      accumulator in place, instead of one per pass summed afterwards.
  """

  output: Float[Array, "tokens hidden"]
  kept: Bool[Array, "tokens k"]
  weights: Any = None


def expert_order(flat_ids: Int[Array, "n"], num_experts: int) -> Int[Array, "n"]:
  """Stable argsort of expert ids in [0, num_experts]: ids grouped, ties in index order.

  Sorts one packed int32 key (id * n + index) instead of (id, index) pairs:
  XLA's CPU sort is a comparator loop, and comparing one key costs less than
  argsort's two-operand comparator (experiments/PERF.md 1). Falls back to argsort
  if the key would overflow.
  """
  n = flat_ids.shape[0]
  if (num_experts + 1) * n >= 2**31:
    return jnp.argsort(flat_ids, stable=True)
  index = jnp.arange(n, dtype=jnp.int32)
  return (
    jax.lax.sort(flat_ids.astype(jnp.int32) * n + index, is_stable=False) % n
  )  # keys are unique


@jax.custom_vjp
def gather_rows(
  source: Float[Array, "rows hidden"], index: Int[Array, "out"], inverse: Int[Array, "rows j"]
) -> Float[Array, "out hidden"]:
  """`source[index]`, with index == rows reading a zero row, and a gather as its transpose.

  `inverse[r]` lists every output position whose index is r (padded with
  `out`, the position of an appended zero cotangent), so the gradient is
  `sum_j d_out[inverse[r, j]]`: a gather instead of the scatter-add JAX would
  emit. XLA's CPU scatter is a serial loop, a gather is not (experiments/PERF.md 2);
  elsewhere the two cost about the same.
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


def combine_rows(
  expert_rows: Float[Array, "rows hidden"],
  row_of_assignment: Int[Array, "tokens k"],
  assignment_of_row: Int[Array, "rows"],
  combine_weights: Float[Array, "tokens k"],
) -> Float[Array, "tokens hidden"]:
  """sum_k weight[t, k] * expert_rows[row[t, k]], rows past the end reading as zero.

  `assignment_of_row[r]` is the flat assignment (t * k + slot) row r holds,
  or tokens * k if none. The weighted sum runs in float32 (the reference
  multiplies by float32 weights).
  """
  num_tokens, k = row_of_assignment.shape
  per_assignment = gather_rows(
    expert_rows, row_of_assignment.reshape(-1), assignment_of_row[:, None]
  )
  per_assignment = per_assignment.reshape(num_tokens, k, -1)
  combined = jnp.einsum(
    "tkd,tk->td", per_assignment.astype(jnp.float32), combine_weights.astype(jnp.float32)
  )
  return combined.astype(expert_rows.dtype)
