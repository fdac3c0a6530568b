"""Summed token cross-entropy over full-length logits, with a one-pass backward.

The train step scores every position against the next token of its segment.
Writing that as `logits[:, :-1]` against `ids[:, 1:]` slices a [batch, seq - 1,
vocab] copy out of the logits and pads the gradient back to full length; at the
headline's `narrow` scale (16 x 256 tokens, vocab 5,620) those two copies and
the transposed copy the head's weight gradient then takes cost about as much as
the loss itself (PERF.md 30). Here the targets are shifted instead (the last
position gets weight 0), and the backward is one fused elementwise pass,
`(softmax(logits) - onehot(target)) * weight`, from the logits and the saved
log-sum-exp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@jax.custom_vjp
def token_cross_entropy_sum(
  logits: Float[Array, "batch seq vocab"],
  targets: Int[Array, "batch seq"],
  weights: Float[Array, "batch seq"],
) -> Float[Array, ""]:
  """sum over positions of weights * (logsumexp(logits) - logits[target]), in float32.

  Differentiable in `logits` only (targets and weights get no gradient).
  """
  return _forward(logits, targets, weights)[0]


def _log_sum_exp(logits: Array) -> Array:
  x = logits.astype(jnp.float32)
  top = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  return (top + jnp.log(jnp.sum(jnp.exp(x - top), axis=-1, keepdims=True)))[..., 0]


def _forward(logits, targets, weights):
  lse = _log_sum_exp(logits)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  total = jnp.sum(weights.astype(jnp.float32) * (lse - target_logit.astype(jnp.float32)))
  return total, lse


def _fwd(logits, targets, weights):
  total, lse = _forward(logits, targets, weights)
  return total, (logits, lse, targets, weights)


def _bwd(residuals, g):
  logits, lse, targets, weights = residuals
  scale = (g * weights.astype(jnp.float32))[..., None]
  vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
  probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  d_logits = (probs - (vocab == targets[..., None]).astype(jnp.float32)) * scale
  return d_logits.astype(logits.dtype), None, None


token_cross_entropy_sum.defvjp(_fwd, _bwd)


def shift_left(
  targets: Int[Array, "batch seq_minus_1"], weights: Float[Array, "batch seq_minus_1"]
):
  """Next-token targets and weights [b, s - 1] as full-length [b, s] (last position: weight 0)."""
  pad = ((0, 0), (0, 1))
  return jnp.pad(targets, pad), jnp.pad(weights, pad)
