"""Small building blocks shared by the model: RMSNorm, initialisers, dtype helpers."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from coe_jax.nn.logical_axes import NORM, param_init


def compute_dtype(name: str) -> jnp.dtype:
  """'float32' | 'bfloat16' -> the dtype object."""
  return jnp.dtype({"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name])


def normal_init(std: float) -> nn.initializers.Initializer:
  """N(0, std): the reference init of every Linear but the router, and the embedding."""
  return nn.initializers.normal(stddev=std)


def torch_linear_default_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default Linear init, kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 (as DeepSeek-V2 does).

  Params: `scale` <float32>[d], logical axes (norm,).

  Attributes:
    eps: added to the mean square.
    dtype: output dtype.
  """

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    ones = param_init(nn.initializers.ones, (NORM,))
    scale = self.param("scale", ones, (x.shape[-1],), jnp.float32)
    return rms_norm(x, scale, self.eps).astype(self.dtype)


def rms_norm(
  x: Float[Array, "... d"], scale: Float[Array, "d"], eps: float
) -> Float[Array, "... d"]:
  """Functional RMSNorm in float32; returns float32."""
  x32 = x.astype(jnp.float32)
  variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  return scale * (x32 * jax.lax.rsqrt(variance + eps))
