"""Array types over the manual mesh axes of `jax.shard_map`, for loops and custom VJPs.

Inside `shard_map` every array's type says which manual axes it varies over.
A loop's zero-initialised carry must have its body's output type, and a custom
VJP must return cotangents of its primals' types; these helpers make them so,
and are the identity outside `shard_map`.
"""

from __future__ import annotations

import jax
from jaxtyping import Array


def varying_axes(a: Array) -> set[str]:
  """The manual mesh axes `a` varies over inside `jax.shard_map` (empty elsewhere)."""
  return set(getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", None) or ())


def varying_like(x: Array, reference: Array) -> Array:
  """`x` typed as varying over the manual axes `reference` varies over (so that a loop's
  zero-initialised carry has its body's output type under shard_map); `x` elsewhere."""
  axes = tuple(sorted(varying_axes(reference) - varying_axes(x)))
  return jax.lax.pcast(x, axes, to="varying") if axes else x


def sum_to_type_of(grad: Array, primal: Array) -> Array:
  """`grad` summed over the manual axes its primal is replicated over, as JAX's own
  transposes do (a custom VJP under shard_map must return the primal's type)."""
  axes = tuple(sorted(varying_axes(grad) - varying_axes(primal)))
  return jax.lax.psum(grad, axes) if axes else grad
