"""The fused token cross-entropy against optax's, value and gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coe_jax.training.cross_entropy import shift_left, token_cross_entropy_sum


def _optax_sum(logits, targets, weights):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * weights)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_value_and_gradient_match_optax(scale):
  keys = jax.random.split(jax.random.key(0), 3)
  logits = scale * jax.random.normal(keys[0], (3, 7, 11))
  targets = jax.random.randint(keys[1], (3, 7), 0, 11)
  weights = (jax.random.uniform(keys[2], (3, 7)) > 0.3).astype(jnp.float32)
  ours, d_ours = jax.value_and_grad(token_cross_entropy_sum)(logits, targets, weights)
  ref, d_ref = jax.value_and_grad(_optax_sum)(logits, targets, weights)
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  np.testing.assert_allclose(d_ours, d_ref, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(d_ours)[np.asarray(weights) == 0] == 0)  # unweighted rows: no gradient


def test_full_length_equals_the_sliced_loss():
  keys = jax.random.split(jax.random.key(1), 3)
  logits = jax.random.normal(keys[0], (2, 9, 5))
  targets = jax.random.randint(keys[1], (2, 8), 0, 5)
  weights = (jax.random.uniform(keys[2], (2, 8)) > 0.5).astype(jnp.float32)
  full_targets, full_weights = shift_left(targets, weights)
  assert full_targets.shape == full_weights.shape == (2, 9)
  assert np.all(np.asarray(full_weights[:, -1]) == 0)

  def sliced(x):
    return _optax_sum(x[:, :-1], targets, weights)

  ours, d_ours = jax.value_and_grad(token_cross_entropy_sum)(logits, full_targets, full_weights)
  ref, d_ref = jax.value_and_grad(sliced)(logits)
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  np.testing.assert_allclose(d_ours, d_ref, rtol=1e-5, atol=1e-7)


def test_bfloat16_logits_get_a_bfloat16_gradient_computed_in_float32():
  logits = jax.random.normal(jax.random.key(2), (2, 4, 6)).astype(jnp.bfloat16)
  targets = jnp.zeros((2, 4), jnp.int32)
  weights = jnp.ones((2, 4))
  value, grad = jax.value_and_grad(token_cross_entropy_sum)(logits, targets, weights)
  assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  ref = _optax_sum(logits.astype(jnp.float32), targets, weights)
  np.testing.assert_allclose(value, ref, rtol=1e-6)


@pytest.mark.parametrize("shape", [(6, 8), (2, 5, 8)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_dot_general_equals_lax_dot_general_in_value_and_gradient(shape, dtype):
  from coe_jax.nn.head_matmul import head_dot_general

  x = jax.random.normal(jax.random.key(3), shape).astype(dtype)
  w = jax.random.normal(jax.random.key(4), (8, 11)).astype(dtype)
  dims = (((len(shape) - 1,), (0,)), ((), ()))

  def loss(dot_general, x, w):
    return jnp.sum(jnp.sin(dot_general(x, w, dims).astype(jnp.float32)))

  ours = jax.value_and_grad(functools.partial(loss, head_dot_general), argnums=(0, 1))(x, w)
  ref = jax.value_and_grad(functools.partial(loss, jax.lax.dot_general), argnums=(0, 1))(x, w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
    )
