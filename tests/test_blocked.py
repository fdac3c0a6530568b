"""Tests for dropless_impl='blocked' (coe_jax.nn.blocked): expert-sorted rows padded to whole
tiles, against gather and a per-expert loop in value and gradient; its layout and kernel."""

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
from coe_jax.nn.dispatch import dispatch_to_experts
from coe_jax.nn.experts import SwiGLUWeights, swiglu

D, F = 16, 8  # default hidden and expert widths of the random problems


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
  _assert_dropless_agree(  # padding is per row: one small and one large tile, sizes x2
    x,
    ids,
    cw,
    weights,
    probe,
    token_mask,
    tiles=(3, 64),
    tiles_per_step=(2,),
    size_sets=((2, 5, 8),),
  )
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
  _assert_dropless_agree(  # a tile smaller than, one larger than the load; several per step
    x, ids, cw, weights, probe, tiles=(3, 64), tiles_per_step=(2,), size_sets=((2, 5, 8),)
  )


def test_blocked_with_k_equal_to_n():
  x, ids, cw, weights, probe = _random_problem(14, num_tokens=7, num_experts=4, k=4)
  _assert_dropless_agree(
    x, ids, cw, weights, probe, tiles=(1, 16), tiles_per_step=(2,), size_sets=((1, 2, 3),)
  )


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
      expert_rows=jnp.asarray([4, 6, 0], jnp.int32),
      sizes=(2, 4),
    )
    padded = jnp.concatenate([rows, jnp.zeros((4, D), rows.dtype)]) if per_step > 1 else rows
    out, *_ = blocked.blocked_swiglu_threaded(
      padded, schedule, weights.gate, weights.up, weights.down, per_step
    )
    out = np.asarray(out)
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


def _chain(x, ids_per_pass, cw, weights, token_mask, defer: bool):
  """Passes of 'blocked' dispatch, each on the last one's output, the weights threaded."""
  num_tokens, k = ids_per_pass[0].shape
  threaded = weights
  if defer:
    threaded = dispatch_lib.chain_weights(weights, len(ids_per_pass), num_tokens * k)
    assert isinstance(threaded, blocked.DeferredWeights)
  u = x
  for ids in ids_per_pass:
    out = dispatch_to_experts(
      u,
      jnp.asarray(ids),
      cw,
      threaded,
      mode="dropless",
      capacity=0,
      dropless_impl="blocked",
      token_mask=token_mask,
    )
    u, threaded = u + out.output, out.weights
  return u


@pytest.mark.parametrize("passes,k,masked", [(2, 2, False), (3, 1, True), (2, 4, False)])
def test_deferred_weight_grads_equal_the_per_pass_accumulation(passes, k, masked):
  # Each expert's rows of every pass side by side in one weight-gradient loop: the same
  # gradient as one accumulation per pass, up to float32 summation order. Expert 1 gets no
  # row in any pass, expert 4 only in the last; K = N = 4 leaves no expert idle.
  num_tokens, num_experts = 11, 4 if k == 4 else 6
  rng = np.random.default_rng(50 + passes)
  x, _, cw, weights, probe = _random_problem(50, num_tokens, num_experts, k)
  busy = [e for e in range(num_experts) if k == 4 or e not in (1, 4)]
  ids_per_pass = [
    np.stack([rng.permutation(busy)[:k] for _ in range(num_tokens)]).astype(np.int32)
    for _ in range(passes)
  ]
  if k < 4:
    ids_per_pass[-1][0, 0] = 4
  mask = jnp.asarray(np.arange(num_tokens) < 8) if masked else None

  def loss(x, cw, weights, defer):
    return jnp.sum(_chain(x, ids_per_pass, cw, weights, mask, defer) * probe)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  args = (jnp.asarray(x), jnp.asarray(cw), jax.tree.map(jnp.asarray, weights))
  (value, grads), (want_value, want_grads) = grad(*args, True), grad(*args, False)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))
  assert float(np.abs(np.asarray(grads[2].gate[1])).max()) == 0.0 or k == 4  # idle expert


def test_chain_weights_defers_only_a_chain_of_swiglu_passes():
  weights = SwiGLUWeights(*(jnp.zeros(s) for s in [(6, 8, 4), (6, 8, 4), (6, 4, 8)]))
  assert dispatch_lib.chain_weights(weights, 1, 20) is weights
  assert dispatch_lib.chain_weights({"w": weights.gate}, 2, 20) == {"w": weights.gate}
  deferred = dispatch_lib.chain_weights(weights, 3, 20)
  assert isinstance(deferred, blocked.DeferredWeights) and deferred.rows.x.shape[0] == 3
  x = jnp.zeros((7, 8))  # 14 assignments, not the 20 the rows were sized for

  def dispatch(impl):
    ids, ones = jnp.zeros((7, 2), jnp.int32), jnp.ones((7, 2))
    return dispatch_to_experts(
      x, ids, ones, deferred, mode="dropless", capacity=0, dropless_impl=impl
    )

  with pytest.raises(ValueError, match="made for .* rows a pass"):
    dispatch("blocked")
  with pytest.raises(ValueError, match="deferred weight gradients are for dropless_impl='blocked'"):
    dispatch("gather")
  assert dispatch_lib.chain_weights(weights, 3, 20, target_platform="gpu") is weights
