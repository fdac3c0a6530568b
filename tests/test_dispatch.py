"""Tests for coe_jax.nn.dispatch: capacity vs dropless (gather, ragged_dot) vs numpy (DESIGN.md 3).

dropless_impl='blocked' is tested in test_blocked.py, its tile sizes in test_tiling.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from coe_jax.nn.dispatch import (
  assignment_slots,
  capacity_dispatch,
  dispatch_to_experts,
  expert_capacity,
)
from coe_jax.nn.experts import SwiGLUWeights

T, D, F, N, K = 12, 16, 8, 6, 2


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(T, D)).astype(np.float32)
  ids = np.stack([rng.permutation(N)[:K] for _ in range(T)]).astype(np.int32)
  cw = rng.uniform(0.1, 1.0, size=(T, K)).astype(np.float32)
  weights = SwiGLUWeights(
    gate=(0.4 * rng.normal(size=(N, D, F))).astype(np.float32),
    up=(0.4 * rng.normal(size=(N, D, F))).astype(np.float32),
    down=(0.4 * rng.normal(size=(N, F, D))).astype(np.float32),
  )
  probe = rng.normal(size=(T, D)).astype(np.float32)  # random cotangent for the gradients
  return x, ids, cw, weights, probe


def _numpy_output(x, ids, cw, weights, kept=None):
  return ref.routed_output(
    ref.f64(x),
    ids,
    ref.f64(cw),
    ref.f64(weights.gate),
    ref.f64(weights.up),
    ref.f64(weights.down),
    kept,
  )


@functools.partial(ref.fast_jit, static_argnames=("mode", "capacity", "impl"))
def _value_and_grads(x, ids, cw, weights, probe, *, mode, capacity, impl):
  def loss(x_, cw_, w_):
    out = dispatch_to_experts(x_, ids, cw_, w_, mode=mode, capacity=capacity, dropless_impl=impl)
    return jnp.sum(out.output * probe), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, cw, weights)
  return out, grads


def _np_keep_loads(ids):
  return np.bincount(ids.reshape(-1), minlength=N)


def test_capacity_and_dropless_agree_in_value_and_gradient():
  x, ids, cw, weights, probe = _problem()
  tight = int(_np_keep_loads(ids).max())  # the smallest capacity at which nothing drops
  assert tight < T
  runs = {
    "capacity_tight": dict(mode="capacity", capacity=tight, impl="gather"),
    "capacity_T": dict(mode="capacity", capacity=T, impl="gather"),
    "dropless_gather": dict(mode="dropless", capacity=1, impl="gather"),
    "dropless_ragged": dict(mode="dropless", capacity=1, impl="ragged_dot"),
  }
  results = {name: _value_and_grads(x, ids, cw, weights, probe, **kw) for name, kw in runs.items()}
  want = _numpy_output(x, ids, cw, weights)
  for name, (out, _) in results.items():
    assert np.asarray(out.kept).all(), name
    np.testing.assert_allclose(np.asarray(out.output), want, rtol=1e-5, atol=1e-5, err_msg=name)
  _, base_grads = results["dropless_gather"]
  flat_base = jax.tree.leaves(base_grads)
  assert all(np.abs(np.asarray(g)).max() > 1e-3 for g in flat_base)  # every gradient is live
  for name, (_, grads) in results.items():
    for g, g0 in zip(jax.tree.leaves(grads), flat_base):
      np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-5, atol=1e-5, err_msg=name)


def test_combine_weight_gradient_matches_numpy():
  # d/d cw[t, k] of sum(out * probe) = <expert_ids[t,k](x_t), probe_t>.
  x, ids, cw, weights, probe = _problem(1)
  _, (_, g_cw, _) = _value_and_grads(
    x, ids, cw, weights, probe, mode="capacity", capacity=T, impl="gather"
  )
  want = np.zeros((T, K))
  for t in range(T):
    for k in range(K):
      e = ids[t, k]
      y = ref.swiglu(
        ref.f64(x[t]), ref.f64(weights.gate[e]), ref.f64(weights.up[e]), ref.f64(weights.down[e])
      )
      want[t, k] = y @ ref.f64(probe[t])
  np.testing.assert_allclose(np.asarray(g_cw), want, rtol=1e-5, atol=1e-5)


def test_slot_major_priority_on_a_hand_built_example():
  # Expert 0 is wanted by t0 and t2 as first choice and by t1 and t3 as second choice.
  # Slot-major priority keeps both first choices and drops the second choices; a
  # token-major order would instead have kept t1's second choice and dropped t2's first.
  ids = jnp.asarray([[0, 1], [1, 0], [0, 2], [2, 0]], jnp.int32)
  slots, kept = assignment_slots(ids, 3, 2)
  want_kept = np.array([[True, True], [True, False], [True, True], [True, False]])
  np.testing.assert_array_equal(np.asarray(kept), want_kept)
  np.testing.assert_array_equal(want_kept, ref.keep_mask(np.asarray(ids), 3, 2))
  # Slots are expert * capacity + position; dropped ones get the sentinel E * C = 6.
  np.testing.assert_array_equal(np.asarray(slots), [[0, 3], [2, 6], [1, 5], [4, 6]])


def test_buffer_layout_and_zero_padding():
  x, ids, cw, _, _ = _problem(2)
  cap = 3
  seen = {}

  def identity_expert(buffer):
    seen["buffer"] = np.asarray(buffer)
    return buffer

  out = capacity_dispatch(
    jnp.asarray(x), jnp.asarray(ids), jnp.asarray(cw), identity_expert, N, cap
  )
  kept = ref.keep_mask(ids, N, cap)
  buffer = seen["buffer"]
  assert buffer.shape == (N, cap, D)
  want = np.zeros((N, cap, D))
  fill = np.zeros(N, int)
  for k in range(K):  # slot-major, then token order
    for t in range(T):
      e = ids[t, k]
      if kept[t, k]:
        want[e, fill[e]] = x[t]
        fill[e] += 1
  np.testing.assert_array_equal(buffer, want.astype(np.float32))  # empty rows are exact zeros
  np.testing.assert_allclose(
    np.asarray(out.output), (ref.f64(cw) * kept).sum(-1, keepdims=True) * x, rtol=1e-6
  )


@pytest.mark.parametrize("cap,seed", [(1, 3), (2, 4), (3, 5)])
def test_small_capacity_drops_exactly_the_numpy_assignments(cap, seed):
  x, ids, cw, weights, probe = _problem(seed)
  out, grads = _value_and_grads(
    x, ids, cw, weights, probe, mode="capacity", capacity=cap, impl="gather"
  )
  kept = ref.keep_mask(ids, N, cap)
  np.testing.assert_array_equal(np.asarray(out.kept), kept)
  dropped_fraction = 1.0 - kept.mean()
  assert dropped_fraction > 0
  np.testing.assert_allclose(float(1.0 - np.asarray(out.kept).mean()), dropped_fraction)
  np.testing.assert_allclose(
    np.asarray(out.output), _numpy_output(x, ids, cw, weights, kept), rtol=1e-5, atol=1e-5
  )
  # Gradients equal those of the dropless computation with the dropped combine weights zeroed
  # (a dropped assignment contributes nothing, and receives zero gradient itself).
  _, grads0 = _value_and_grads(
    x, ids, cw * kept, weights, probe, mode="dropless", capacity=1, impl="gather"
  )
  g_x, g_cw, g_w = grads
  g0_x, g0_cw, g0_w = grads0
  np.testing.assert_allclose(np.asarray(g_x), np.asarray(g0_x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(g_cw) * kept, np.asarray(g0_cw) * kept, rtol=1e-5, atol=1e-5
  )
  assert np.all(np.asarray(g_cw)[~kept] == 0)
  for a, b in zip(jax.tree.leaves(g_w), jax.tree.leaves(g0_w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "mode,impl,cap",
  [("capacity", "gather", 2), ("dropless", "gather", 1), ("dropless", "ragged_dot", 1)],
)
def test_padding_tokens_take_no_capacity_and_get_no_output(mode, impl, cap):
  x, ids, cw, weights, _ = _problem(6)
  token_mask = np.ones(T, bool)
  token_mask[[0, 1, 5, 11]] = False  # early padding would otherwise win capacity
  out = dispatch_to_experts(
    jnp.asarray(x),
    jnp.asarray(ids),
    jnp.asarray(cw),
    weights,
    mode=mode,
    capacity=cap,
    dropless_impl=impl,
    token_mask=jnp.asarray(token_mask),
  )
  kept = ref.keep_mask(ids, N, cap if mode == "capacity" else T, token_mask)
  np.testing.assert_array_equal(np.asarray(out.kept), kept)
  assert not kept[~token_mask].any()
  if mode == "capacity":  # without the mask, padding would have taken some of the capacity
    assert (ref.keep_mask(ids, N, cap)[token_mask] != kept[token_mask]).any()
  got = np.asarray(out.output)
  np.testing.assert_array_equal(got[~token_mask], 0.0)
  np.testing.assert_allclose(got, _numpy_output(x, ids, cw, weights, kept), rtol=1e-5, atol=1e-5)


def test_expert_capacity_formula():
  # ceil(cf * T * K / N), at least min_capacity, at most T.
  assert expert_capacity(100, 2, 8, 1.25, 4) == 32  # ceil(31.25)
  assert expert_capacity(100, 2, 8, 1.0, 4) == 25
  assert expert_capacity(10, 3, 7, 1.0, 1) == 5  # ceil(4.2857)
  assert expert_capacity(10, 1, 8, 1.0, 4) == 4  # ceil(1.25) = 2 -> min_capacity 4
  assert expert_capacity(10, 4, 4, 2.0, 4) == 10  # 20 -> capped at T
  assert expert_capacity(3, 1, 8, 1.0, 4) == 3  # min_capacity above T -> T
  for args in [(24, 2, 6, 1.25, 4), (64, 8, 63, 2.0, 4), (512, 4, 47, 0.5, 1)]:
    assert expert_capacity(*args) == ref.capacity(*args)


def test_unknown_mode_is_an_error():
  x, ids, cw, weights, _ = _problem()
  with pytest.raises(ValueError, match="allowed values"):
    dispatch_to_experts(
      jnp.asarray(x), jnp.asarray(ids), jnp.asarray(cw), weights, mode="dense", capacity=4
    )
