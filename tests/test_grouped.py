"""The Pallas grouped-matmul dropless path (coe_jax.nn.grouped), run by Pallas' interpreter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from coe_jax.nn import grouped, tuning
from coe_jax.nn.blocked import blocked_dispatch
from coe_jax.nn.dispatch import dispatch_to_experts
from coe_jax.nn.experts import SwiGLUWeights

T, D, F, N, K = 40, 32, 16, 6, 2
CFG = grouped.KernelConfig(tile=16, block_n=16, block_k=16, interpret=True)


def _problem(seed=0, num_experts=N):
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.permutation(num_experts)[:K] for _ in range(T)]).astype(np.int32)
  ids[ids == 1] = 0  # expert 1 idle: a zero weight gradient, no tiles
  weights = SwiGLUWeights(
    *(
      jnp.asarray(0.3 * rng.normal(size=s), jnp.float32)
      for s in ((num_experts, D, F), (num_experts, D, F), (num_experts, F, D))
    )
  )
  return (
    jnp.asarray(rng.normal(size=(T, D)), jnp.float32),
    jnp.asarray(ids),
    jnp.asarray(rng.uniform(0.1, 1.0, size=(T, K)), jnp.float32),
    weights,
    jnp.asarray(rng.normal(size=(T, D)), jnp.float32),
    jnp.asarray(rng.uniform(size=T) > 0.2),
  )


def _value_and_grads(dispatch, x, cw, weights, probe):
  def loss(x_, cw_, w_):
    return jnp.sum(dispatch(x_, cw_, w_).output * probe)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, cw, weights)


def test_layout_pads_each_expert_to_whole_tiles_within_the_static_bound():
  _, ids, _, _, _, mask = _problem()
  layout = grouped.grouped_layout(ids, N, 16, mask)
  tiles = grouped.num_row_tiles(T * K, N, 16)
  assert layout.tile_expert.shape == (tiles,) and layout.assignment_of_row.shape == (tiles * 16,)
  counts = np.bincount(np.asarray(ids)[np.asarray(mask)].reshape(-1), minlength=N)
  np.testing.assert_array_equal(layout.num_tiles, -(-counts // 16))
  owner = np.asarray(layout.tile_expert)
  used = int(np.sum(layout.num_tiles))
  np.testing.assert_array_equal(owner[:used], np.repeat(np.arange(N), layout.num_tiles))
  assert np.all(owner[used:] == -1)
  rows = np.asarray(layout.row_of_assignment)
  kept = np.asarray(layout.kept)
  assert np.all(owner[rows[kept] // 16] == np.asarray(ids)[kept])  # every row in its expert's tile
  assert np.all(rows[~kept] == tiles * 16)


def test_grouped_matmul_and_its_gradients_equal_per_tile_matmuls():
  rng = np.random.default_rng(1)
  tiles, rows = 5, 5 * 16
  w = jnp.asarray(rng.normal(size=(N, D, F)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(rows, D)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(rows, F)), jnp.float32)
  owner = np.array([0, 0, 3, 5, -1], np.int32)  # two tiles of expert 0, one unused tile
  first = np.array([0, 2, 2, 2, 3, 3], np.int32)
  count = np.array([2, 0, 0, 1, 0, 1], np.int32)
  args = (jnp.asarray(owner), jnp.asarray(first), jnp.asarray(count), CFG)
  out, vjp = jax.vjp(lambda x_, w_: grouped.gmm(x_, (w_,), *args)[0], x, w)
  dx, dw = vjp(dy)
  wt = np.asarray(w)[np.maximum(owner, 0)] * (owner >= 0)[:, None, None]  # [tiles, D, F]
  xt, dyt = np.asarray(x).reshape(tiles, 16, D), np.asarray(dy).reshape(tiles, 16, F)
  np.testing.assert_allclose(out, np.einsum("tnd,tdf->tnf", xt, wt).reshape(rows, F), 1e-5, 1e-5)
  np.testing.assert_allclose(dx, np.einsum("tnf,tdf->tnd", dyt, wt).reshape(rows, D), 1e-5, 1e-5)
  want_dw = np.zeros((N, D, F), np.float32)
  for t, e in enumerate(owner):
    if e >= 0:
      want_dw[e] += xt[t].T @ dyt[t]
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


def test_grouped_dispatch_equals_numpy_and_blocked_forward_and_gradients():
  x, ids, cw, weights, probe, mask = _problem()
  gate, up, down = (ref.f64(w) for w in (weights.gate, weights.up, weights.down))
  kept = np.broadcast_to(np.asarray(mask)[:, None], ids.shape)
  want = ref.routed_output(ref.f64(x), np.asarray(ids), ref.f64(cw), gate, up, down, kept)
  out = grouped.grouped_dispatch(x, ids, cw, weights, CFG, mask).output
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  value, grads = _value_and_grads(
    lambda *a: grouped.grouped_dispatch(a[0], ids, a[1], a[2], CFG, mask), x, cw, weights, probe
  )
  want_value, want_grads = _value_and_grads(
    lambda *a: blocked_dispatch(a[0], ids, a[1], a[2], 16, 1, mask), x, cw, weights, probe
  )
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-4, atol=1e-5)


def test_dropless_impl_grouped_runs_through_dispatch_on_cpu():
  x, ids, cw, weights, _, _ = _problem()
  out = dispatch_to_experts(
    x, ids, cw, weights, mode="dropless", capacity=0, dropless_impl="grouped", dropless_tile=16
  )
  want = dispatch_to_experts(
    x, ids, cw, weights, mode="dropless", capacity=0, dropless_impl="gather"
  )
  np.testing.assert_allclose(out.output, want.output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_auto_is_grouped_for_gpu_targets_and_blocked_for_cpu(platform):
  assert tuning.resolve_dropless_impl("auto", platform) == (
    "grouped" if platform == "gpu" else "blocked"
  )
  x, ids, cw, weights, _, _ = _problem()
  run = lambda x_: (
    dispatch_to_experts(
      x_, ids, cw, weights, mode="dropless", capacity=0, target_platform=platform
    ).output
  )
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x_: jnp.sum(run(x_))))(x))
  assert ("pallas_call" in jaxpr) == (platform == "gpu")


def test_one_kernel_for_several_weights_equals_one_call_each():
  rng = np.random.default_rng(2)
  rows = 3 * 16
  ws = tuple(jnp.asarray(rng.normal(size=(N, D, F)), jnp.float32) for _ in range(2))
  x = jnp.asarray(rng.normal(size=(rows, D)), jnp.float32)
  probes = [jnp.asarray(rng.normal(size=(rows, F)), jnp.float32) for _ in range(2)]
  args = (jnp.asarray([2, 4, -1], jnp.int32), jnp.asarray([0, 0, 0, 1, 1, 2], jnp.int32))
  args = (*args, jnp.asarray([0, 0, 1, 0, 1, 0], jnp.int32), CFG)

  def loss(x_, ws_, fused):
    outs = grouped.gmm(x_, ws_, *args) if fused else [grouped.gmm(x_, (w,), *args)[0] for w in ws_]
    return sum(jnp.sum(o * p) for o, p in zip(outs, probes))

  fused, single = (jax.value_and_grad(loss, argnums=(0, 1))(x, ws, f) for f in (True, False))
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(single)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
