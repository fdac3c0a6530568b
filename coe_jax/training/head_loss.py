"""The output head and the summed token cross-entropy as one op, its gradient made in the forward pass.

The train step's loss is the last thing it computes, so the gradient of the
loss with respect to the logits, `(softmax(logits) - onehot(target)) * weight`,
is known as soon as the logits are: here the forward pass computes it chunk by
chunk of positions, and with it the gradients of the head's input and weight;
the backward pass only scales them by the incoming cotangent. Against the
logits path (`lm_head` then `cross_entropy.token_cross_entropy_sum`) this
skips a second exponential pass over [tokens, vocab] and never holds the full
logits or their gradient: the paper config's step on one H100 needs 4.6 GiB
less temporary memory (its 13.4 GB of float32 logits run in 16 chunks), and at
the headline's `narrow` scale the head and loss take 107 ms of op time in
place of 158 (the step's wall time moves within its spread; PERF.md 35).
Undifferentiated, it computes the loss alone.

The chunks split the sequence axis, so every chunk holds all of the batch rows
(a data-parallel sharding of the batch stays as it is). Each chunk adds its
weight gradient [hidden, vocab] into one accumulator, which costs more than it
saves once the chunks are few tokens against a wide hidden size:
`head_loss_chunks` picks how many. The train step uses this on one device
only (`train_step.training_loss_terms`, PERF.md 35).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from coe_jax.nn.tuning import target_platform

TOKENS_PER_HIDDEN = 2  # CPU: a chunk holds about this many tokens per hidden unit (PERF.md 35)
CHUNK_LOGITS_BYTES = 1 << 30  # GPU/TPU: most float32 logits one chunk holds (PERF.md 35)


def head_loss_chunks(batch: int, seq: int, hidden: int, vocab: int, platform: str = "") -> int:
  """How many position chunks `head_cross_entropy_sum` runs: the fewest that divide `seq`
  and keep each chunk's tokens (batch x seq / chunks) within the target's bound.

  CPU: `TOKENS_PER_HIDDEN * hidden` tokens (`narrow`, 16 x 256 tokens, hidden 128: 16 chunks
  of 16 positions; paper width, 512 tokens, hidden 1024: one). Elsewhere: float32 logits of
  at most `CHUNK_LOGITS_BYTES` (the paper's 64 x 512 tokens at vocab 102,400: 16 chunks).
  """
  if target_platform(platform) == "cpu":
    most_tokens = TOKENS_PER_HIDDEN * hidden
  else:
    most_tokens = CHUNK_LOGITS_BYTES // (4 * vocab)
  fits = (k for k in range(1, seq + 1) if seq % k == 0 and batch * (seq // k) <= most_tokens)
  return next(fits, seq)  # a batch too large for the bound: one position a chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_cross_entropy_sum(
  hidden: Float[Array, "batch seq d"],
  kernel: Float[Array, "d vocab"],
  targets: Int[Array, "batch seq"],
  weights: Float[Array, "batch seq"],
  chunks: int = 1,
  dtype: jnp.dtype = jnp.float32,
) -> Float[Array, ""]:
  """sum over positions of weights * cross-entropy(hidden @ kernel, targets), float32.

  `hidden` and `kernel` are multiplied in `dtype` (the model's compute dtype, as
  the head's Dense does) into float32 logits. `chunks` must divide seq.
  Differentiable in `hidden` and `kernel` only.
  """
  return _scan_chunks(hidden, kernel, targets, weights, chunks, dtype, with_grads=False)[0]


def _chunked(a: Array, chunks: int) -> Array:
  """[b, s, ...] -> [chunks, b, s / chunks, ...]."""
  b, s = a.shape[:2]
  return jnp.moveaxis(a.reshape(b, chunks, s // chunks, *a.shape[2:]), 1, 0)


def _chunk_loss_and_grads(h, kernel, targets, weights, dtype, with_grads: bool):
  """One chunk [b, c, d]: (loss sum, d_hidden [b * c, d], d_kernel [d, V]); no grads unless asked."""
  f32 = jnp.float32
  h = h.reshape(-1, h.shape[-1]).astype(dtype)
  targets, weights = targets.reshape(-1), weights.reshape(-1).astype(f32)
  w = kernel.astype(dtype)
  logits = jnp.dot(h, w, preferred_element_type=f32)
  top = jnp.max(logits, axis=-1, keepdims=True)
  exp = jnp.exp(logits - top)
  total = jnp.sum(exp, axis=-1, keepdims=True)
  lse = (top + jnp.log(total))[:, 0]
  target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  loss = jnp.sum(weights * (lse - target_logit))
  if not with_grads:
    return loss, None, None
  vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, 1)
  d_logits = ((exp / total - (vocab == targets[:, None])) * weights[:, None]).astype(dtype)
  d_h = jnp.dot(d_logits, w.T, preferred_element_type=f32)
  d_kernel = jnp.dot(h.T, d_logits, preferred_element_type=f32)  # no transposed [c, V] copy
  return loss, d_h, d_kernel


def _scan_chunks(hidden, kernel, targets, weights, chunks, dtype, with_grads: bool):
  """(loss, d_hidden, d_kernel) over every chunk; the grads are None without `with_grads`."""
  b, s, d = hidden.shape
  if s % chunks:
    raise ValueError(f"head loss chunks: {chunks} does not divide the sequence length {s}")
  if chunks == 1:
    loss, d_h, d_kernel = _chunk_loss_and_grads(hidden, kernel, targets, weights, dtype, with_grads)
    return loss, None if d_h is None else d_h.reshape(b, s, d), d_kernel

  def body(carry, chunk):
    loss, d_kernel = carry
    h, t, w = chunk
    part, d_h, d_k = _chunk_loss_and_grads(h, kernel, t, w, dtype, with_grads)
    if with_grads:
      d_kernel = d_kernel + d_k
      d_h = d_h.reshape(h.shape)
    return (loss + part, d_kernel), d_h

  init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32) if with_grads else None)
  xs = tuple(_chunked(a, chunks) for a in (hidden, targets, weights))
  (loss, d_kernel), d_h = jax.lax.scan(body, init, xs)
  if with_grads:
    d_h = jnp.moveaxis(d_h, 0, 1).reshape(b, s, d)
  return loss, d_h, d_kernel


def _fwd(hidden, kernel, targets, weights, chunks, dtype):
  loss, d_h, d_kernel = _scan_chunks(hidden, kernel, targets, weights, chunks, dtype, True)
  return loss, (d_h.astype(hidden.dtype), d_kernel.astype(kernel.dtype))


def _bwd(chunks, dtype, residuals, g):
  del chunks, dtype
  # scaled in float32: g (1 / target count in the train step) is not rounded to a bfloat16
  return tuple((d.astype(jnp.float32) * g).astype(d.dtype) for d in residuals) + (None, None)


head_cross_entropy_sum.defvjp(_fwd, _bwd)
