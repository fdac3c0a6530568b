"""The fused head + cross-entropy against the logits path: value and both gradients."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import tiny_model_config

from coe_jax.nn.model import CoECausalLM, init_decode_cache
from coe_jax.training import train_step
from coe_jax.training.cross_entropy import token_cross_entropy_sum
from coe_jax.training.head_loss import head_cross_entropy_sum, head_loss_chunks


def _problem(batch=3, seq=8, hidden=5, vocab=13, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(keys[0], (batch, seq, hidden))
  kernel = 0.5 * jax.random.normal(keys[1], (hidden, vocab))
  targets = jax.random.randint(keys[2], (batch, seq), 0, vocab)
  weights = (jax.random.uniform(keys[3], (batch, seq)) > 0.3).astype(jnp.float32)
  return h, kernel, targets, weights


def _logits_path(h, kernel, targets, weights):
  return token_cross_entropy_sum(h @ kernel, targets, weights)


@pytest.mark.parametrize("chunks", [1, 2, 4, 8])
def test_value_and_gradients_match_the_logits_path(chunks):
  h, kernel, targets, weights = _problem()
  fused = lambda h, k: head_cross_entropy_sum(h, k, targets, weights, chunks)
  value, (d_h, d_k) = jax.value_and_grad(fused, argnums=(0, 1))(h, kernel)
  want, (want_h, want_k) = jax.value_and_grad(
    lambda h, k: _logits_path(h, k, targets, weights), argnums=(0, 1)
  )(h, kernel)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(d_h, want_h, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_k, want_k, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(d_h)[np.asarray(weights) == 0] == 0)  # unweighted rows: no gradient
  # undifferentiated, the same value (the loss alone)
  np.testing.assert_allclose(jax.jit(fused)(h, kernel), want, rtol=1e-6)


def test_the_incoming_cotangent_scales_both_gradients():
  h, kernel, targets, weights = _problem(seed=1)
  scaled = lambda h, k: 0.25 * head_cross_entropy_sum(h, k, targets, weights, 2)
  d_h, d_k = jax.grad(scaled, argnums=(0, 1))(h, kernel)
  want_h, want_k = jax.grad(
    lambda h, k: 0.25 * _logits_path(h, k, targets, weights), argnums=(0, 1)
  )(h, kernel)
  np.testing.assert_allclose(d_h, want_h, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(d_k, want_k, rtol=1e-5, atol=1e-7)


def test_bfloat16_hidden_gets_a_bfloat16_gradient_and_float32_loss():
  h, kernel, targets, weights = _problem(seed=2)
  h = h.astype(jnp.bfloat16)
  fused = lambda h, k: 0.01 * head_cross_entropy_sum(h, k, targets, weights, 2, jnp.bfloat16)
  value, (d_h, d_k) = jax.value_and_grad(fused, argnums=(0, 1))(h, kernel)
  assert value.dtype == jnp.float32 and d_h.dtype == jnp.bfloat16 and d_k.dtype == jnp.float32
  h32, k16 = h.astype(jnp.float32), kernel.astype(jnp.bfloat16).astype(jnp.float32)
  want, (want_h, want_k) = jax.value_and_grad(
    lambda h, k: 0.01 * _logits_path(h, k, targets, weights), argnums=(0, 1)
  )(h32, k16)
  np.testing.assert_allclose(value, want, rtol=1e-2)
  for got, ref in ((d_h, want_h), (d_k, want_k)):  # bfloat16 matmuls: 2^-8 relative rounding
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=2e-2 * scale)


def test_chunks_must_divide_the_sequence():
  h, kernel, targets, weights = _problem(seq=6)
  with pytest.raises(ValueError, match="4 does not divide the sequence length 6"):
    head_cross_entropy_sum(h, kernel, targets, weights, 4)


@pytest.mark.parametrize(
  "batch, seq, hidden, vocab, platform, want",
  [
    (16, 256, 128, 5620, "cpu", 16),  # narrow: 16 chunks of 16 x 16 = 256 tokens
    (1, 512, 1024, 8192, "cpu", 1),  # paper width: one chunk
    (3, 7, 2, 10, "cpu", 7),  # no divisor of 7 gives <= 4 tokens: one position per chunk
    (16, 256, 128, 5620, "gpu", 1),  # 23 MB of logits
    (64, 512, 1024, 102400, "gpu", 16),  # the paper's 13.4 GB of logits: 16 chunks of 0.84 GB
    (300, 8, 128, 5620, "cpu", 8),  # more rows than the bound: one position a chunk
  ],
)
def test_head_loss_chunks(batch, seq, hidden, vocab, platform, want):
  assert head_loss_chunks(batch, seq, hidden, vocab, platform) == want


@pytest.mark.parametrize("chunks", [None, 4])  # None: the policy's (1 at this size)
def test_the_train_objective_matches_the_logits_path_on_a_padded_batch(
  chunks, monkeypatch, fast_compilation
):
  """The model's training terms, fused and through the logits: one value, one gradient."""
  if chunks:
    monkeypatch.setattr(train_step, "head_loss_chunks", lambda *_: chunks)
  cfg = tiny_model_config()
  model = CoECausalLM(cfg)
  b, s = 2, 16
  ids = jax.random.randint(jax.random.key(3), (b, s), 1, cfg.vocab_size)
  mask = jnp.asarray(np.arange(s)[None, :] < np.array([[s], [11]]), jnp.int32)  # row 1 padded
  batch = dict(
    input_ids=ids, attention_mask=mask, positions=jnp.broadcast_to(jnp.arange(s), (b, s))
  )
  batch["segment_ids"] = mask
  params = nn.meta.unbox(model.init(jax.random.key(4), ids, mask)["params"])

  def objective(terms, p):
    ce_sum, count, aux = terms(model, p, batch)
    return ce_sum / count + aux.aux_loss + aux.z_loss

  def value_and_grad(terms):  # jitted: op by op, the model's backward takes 10x longer
    return jax.jit(jax.value_and_grad(functools.partial(objective, terms)))(params)

  value, grads = value_and_grad(train_step.training_loss_terms)
  want, want_grads = value_and_grad(train_step.logits_loss_terms)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    scale = float(np.abs(np.asarray(g0)).max()) or 1.0
    np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-6 * scale)


