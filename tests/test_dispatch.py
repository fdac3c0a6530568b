"""Tests for coe_jax.nn.dispatch: capacity vs dropless (gather, ragged_dot, blocked) vs numpy (DESIGN.md 3)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from coe_jax.nn import blocked, tuning
from coe_jax.nn import dispatch as dispatch_lib
from coe_jax.nn.blocked import blocked_bounds, blocked_dispatch, blocked_layout
from coe_jax.nn.dispatch import (
  assignment_slots,
  capacity_dispatch,
  dispatch_to_experts,
  expert_capacity,
)
from coe_jax.nn.experts import SwiGLUWeights, swiglu
from coe_jax.nn.model_config import ConfigError, ModelConfig

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


# ----------------------------------------------------------------------------
# dropless_impl='blocked': expert-sorted rows padded to whole tiles.
# ----------------------------------------------------------------------------


def _random_problem(seed, num_tokens, num_experts, k, ids=None, hidden=D, inter=F):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_tokens, hidden)).astype(np.float32)
  if ids is None:
    ids = np.stack([rng.permutation(num_experts)[:k] for _ in range(num_tokens)])
  cw = rng.uniform(0.1, 1.0, size=(num_tokens, k)).astype(np.float32)
  weights = SwiGLUWeights(
    *(
      (0.4 * rng.normal(size=shape)).astype(np.float32)
      for shape in [
        (num_experts, hidden, inter),
        (num_experts, hidden, inter),
        (num_experts, inter, hidden),
      ]
    )
  )
  probe = rng.normal(size=(num_tokens, hidden)).astype(np.float32)
  return x, np.asarray(ids, np.int32), cw, weights, probe


def _loop_reference(x, ids, cw, weights, token_mask=None):
  """sum_k cw[t, k] * expert_{ids[t, k]}(x_t), one expert at a time (differentiable)."""
  out = jnp.zeros_like(x)
  for e in range(weights.gate.shape[0]):
    chosen = (ids == e) if token_mask is None else (ids == e) & token_mask[:, None]
    weight = jnp.sum(jnp.where(chosen, cw, 0.0), axis=1)
    expert = SwiGLUWeights(weights.gate[e], weights.up[e], weights.down[e])
    out = out + weight[:, None] * swiglu(expert, x)
  return out


@functools.partial(ref.fast_jit, static_argnames=("impl", "tile", "tiles_per_step"))
def _dropless_value_and_grads(
  x, ids, cw, weights, probe, token_mask, *, impl, tile=0, tiles_per_step=1
):
  def loss(x_, cw_, w_):
    if impl == "loop":
      return jnp.sum(_loop_reference(x_, ids, cw_, w_, token_mask) * probe), None
    if impl == "blocked_direct":  # the GPU form: several tiles (gathered weights) per step
      out = blocked_dispatch(x_, ids, cw_, w_, tile, tiles_per_step, token_mask)
    else:
      out = dispatch_to_experts(
        x_,
        ids,
        cw_,
        w_,
        mode="dropless",
        capacity=1,
        dropless_impl=impl,
        dropless_tile=tile,
        token_mask=token_mask,
      )
    return jnp.sum(out.output * probe), out

  (value, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, cw, weights)
  return value, out, grads


def _assert_dropless_agree(
  x,
  ids,
  cw,
  weights,
  probe,
  token_mask=None,
  tiles=(1, 3, 8, 64),
  tiles_per_step=(2, 5),
  size_sets=((1, 2, 3), (2, 5, 8)),
):
  """blocked (every tile size, several sizes, 1 and several tiles per step) == gather == loop."""
  args = (
    jnp.asarray(x),
    jnp.asarray(ids),
    jnp.asarray(cw),
    jax.tree.map(jnp.asarray, weights),
    jnp.asarray(probe),
    None if token_mask is None else jnp.asarray(token_mask),
  )
  want_value, _, want_grads = _dropless_value_and_grads(*args, impl="loop")
  runs = {"gather": dict(impl="gather")}
  runs.update({f"blocked tile={t}": dict(impl="blocked", tile=t) for t in tiles})
  runs.update(
    {
      f"blocked tile=4 x{g}": dict(impl="blocked_direct", tile=4, tiles_per_step=g)
      for g in tiles_per_step
    }
  )
  runs.update(  # one whole-tile size and smaller sizes for each expert's last tile
    {
      f"blocked sizes={sizes} x{g}": dict(impl="blocked_direct", tile=sizes, tiles_per_step=g)
      for sizes in size_sets
      for g in (1, tiles_per_step[0])
    }
  )
  flat_want = jax.tree.leaves(want_grads)
  assert len(flat_want) == 5  # x, combine weights, gate, up, down
  for name, kwargs in runs.items():
    value, out, grads = _dropless_value_and_grads(*args, **kwargs)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5, err_msg=name)
    want_kept = (
      np.ones(ids.shape, bool)
      if token_mask is None
      else np.broadcast_to(np.asarray(token_mask)[:, None], ids.shape)
    )
    np.testing.assert_array_equal(np.asarray(out.kept), want_kept, err_msg=name)
    want_out = np.asarray(_loop_reference(*args[:4], args[5]))
    np.testing.assert_allclose(np.asarray(out.output), want_out, rtol=1e-5, atol=1e-5, err_msg=name)
    for label, g, g0 in zip(("x", "cw", "gate", "up", "down"), jax.tree.leaves(grads), flat_want):
      np.testing.assert_allclose(
        np.asarray(g), np.asarray(g0), rtol=1e-5, atol=1e-5, err_msg=f"{name}: d/d{label}"
      )


def test_blocked_matches_gather_and_a_per_expert_loop_in_value_and_gradient():
  x, ids, cw, weights, probe = _random_problem(10, num_tokens=12, num_experts=6, k=2)
  assert (np.bincount(ids.reshape(-1), minlength=6) > 0).all()
  _assert_dropless_agree(x, ids, cw, weights, probe)


def test_blocked_with_padding_tokens():
  x, ids, cw, weights, probe = _random_problem(11, num_tokens=12, num_experts=6, k=2)
  token_mask = np.ones(12, bool)
  token_mask[[0, 1, 5, 11]] = False
  _assert_dropless_agree(x, ids, cw, weights, probe, token_mask)
  out = dispatch_to_experts(
    jnp.asarray(x),
    jnp.asarray(ids),
    jnp.asarray(cw),
    weights,
    mode="dropless",
    capacity=1,
    dropless_impl="blocked",
    dropless_tile=4,
    token_mask=jnp.asarray(token_mask),
  )
  np.testing.assert_array_equal(np.asarray(out.output)[~token_mask], 0.0)


def test_blocked_with_empty_experts_and_one_expert_taking_every_token():
  # Experts 1 and 4 get nothing; expert 2 is every token's first choice.
  num_tokens = 10
  rng = np.random.default_rng(12)
  ids = np.stack([[2, rng.choice([0, 3, 5])] for _ in range(num_tokens)])
  x, ids, cw, weights, probe = _random_problem(12, num_tokens, num_experts=6, k=2, ids=ids)
  loads = np.bincount(ids.reshape(-1), minlength=6)
  assert loads[1] == loads[4] == 0 and loads[2] == num_tokens
  _assert_dropless_agree(x, ids, cw, weights, probe)
  # K = 1 and every token on one expert: all rows in one expert's tiles.
  x, ids, cw, weights, probe = _random_problem(
    13, num_tokens, num_experts=4, k=1, ids=np.full((num_tokens, 1), 3)
  )
  _assert_dropless_agree(x, ids, cw, weights, probe)


def test_blocked_with_k_equal_to_n():
  x, ids, cw, weights, probe = _random_problem(14, num_tokens=7, num_experts=4, k=4)
  _assert_dropless_agree(x, ids, cw, weights, probe, tiles=(1, 2, 5, 16))


def test_blocked_layout_pads_each_expert_to_whole_tiles():
  ids = np.array([[0, 2], [2, 0], [2, 3], [0, 2], [2, 3]], np.int32)  # loads 3, 0, 5, 2
  tile, num_experts = 2, 4
  num_rows, (num_tiles,) = blocked_bounds(ids.size, num_experts, (tile,))
  assert num_tiles == (10 + 4 * 1) // 2  # tokens*K + N*(tile-1) rows, in tiles
  assert num_rows == 10 + 4 * 1
  layout = jax.jit(blocked_layout, static_argnums=(1, 2))(jnp.asarray(ids), num_experts, (tile,))
  schedule = layout.schedule
  assert schedule.sizes == (tile,)
  np.testing.assert_array_equal(schedule.used, [2 + 0 + 3 + 1])  # ceil(load / tile) per expert
  np.testing.assert_array_equal(np.asarray(schedule.expert[0])[:6], [0, 0, 2, 2, 2, 3])
  np.testing.assert_array_equal(np.asarray(schedule.start[0])[:6], [0, 2, 4, 6, 8, 10])
  np.testing.assert_array_equal(np.asarray(schedule.start[0])[6:], num_rows)  # unused: past rows
  rows = np.asarray(layout.row_of_assignment)
  # Expert 0 owns rows 0-3 (3 used), expert 2 rows 4-9 (5 used), expert 3 rows 10-11; token order.
  flat = ids.reshape(-1)
  for e, first in [(0, 0), (2, 4), (3, 10)]:
    np.testing.assert_array_equal(
      np.sort(rows.reshape(-1)[flat == e]), first + np.arange((flat == e).sum())
    )
    assert (np.diff(rows.reshape(-1)[flat == e]) > 0).all()  # stable: token order
  of_row = np.asarray(layout.assignment_of_row)
  assert of_row.shape == (num_rows,)
  np.testing.assert_array_equal(of_row[rows.reshape(-1)], np.arange(ids.size))
  assert set(np.where(of_row == ids.size)[0]) == {3, 9, 12, 13}  # padding


def test_blocked_layout_gives_each_experts_last_tile_the_smallest_size_that_holds_it():
  # Loads 7, 0, 1, 4, 12 with sizes (2, 4): expert 0 runs whole tiles 4 + the last 3 rows in a
  # tile of 4; expert 2 a tile of 2; expert 3 one tile of 4; expert 4 three tiles of 4.
  loads = [7, 0, 1, 4, 12]
  ids = np.repeat(np.arange(5), loads).astype(np.int32)[:, None]
  rng = np.random.default_rng(0)
  ids = ids[rng.permutation(len(ids))]
  layout = blocked_layout(jnp.asarray(ids), 5, (2, 4))
  schedule = layout.schedule
  np.testing.assert_array_equal(schedule.used, [1, 6])
  np.testing.assert_array_equal(np.asarray(schedule.expert[0])[:1], [2])
  np.testing.assert_array_equal(np.asarray(schedule.start[0])[:1], [8])
  np.testing.assert_array_equal(np.asarray(schedule.expert[1])[:6], [0, 0, 3, 4, 4, 4])
  np.testing.assert_array_equal(np.asarray(schedule.start[1])[:6], [0, 4, 10, 14, 18, 22])
  # Rows: expert 0 at 0-6 (pad 7), expert 2 at 8 (pad 9), expert 3 at 10-13, expert 4 at 14-25.
  num_rows, bounds = blocked_bounds(ids.size, 5, (2, 4))
  assert num_rows == ids.size + 5 * 1  # at most one padding row per expert (steps of 2)
  # One last tile of size 2 per expert at most (5); tiles of size 4 hold 3 or more of the 24 rows.
  assert bounds == (5, 8)
  of_row = np.asarray(layout.assignment_of_row)
  assert set(np.where(of_row[:26] == ids.size)[0]) == {7, 9}
  flat = ids.reshape(-1)
  rows = np.asarray(layout.row_of_assignment).reshape(-1)
  for e, first in [(0, 0), (2, 8), (3, 10), (4, 14)]:
    np.testing.assert_array_equal(rows[flat == e], first + np.arange(loads[e]))


def test_blocked_bounds_hold_for_every_load():
  # Exhaustive over every way to spread 9 assignments over 3 experts (some of them masked out),
  # for several size sets, with 1 and 2 tiles per step: every tile, used or padding, in the rows.
  import itertools

  layout_fn = jax.jit(blocked_layout, static_argnums=(1, 2, 4))
  for sizes, per_step in itertools.product(
    [(1,), (3,), (2, 4), (1, 2, 3), (2, 5, 8), (4, 9)], (1, 2)
  ):
    num_rows, bounds = blocked_bounds(9, 3, sizes)
    for a, b in itertools.product(range(10), repeat=2):
      if a + b > 9:
        continue
      ids = np.repeat(np.arange(3), [a, b, 9 - a - b]).astype(np.int32)[:, None]
      mask = jnp.asarray(np.arange(9) % 4 != 1) if (a + b) % 2 else None
      layout = layout_fn(jnp.asarray(ids), 3, sizes, mask, per_step)
      schedule, rows = layout.schedule, layout.assignment_of_row.shape[0]
      used = np.asarray(schedule.used)
      assert (used <= np.asarray(bounds)).all(), (sizes, a, b)
      for start, experts, n, size, bound in zip(
        schedule.start, schedule.expert, used, sizes, bounds
      ):
        start = np.asarray(start)
        assert len(start) % min(per_step, bound) == 0 and len(start) < bound + per_step
        assert (start[:n] + size <= num_rows).all(), (sizes, a, b)  # used tiles: expert rows
        if per_step > 1:  # padding entries run too, on the block of zero rows
          assert (start[n:] + size <= rows).all(), (sizes, a, b)
        assert (np.diff(np.asarray(experts)) >= 0).all()


def test_blocked_runs_no_more_tiles_per_step_than_a_size_can_hold():
  # The GPU form's budget (thousands of tiles per step at small widths) must not pad each size's
  # tile list up to the budget: a list is never longer than its bound.
  x, ids, cw, weights, _ = _random_problem(18, num_tokens=12, num_experts=6, k=2)
  sizes = (2, 4)
  _, bounds = blocked_bounds(ids.size, 6, sizes)
  layout = blocked_layout(jnp.asarray(ids), 6, sizes, tiles_per_step=10_000)
  assert [len(e) for e in layout.schedule.expert] == list(bounds)
  out = blocked_dispatch(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(cw), weights, sizes, 10_000)
  want = np.asarray(_loop_reference(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(cw), weights))
  np.testing.assert_allclose(np.asarray(out.output), want, rtol=1e-5, atol=1e-5)


def test_blocked_swiglu_runs_only_the_used_tiles():
  x, _, _, weights, _ = _random_problem(16, num_tokens=12, num_experts=3, k=1)
  rows = jnp.asarray(x)  # every row non-zero
  # Sizes 2 and 4: expert 0 rows 0-3, expert 1 rows 4-5 and 6-9; an unused entry of each size.
  for per_step in (1, 2):
    schedule = blocked.TileSchedule(
      expert=(jnp.asarray([1, 2], jnp.int32), jnp.asarray([0, 1], jnp.int32)),
      start=(jnp.asarray([4, 12], jnp.int32), jnp.asarray([0, 6], jnp.int32)),
      used=jnp.asarray([1, 2], jnp.int32),
      sizes=(2, 4),
    )
    padded = jnp.concatenate([rows, jnp.zeros((4, D), rows.dtype)]) if per_step > 1 else rows
    out = np.asarray(
      blocked.blocked_swiglu(padded, schedule, weights.gate, weights.up, weights.down, per_step)
    )
    for first, size, e in [(0, 4, 0), (4, 2, 1), (6, 4, 1)]:
      expert = SwiGLUWeights(weights.gate[e], weights.up[e], weights.down[e])
      np.testing.assert_allclose(
        out[first : first + size],
        np.asarray(swiglu(expert, rows[first : first + size])),
        rtol=1e-5,
        atol=1e-5,
      )
    np.testing.assert_array_equal(out[10:12], 0.0)  # in no used tile: never computed


def test_blocked_padding_rows_are_zero():
  x, ids, cw, weights, _ = _random_problem(15, num_tokens=9, num_experts=5, k=2)
  seen = {}
  original = blocked.blocked_swiglu_threaded

  def spy(rows, schedule, *rest):
    seen.update(rows=rows)
    return original(rows, schedule, *rest)

  blocked.blocked_swiglu_threaded = spy
  try:
    out = blocked_dispatch(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(cw), weights, (2, 4))
  finally:
    blocked.blocked_swiglu_threaded = original
  rows = np.asarray(seen["rows"])
  layout = blocked_layout(jnp.asarray(ids), 5, (2, 4))
  of_row = np.asarray(layout.assignment_of_row)
  assert rows.shape[0] == of_row.shape[0]
  np.testing.assert_array_equal(rows[of_row == ids.size], 0.0)  # exact zeros, not garbage
  np.testing.assert_array_equal(rows[of_row < ids.size], x[of_row[of_row < ids.size] // 2])
  want = np.asarray(_loop_reference(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(cw), weights))
  np.testing.assert_allclose(np.asarray(out.output), want, rtol=1e-5, atol=1e-5)


def test_dropless_tile_and_tile_sizes_are_validated():
  assert ModelConfig().replace(dropless_impl="blocked", dropless_tile=32).coe.dropless_tile == 32
  assert ModelConfig().replace(dropless_tile_sizes=3).coe.dropless_tile_sizes == 3
  for field in ("dropless_tile", "dropless_tile_sizes"):
    for bad in (-1, 2.5, True):
      with pytest.raises(ConfigError, match=rf"model\.{field}\b"):
        ModelConfig().replace(**{field: bad})


def test_default_dropless_tile_holds_a_balanced_load_one_deviation_over_the_mean():
  from coe_jax.nn.tuning import TILE_CAP, default_dropless_tile

  assert default_dropless_tile(512 * 8, 63) == 80  # mean 65 + 8.1 (MoE(K=8), paper-width bench)
  assert default_dropless_tile(512 * 4, 63) == 40  # mean 32.5 + 5.7 (CoE(C=2,K=4) there)
  assert default_dropless_tile(64 * 4, 31) == 16  # mean 8.3 + 2.9
  assert default_dropless_tile(64 * 4, 15) == 24  # mean 17.1 + 4.1
  assert default_dropless_tile(10, 63) == 8  # never below 8
  # Over the cap: equal tiles, e.g. mean 520 + 22.8 = 3 tiles of 184 (3 x 256 would pad 45%).
  assert default_dropless_tile(4096 * 8, 63) == 184
  for assignments in (512 * 8, 4096 * 8, 32768 * 8, 10**6):
    tile = default_dropless_tile(assignments, 63)
    mean = assignments / 63
    assert tile % 8 == 0 and tile <= TILE_CAP
    pieces = -(-(mean + mean**0.5) // tile)  # tiles for a load one deviation over the mean
    assert pieces * tile - (mean + mean**0.5) < 8 * pieces  # padding under 8 rows a tile
  # span: that many balanced loads a tile (the CPU's whole tile, with last tiles every 8 rows).
  assert default_dropless_tile(512 * 8, 63, span=3) == 224  # 3 x 73.1 = 219.4
  assert default_dropless_tile(512 * 4, 63, span=3) == 120  # 3 x 38.2 = 114.6
  assert default_dropless_tile(4096 * 8, 63, span=3) == 240  # 3 x 542.8 over 7 tiles of <= 256


def test_tile_sizes_step_by_multiples_of_eight_up_to_the_whole_tile():
  assert tuning.tile_sizes(80, 5) == (16, 32, 48, 64, 80)  # MoE(K=8) at 512 tokens: pad <= 15
  assert tuning.tile_sizes(40, 5) == (8, 16, 24, 32, 40)  # CoE(C=2,K=4) there
  assert tuning.tile_sizes(184, 5) == (40, 80, 112, 152, 184)
  assert tuning.tile_sizes(80, 1) == (80,)  # whole tiles only (the GPU default)
  assert tuning.tile_sizes(16, 5) == (8, 16) and tuning.tile_sizes(12, 5) == (12,)
  assert tuning.tile_sizes(4, 5) == (4,)
  assert tuning.fine_tile_sizes(120) == tuple(range(8, 121, 8))
  assert tuning.fine_tile_sizes(16) == (8, 16) and tuning.fine_tile_sizes(20) == (8, 16, 20)
  assert tuning.fine_tile_sizes(4) == (4,)
  assert len(tuning.fine_tile_sizes(1024)) == tuning.MAX_TILE_SIZES  # then steps of 32
  rows, tiles = blocked_bounds(512 * 8, 63, tuning.tile_sizes(80, 5))
  assert rows == 512 * 8 + 63 * 15  # against 512 * 8 + 63 * 79 with whole tiles only
  assert tiles == (63, 63, 63, 63, min(4096 // 65, (4096 + 63 * 79) // 80))


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_default_tiling_gives_large_experts_on_cpu_fine_last_tiles_under_a_wide_whole_tile(
  backend,
):
  paper = 3 * 1024 * 704 * 4  # one paper-width expert's weights, float32 (8.6 MB)
  tiny = 3 * 128 * 96 * 4  # the tiny configs' (147 KB)
  paper_tiling = functools.partial(tuning.default_tiling, 512 * 4, 63, paper, platform=backend)
  tiny_tiling = functools.partial(tuning.default_tiling, 512 * 4, 63, tiny, platform=backend)
  if backend == "cpu":
    # Every 8 rows up to three balanced loads (PERF.md 22) where weight copies cost ...
    assert paper_tiling() == tuple(range(8, 121, 8))
    assert paper_tiling(tile=64) == tuple(range(8, 65, 8))
    assert (
      tuning.default_tiling(512 * 8, 63, paper, platform="cpu")[-1] == 224
    )  # MoE(K=8): 28 sizes
    # ... and five sizes up to one balanced load where they do not (PERF.md 21).
    assert tiny_tiling() == (8, 16, 24, 32, 40)
  else:  # whole tiles of one balanced load (unmeasured there)
    assert paper_tiling() == tiny_tiling() == (40,)
    assert paper_tiling(tile=64) == (64,)
  # An explicit count means the same on every backend: that many sizes up to one balanced load.
  assert paper_tiling(count=5) == tiny_tiling(count=5) == (8, 16, 24, 32, 40)
  assert paper_tiling(tile=80, count=1) == (80,)


def test_large_experts_run_the_fine_default_tiling_and_match_the_loop(monkeypatch):
  # 3 x 256 x 384 float32 = 1.1 MiB an expert: on CPU the default path takes every 8 rows up to
  # three balanced loads (mean load 16 -> 64 rows), and stays exact.
  x, ids, cw, weights, probe = _random_problem(15, 32, num_experts=4, k=2, hidden=256, inter=384)
  weights = jax.tree.map(jnp.asarray, weights)
  assert tuning.expert_weight_bytes(weights) == 3 * 256 * 384 * 4
  used_sizes = []
  real_blocked_dispatch = blocked_dispatch

  def spy(*args, **kwargs):
    used_sizes.append(args[4])
    return real_blocked_dispatch(*args, **kwargs)

  monkeypatch.setattr(dispatch_lib, "blocked_dispatch", spy)
  args = (jnp.asarray(x), jnp.asarray(ids), jnp.asarray(cw), weights, jnp.asarray(probe), None)
  value, _, grads = _dropless_value_and_grads(*args, impl="blocked")
  want_value, _, want_grads = _dropless_value_and_grads(*args, impl="loop")
  assert used_sizes == [tuple(range(8, 65, 8))]
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-4, atol=1e-4)


def test_blocked_backward_gives_each_weight_gradient_its_own_zeros():
  # Two chained calls (as in a CoE layer's two iterations): XLA must not merge the zero-initialised
  # [E, d, f] accumulators into one constant that it then copies into every loop (PERF.md 18).
  import re

  x, ids, cw, weights, _ = _random_problem(17, num_tokens=16, num_experts=6, k=2, inter=D)
  weights = jax.tree.map(jnp.asarray, weights)
  routes = [jnp.asarray(ids), jnp.asarray(ids[::-1])]  # each iteration its own routing

  def loss(w, x_, routes_):
    for route in routes_:
      x_ = x_ + blocked_dispatch(x_, route, jnp.asarray(cw), w, 4).output
    return jnp.sum(x_)

  hlo = jax.jit(jax.grad(loss)).lower(weights, jnp.asarray(x), routes).compile().as_text()
  shape = ",".join(str(n) for n in weights.gate.shape)
  assert len(re.findall(rf"= f32\[{shape}\]\S* copy\(", hlo)) == 0
