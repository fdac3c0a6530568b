"""SwiGLU experts: N routed experts as stacked weights, and the shared expert(s).

Every expert computes `down(silu(gate(x)) * up(x))` without biases (DESIGN.md 4).
The modules only create and return weights, so that the CoE layer can use them
inside `jax.lax.scan`; the maths lives in the pure functions below.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from coe_jax.nn.layers import normal_init
from coe_jax.nn.logical_axes import BATCH, EMBED, EXPERT, LENGTH, MLP, constrain, param_init


@flax.struct.dataclass
class SwiGLUWeights:
  """Weights of one SwiGLU MLP ([d, f], [d, f], [f, d]) or of a stack of them.

  For N stacked experts the shapes gain a leading expert axis:
  gate/up <float>[experts, hidden, intermediate], down <float>[experts, intermediate, hidden].
  """

  gate: Array
  up: Array
  down: Array

  def astype(self, dtype) -> "SwiGLUWeights":
    return jax.tree.map(lambda w: w.astype(dtype), self)


def swiglu(weights: SwiGLUWeights, x: Float[Array, "... hidden"]) -> Float[Array, "... hidden"]:
  """One SwiGLU MLP applied to the last axis.

  On the residual stream [batch, length, hidden] (the shared expert) its hidden
  activation carries the logical axes (batch, length, mlp).
  """
  hidden = jax.nn.silu(x @ weights.gate) * (x @ weights.up)
  if hidden.ndim == 3:
    hidden = constrain(hidden, (BATCH, LENGTH, MLP))
  return hidden @ weights.down


def swiglu_per_expert(
  weights: SwiGLUWeights, x: Float[Array, "experts capacity hidden"]
) -> Float[Array, "experts capacity hidden"]:
  """Each expert's MLP on its own buffer rows, as batched matmuls (no loop over experts).

  The hidden activation carries the logical axes (expert, None, mlp).
  """
  gate = jnp.einsum("ecd,edf->ecf", x, weights.gate)
  up = jnp.einsum("ecd,edf->ecf", x, weights.up)
  hidden = constrain(jax.nn.silu(gate) * up, (EXPERT, None, MLP))
  return jnp.einsum("ecf,efd->ecd", hidden, weights.down)


def swiglu_grouped(
  weights: SwiGLUWeights, x: Float[Array, "assignments hidden"], group_sizes: Int[Array, "experts"]
) -> Float[Array, "assignments hidden"]:
  """Experts on rows sorted by expert, as grouped matmuls (`jax.lax.ragged_dot`).

  Rows [sum(group_sizes[:e]), sum(group_sizes[:e+1])) belong to expert e.
  """
  gate = jax.lax.ragged_dot(x, weights.gate, group_sizes)
  up = jax.lax.ragged_dot(x, weights.up, group_sizes)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, weights.down, group_sizes)


class RoutedExperts(nn.Module):
  """Creates the stacked weights of `num_experts` SwiGLU experts.

  Params: gate_proj, up_proj <float32>[experts, hidden, intermediate];
  down_proj <float32>[experts, intermediate, hidden]; logical axes (expert,
  embed, mlp) and (expert, mlp, embed). Returns `SwiGLUWeights`.
  """

  num_experts: int
  hidden_size: int
  intermediate_size: int
  init_std: float = 0.02

  @nn.compact
  def __call__(self) -> SwiGLUWeights:
    e, d, f = self.num_experts, self.hidden_size, self.intermediate_size
    into = param_init(normal_init(self.init_std), (EXPERT, EMBED, MLP))
    out = param_init(normal_init(self.init_std), (EXPERT, MLP, EMBED))
    return SwiGLUWeights(
      gate=self.param("gate_proj", into, (e, d, f), jnp.float32),
      up=self.param("up_proj", into, (e, d, f), jnp.float32),
      down=self.param("down_proj", out, (e, f, d), jnp.float32),
    )


class SharedExperts(nn.Module):
  """Creates the shared expert's weights: one SwiGLU MLP of width f * n_shared.

  Params: gate_proj, up_proj <float32>[hidden, intermediate]; down_proj
  <float32>[intermediate, hidden]; logical axes (embed, mlp) and (mlp, embed).
  Returns `SwiGLUWeights`.
  """

  hidden_size: int
  intermediate_size: int
  init_std: float = 0.02

  @nn.compact
  def __call__(self) -> SwiGLUWeights:
    d, f = self.hidden_size, self.intermediate_size
    into = param_init(normal_init(self.init_std), (EMBED, MLP))
    out = param_init(normal_init(self.init_std), (MLP, EMBED))
    return SwiGLUWeights(
      gate=self.param("gate_proj", into, (d, f), jnp.float32),
      up=self.param("up_proj", into, (d, f), jnp.float32),
      down=self.param("down_proj", out, (f, d), jnp.float32),
    )