def test_features_only_refuses_a_decode_cache():
  cfg = tiny_model_config()
  ids = jnp.ones((1, 4), jnp.int32)
  model = CoECausalLM(cfg, decode="prefill")
  cache = init_decode_cache(cfg, 1, 8)
  params = CoECausalLM(cfg).init(jax.random.key(0), ids)["params"]
  with pytest.raises(ValueError, match="features_only is for training"):
    model.apply({"params": params}, ids, jnp.ones_like(ids), cache=cache, features_only=True)


@pytest.mark.parametrize("devices, fused", [(1, True), (8, False)])
def test_a_mesh_of_several_devices_trains_through_the_logits(devices, fused, monkeypatch):
  calls = []
  monkeypatch.setattr(
    train_step.sharding, "active_mesh", lambda: types.SimpleNamespace(size=devices)
  )
  monkeypatch.setattr(train_step, "logits_loss_terms", lambda *a: calls.append("logits"))
  monkeypatch.setattr(train_step, "head_cross_entropy_sum", lambda *a: calls.append("fused"))
  cfg = tiny_model_config()
  ids = jnp.ones((1, 4), jnp.int32)
  params = nn.meta.unbox(CoECausalLM(cfg).init(jax.random.key(0), ids)["params"])
  batch = dict(input_ids=ids, attention_mask=ids, positions=jnp.arange(4)[None], segment_ids=ids)
  train_step.training_loss_terms(CoECausalLM(cfg), params, batch)
  assert calls == ["fused" if fused else "logits"]
