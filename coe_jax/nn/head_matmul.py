"""The output head's matmul with a weight gradient that reads the logits' gradient as it lies.

For `logits = x @ kernel` (x [..., d], kernel [d, V]) JAX's transpose rule asks
for `x^T @ d_logits`, contracting the token axis of both; XLA:CPU then copies
the [tokens, V] gradient into a transposed layout before its matmul: at the
headline's `narrow` scale (4,096 tokens, vocab 5,620) that copy costs more
than the matmul itself (PERF.md 30). Here the small operand is transposed
instead: `transpose(x) [d, tokens] @ d_logits [tokens, V]`, an ordinary
row-major matmul. Use as `nn.Dense(..., dot_general=head_dot_general)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def head_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`jax.lax.dot_general` for `lhs [..., d] . rhs [d, V]` (Dense's contraction), with the
  weight gradient above; any other contraction is passed to `jax.lax.dot_general` as is."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  dense = (
    tuple(lhs_contract) == (lhs.ndim - 1,)
    and tuple(rhs_contract) == (0,)
    and rhs.ndim == 2
    and not lhs_batch
    and not rhs_batch
  )
  if not dense:
    return jax.lax.dot_general(
      lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type
    )
  return _dense_matmul(lhs, rhs, precision, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_matmul(x, kernel, precision, preferred_element_type):
  return _matmul(x, kernel, precision, preferred_element_type)


def _matmul(x, kernel, precision, preferred_element_type):
  return jax.lax.dot_general(
    x,
    kernel,
    (((x.ndim - 1,), (0,)), ((), ())),
    precision,
    preferred_element_type=preferred_element_type,
  )


def _fwd(x, kernel, precision, preferred_element_type):
  return _matmul(x, kernel, precision, preferred_element_type), (x, kernel)


def _bwd(precision, preferred_element_type, residuals, d_out):
  del preferred_element_type
  x, kernel = residuals
  d_x = jax.lax.dot_general(d_out, kernel, (((d_out.ndim - 1,), (1,)), ((), ())), precision)
  rows = x.reshape(-1, x.shape[-1])
  # materialised [d, tokens]: XLA would otherwise fold the transpose back into the dot
  rows_t = jax.lax.optimization_barrier(rows.T)
  d_kernel = jnp.matmul(
    rows_t,
    d_out.reshape(-1, d_out.shape[-1]),
    precision=precision,
    preferred_element_type=jnp.float32,
  )
  return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


_dense_matmul.defvjp(_fwd, _bwd)
