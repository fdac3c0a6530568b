"""Sending tokens to their chosen experts and combining the results.

Two interchangeable implementations (SPEC 3, config `model.dispatch`):

* capacity: each expert takes at most `capacity` (token, slot) assignments into
  an [experts, capacity, hidden] buffer; assignments over capacity are dropped
  from that expert only. Priority is slot-major: every token's first choice is
  placed before any token's second choice, then by token order. Memory stays
  O(tokens * K + experts * capacity * hidden): positions come from one stable
  sort of the expert ids, tokens move by gather, results come back by gather.
* dropless: nothing is dropped (what the authors' code computes). On GPU/TPU the
  experts run as grouped matmuls over expert-sorted rows (`jax.lax.ragged_dot`);
  on CPU, where `ragged_dot` lowers to a dense all-experts fallback, the same
  result comes from the capacity path with capacity = tokens (an expert is
  chosen at most once per token, so nothing can drop).
"""

from __future__ import annotations

import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from coe_jax.experts import SwiGLUWeights, swiglu_grouped, swiglu_per_expert


@flax.struct.dataclass
class DispatchOutput:
  """Result of one dispatch.

  Attributes:
    output: <float>[tokens, hidden] sum_k weight_k * expert_k(x) over kept assignments.
    kept: <bool>[tokens, K] whether each assignment was processed (all True if dropless).
  """

  output: Float[Array, "tokens hidden"]
  kept: Bool[Array, "tokens k"]


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> int:
  """ceil(capacity_factor * tokens * K / N), at least min_capacity, at most tokens."""
  capacity = math.ceil(capacity_factor * num_tokens * k / num_experts)
  return int(min(max(capacity, min_capacity), num_tokens))


def resolve_dropless_impl(impl: str) -> str:
  """'auto' picks ragged_dot on GPU/TPU and the gather path on CPU."""
  if impl != "auto":
    return impl
  return "gather" if jax.default_backend() == "cpu" else "ragged_dot"


def assignment_slots(expert_ids: Int[Array, "tokens k"], num_experts: int,
                     capacity: int) -> tuple[Int[Array, "tokens k"], Bool[Array, "tokens k"]]:
  """Buffer slot (expert * capacity + position) of every assignment, and whether it fits.

  Dropped assignments get the sentinel slot `num_experts * capacity`.
  """
  num_tokens, k = expert_ids.shape
  flat = expert_ids.T.reshape(-1)  # slot-major priority; Shape: [k * tokens]
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=num_experts)
  starts = jnp.cumsum(counts) - counts
  sorted_positions = jnp.arange(flat.shape[0], dtype=jnp.int32) - starts[flat[order]]
  positions = jnp.zeros_like(flat).at[order].set(sorted_positions.astype(flat.dtype))
  kept = positions < capacity
  slots = jnp.where(kept, flat * capacity + positions, num_experts * capacity)
  return slots.reshape(k, num_tokens).T, kept.reshape(k, num_tokens).T


def _combine(expert_rows: Float[Array, "rows hidden"], row_of_assignment: Int[Array, "tokens k"],
             combine_weights: Float[Array, "tokens k"]) -> Float[Array, "tokens hidden"]:
  """sum_k weight[t, k] * expert_rows[row[t, k]], rows past the end reading as zero.

  The weighted sum runs in float32 (the reference multiplies by float32 weights).
  """
  padded = jnp.concatenate([expert_rows, jnp.zeros_like(expert_rows[:1])], axis=0)
  per_assignment = padded[row_of_assignment]  # Shape: [tokens, k, hidden]
  combined = jnp.einsum("tkd,tk->td", per_assignment.astype(jnp.float32),
                        combine_weights.astype(jnp.float32))
  return combined.astype(expert_rows.dtype)


def capacity_dispatch(x: Float[Array, "tokens hidden"], expert_ids: Int[Array, "tokens k"],
                      combine_weights: Float[Array, "tokens k"],
                      expert_fn: Callable[[Array], Array], num_experts: int,
                      capacity: int) -> DispatchOutput:
  """Gather tokens into [experts, capacity, hidden], run `expert_fn`, gather back.

  Empty buffer rows are zero (never uninitialised memory).
  """
  num_tokens, hidden = x.shape
  k = expert_ids.shape[1]
  slots, kept = assignment_slots(expert_ids, num_experts, capacity)
  # Which token fills each buffer slot; empty slots point at an appended zero row.
  token_of_assignment = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], (num_tokens, k))
  token_of_slot = jnp.full((num_experts * capacity,), num_tokens, jnp.int32)
  token_of_slot = token_of_slot.at[slots.reshape(-1)].set(token_of_assignment.reshape(-1), mode="drop")
  x_padded = jnp.concatenate([x, jnp.zeros_like(x[:1])], axis=0)
  buffer = x_padded[token_of_slot].reshape(num_experts, capacity, hidden)
  expert_out = expert_fn(buffer).reshape(num_experts * capacity, hidden)
  return DispatchOutput(output=_combine(expert_out, slots, combine_weights), kept=kept)


def ragged_dispatch(x: Float[Array, "tokens hidden"], expert_ids: Int[Array, "tokens k"],
                    combine_weights: Float[Array, "tokens k"],
                    grouped_fn: Callable[[Array, Array], Array],
                    num_experts: int) -> DispatchOutput:
  """Sort assignments by expert, run `grouped_fn(rows, group_sizes)`, unsort, combine."""
  num_tokens, k = expert_ids.shape
  flat = expert_ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  rows = x[order // k]  # Shape: [tokens * k, hidden]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  sorted_out = grouped_fn(rows, group_sizes)
  row_of_assignment = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  return DispatchOutput(
      output=_combine(sorted_out, row_of_assignment.reshape(num_tokens, k), combine_weights),
      kept=jnp.ones(expert_ids.shape, bool))


def dispatch_to_experts(x: Float[Array, "tokens hidden"], expert_ids: Int[Array, "tokens k"],
                        combine_weights: Float[Array, "tokens k"], weights: SwiGLUWeights, *,
                        mode: str, capacity: int, dropless_impl: str = "auto") -> DispatchOutput:
  """Routed-expert output for every token under the chosen dispatch mode.

  Args:
    x: <float>[tokens, hidden] token representations (compute dtype).
    expert_ids / combine_weights: <int32|float32>[tokens, K] from the router.
    weights: stacked expert weights (compute dtype).
    mode: 'capacity' or 'dropless'.
    capacity: per-expert capacity for mode='capacity' (see `expert_capacity`).
    dropless_impl: 'auto' | 'gather' | 'ragged_dot' for mode='dropless'.
  """
  num_tokens = x.shape[0]
  num_experts = weights.gate.shape[0]
  if mode == "capacity":
    return capacity_dispatch(x, expert_ids, combine_weights,
                             lambda buf: swiglu_per_expert(weights, buf), num_experts, capacity)
  if mode != "dropless":
    raise ValueError(f"dispatch mode: got {mode!r}; allowed values: capacity, dropless")
  impl = resolve_dropless_impl(dropless_impl)
  if impl == "ragged_dot":
    return ragged_dispatch(x, expert_ids, combine_weights,
                           lambda rows, sizes: swiglu_grouped(weights, rows, sizes), num_experts)
  return capacity_dispatch(x, expert_ids, combine_weights,
                           lambda buf: swiglu_per_expert(weights, buf), num_experts, num_tokens)
