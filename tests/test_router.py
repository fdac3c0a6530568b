"""Tests for coe_jax.nn.router against independent float64 numpy (DESIGN.md 3)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from coe_jax.nn.layers import torch_linear_default_init
from coe_jax.nn.router import route, router_z_loss, sequence_load_balancing_loss

B, S, D, N, K = 2, 7, 16, 8, 3


def _inputs(seed=0, w_scale=0.6):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, S, D)).astype(np.float32)
  w = (w_scale * rng.normal(size=(N, D))).astype(np.float32)
  return x, w


@pytest.mark.parametrize("k", [K, 1])
@pytest.mark.parametrize(
  "norm_topk_prob,scaling", [(False, 1.0), (True, 1.0), (False, 2.5), (True, 0.5)]
)
def test_route_top_k_matches_numpy(norm_topk_prob, scaling, k):
  x, w = _inputs()
  out = route(
    jnp.asarray(x),
    jnp.asarray(w),
    k=k,
    norm_topk_prob=norm_topk_prob,
    routed_scaling_factor=scaling,
  )
  ids, weights, probs = ref.route(x, w, k, norm_topk_prob, scaling)
  assert out.expert_ids.shape == (B, S, k) and out.expert_ids.dtype == jnp.int32
  assert out.combine_weights.dtype == jnp.float32 and out.probs.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out.expert_ids), ids)
  np.testing.assert_allclose(np.asarray(out.combine_weights), weights, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(out.probs), probs, rtol=1e-5, atol=1e-7)


def test_norm_topk_prob_and_scaling_are_exclusive_as_in_the_reference():
  # MoEGate: K > 1 and norm_topk_prob -> w / (sum w + 1e-20), no scaling; otherwise w * scale.
  logits = np.log(np.array([[[0.5, 0.3, 0.2]]], np.float32))  # softmax = [0.5, 0.3, 0.2]
  x, weight = jnp.asarray(logits), jnp.eye(3, dtype=jnp.float32)
  weights = lambda k, norm, scale: np.asarray(
    route(x, weight, k=k, norm_topk_prob=norm, routed_scaling_factor=scale).combine_weights
  )[0, 0]
  np.testing.assert_allclose(weights(2, True, 3.0), [0.625, 0.375], rtol=1e-6)  # not x3
  np.testing.assert_allclose(weights(2, False, 3.0), [1.5, 0.9], rtol=1e-6)
  np.testing.assert_allclose(weights(1, True, 3.0), [1.5], rtol=1e-6)  # K=1: scaled, not 1.0
  np.testing.assert_allclose(weights(1, False, 1.0), [0.5], rtol=1e-6)


def test_route_logits_are_float32_for_bfloat16_inputs():
  x, w = _inputs(1)
  xb = jnp.asarray(x, jnp.bfloat16)
  out = route(xb, jnp.asarray(w), k=K)
  assert out.probs.dtype == jnp.float32 and out.combine_weights.dtype == jnp.float32
  # numpy on the bf16-rounded input, float64 logits: agrees only if logits were not bf16.
  _, weights, probs = ref.route(np.asarray(xb.astype(jnp.float32)), w, K)
  np.testing.assert_allclose(np.asarray(out.probs), probs, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(out.combine_weights), weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.001, 0.37])
def test_sequence_load_balancing_loss_matches_numpy(alpha):
  x, w = _inputs(2)
  out = route(jnp.asarray(x), jnp.asarray(w), k=K, aux_loss_alpha=alpha)
  ids, _, probs = ref.route(x, w, K)
  want = ref.seq_aux_loss(probs, ids, alpha)
  assert want > 0
  np.testing.assert_allclose(float(out.aux_loss), want, rtol=1e-5)
  # The standalone function on arbitrary (non-softmax) probabilities and hand-built ids.
  rng = np.random.default_rng(5)
  p = rng.uniform(size=(3, 4, N)).astype(np.float32)
  ids2 = np.stack([[rng.permutation(N)[:K] for _ in range(4)] for _ in range(3)]).astype(np.int32)
  got = sequence_load_balancing_loss(jnp.asarray(p), jnp.asarray(ids2), alpha)
  np.testing.assert_allclose(float(got), ref.seq_aux_loss(ref.f64(p), ids2, alpha), rtol=1e-6)


def test_perfectly_balanced_uniform_router_gives_alpha():
  # Uniform probabilities and perfectly balanced counts: ce = 1, sum_e ce * 1/N = 1.
  probs = jnp.full((2, 4, 4), 0.25)
  ids = jnp.asarray(np.array([[[0, 1], [2, 3], [0, 1], [2, 3]]] * 2, np.int32))
  np.testing.assert_allclose(
    float(sequence_load_balancing_loss(probs, ids, 0.001)), 0.001, rtol=1e-6
  )


def test_load_balancing_loss_gradient_flows_through_probs_not_counts():
  alpha = 0.01
  rng = np.random.default_rng(3)
  p = rng.uniform(size=(B, S, N)).astype(np.float32)
  ids = np.stack([[rng.permutation(N)[:K] for _ in range(S)] for _ in range(B)]).astype(np.int32)
  counts = np.zeros((B, N))
  for b in range(B):
    np.add.at(counts[b], ids[b].reshape(-1), 1)
  ce = counts / (S * K / N)
  # d loss / d probs[b, s, e] = alpha * ce[b, e] / (B * S): linear in probs, counts constant.
  grad = jax.grad(sequence_load_balancing_loss)(jnp.asarray(p), jnp.asarray(ids), alpha)
  want = np.broadcast_to((alpha * ce / (B * S))[:, None, :], (B, S, N))
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-12)

  # Through the router: gradient wrt the router weight equals the numpy chain rule with
  # the counts held fixed (softmax Jacobian only).
  x, w = _inputs(4)
  g = jax.grad(lambda w_: route(jnp.asarray(x), w_, k=K, aux_loss_alpha=alpha).aux_loss)(
    jnp.asarray(w)
  )
  ids_np, _, probs = ref.route(x, w, K)
  counts = np.zeros((B, N))
  for b in range(B):
    np.add.at(counts[b], ids_np[b].reshape(-1), 1)
  g_p = np.broadcast_to((alpha * counts / (S * K / N) / (B * S))[:, None, :], probs.shape)
  g_logits = probs * (g_p - (probs * g_p).sum(-1, keepdims=True))
  want_w = np.einsum("bse,bsd->ed", g_logits, ref.f64(x))
  assert np.abs(want_w).max() > 1e-5
  np.testing.assert_allclose(np.asarray(g), want_w, rtol=1e-4, atol=1e-9)


def test_z_loss_exact_value():
  logits = jnp.asarray([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-2.0, 0.5, 10.0]]])
  # 0.01 * mean(logsumexp^2) = 0.01 * (3.40760596444438^2 + ln(3)^2 + 10.00008099276224^2) / 3
  np.testing.assert_allclose(
    float(router_z_loss(logits, 0.01)), 0.3760678241051137, rtol=0, atol=1e-7
  )
  assert float(router_z_loss(logits, 0.0)) == 0.0
  # Through `route`: coef * mean over tokens of logsumexp(x W^T)^2.
  x, w = _inputs(6)
  out = route(jnp.asarray(x), jnp.asarray(w), k=K, z_loss_coef=0.1)
  lg = ref.f64(x) @ ref.f64(w).T
  lse = np.log(np.exp(lg).sum(-1))
  np.testing.assert_allclose(float(out.z_loss), 0.1 * np.mean(lse**2), rtol=1e-5)
  assert float(route(jnp.asarray(x), jnp.asarray(w), k=K).z_loss) == 0.0


def test_router_init_is_torch_linear_default():
  d, n = 64, 16
  w = np.asarray(torch_linear_default_init(d)(jax.random.key(0), (n, d)))
  assert w.shape == (n, d) and w.dtype == np.float32
  bound = 1.0 / math.sqrt(d)  # PyTorch Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert np.abs(w).max() <= bound
  assert np.abs(w).max() > 0.95 * bound
  assert abs(w.mean()) < 0.1 * bound
  np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.1)  # uniform, not normal
