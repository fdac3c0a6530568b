"""The router (gate) of one Chain-of-Experts iteration.

A router scores every routed expert for every token in float32, keeps the
greedy top-K and returns the combine weights plus the losses of DESIGN.md 3.
The pure function `route` is what the CoE layer scans over; the layer owns the
router weights (`[C or 1, N_routed, hidden]`, PyTorch's default Linear init).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@flax.struct.dataclass
class RouterOutput:
  """Routing instructions for one iteration.

  Attributes:
    expert_ids: <int32>[batch, seq, K] chosen routed experts, best first.
    combine_weights: <float32>[batch, seq, K] weight of each chosen expert.
    probs: <float32>[batch, seq, N_routed] softmax over routed experts.
    aux_loss: <float32>[] sequence-level load-balancing loss (alpha included).
    z_loss: <float32>[] router z-loss (coefficient included; 0 when off).
  """

  expert_ids: Int[Array, "batch seq k"]
  combine_weights: Float[Array, "batch seq k"]
  probs: Float[Array, "batch seq experts"]
  aux_loss: Float[Array, ""]
  z_loss: Float[Array, ""]


def router_logits(
  x: Float[Array, "batch seq hidden"], weight: Float[Array, "experts hidden"]
) -> Float[Array, "batch seq experts"]:
  """Float32 logits whatever the compute dtype (the reference casts both operands)."""
  return jnp.einsum(
    "bsd,ed->bse",
    x.astype(jnp.float32),
    weight.astype(jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )


def sequence_load_balancing_loss(
  probs: Float[Array, "batch seq experts"], expert_ids: Int[Array, "batch seq k"], alpha: float
) -> Float[Array, ""]:
  """DeepSeek-V2's sequence-level auxiliary loss (DESIGN.md 3).

  For each sequence b: ce[b, e] = #(token, slot) pairs choosing e / (S * K / N);
  loss = alpha * mean_b sum_e ce[b, e] * mean_s probs[b, s, e]. The counts carry
  no gradient; every position counts, padding included, as in the reference.
  """
  _, seq, k = expert_ids.shape
  num_experts = probs.shape[-1]
  counts = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32).sum(axis=(1, 2))
  ce = jax.lax.stop_gradient(counts / (seq * k / num_experts))
  return alpha * jnp.mean(jnp.sum(ce * probs.mean(axis=1), axis=-1))


def router_z_loss(logits: Float[Array, "batch seq experts"], coef: float) -> Float[Array, ""]:
  """ST-MoE z-loss (Zoph et al. 2022, eq. 5): coef * mean(logsumexp(logits)^2)."""
  if coef == 0:
    return jnp.zeros((), jnp.float32)
  return coef * jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def combine_weights(
  top_probs: Float[Array, "batch seq k"], norm_topk_prob: bool, routed_scaling_factor: float
) -> Float[Array, "batch seq k"]:
  """The chosen experts' probabilities as combine weights, as the reference's `MoEGate`:
  with K > 1 and `norm_topk_prob`, divided by their sum (+1e-20) and not scaled; otherwise
  multiplied by `routed_scaling_factor` (the two options are exclusive)."""
  if norm_topk_prob and top_probs.shape[-1] > 1:
    return top_probs / (jnp.sum(top_probs, axis=-1, keepdims=True) + 1e-20)
  return top_probs * routed_scaling_factor


def route(
  x: Float[Array, "batch seq hidden"],
  weight: Float[Array, "experts hidden"],
  *,
  k: int,
  norm_topk_prob: bool = False,
  routed_scaling_factor: float = 1.0,
  aux_loss_alpha: float = 0.001,
  z_loss_coef: float = 0.0,
) -> RouterOutput:
  """Scores, greedy top-K and losses for one iteration; see `RouterOutput`."""
  logits = router_logits(x, weight)
  probs = jax.nn.softmax(logits, axis=-1)
  top_probs, expert_ids = jax.lax.top_k(probs, k)
  return RouterOutput(
    expert_ids=expert_ids.astype(jnp.int32),
    combine_weights=combine_weights(top_probs, norm_topk_prob, routed_scaling_factor),
    probs=probs,
    aux_loss=sequence_load_balancing_loss(probs, expert_ids, aux_loss_alpha),
    z_loss=router_z_loss(logits, z_loss_coef),
  )
