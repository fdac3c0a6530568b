"""Tests for coe_jax.nn.coe_layer: every switch against a float64 numpy DESIGN.md 2 implementation."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax.core.meta import unbox

from coe_jax.nn import dispatch as dispatch_lib
from coe_jax.nn.blocked import DeferredWeights
from coe_jax.nn.coe_config import CoEConfig
from coe_jax.nn.coe_layer import CoELayer, expert_pass
from coe_jax.nn.dispatch import expert_capacity
from coe_jax.nn.experts import SwiGLUWeights
from coe_jax.nn.layers import rms_norm
from coe_jax.nn.router import route

B, S, D = 2, 6, 16
BASE = CoEConfig(
  hidden_size=D,
  n_routed_experts=6,
  n_shared_experts=1,
  num_experts_per_tok=2,
  moe_intermediate_size=8,
  initializer_range=0.2,
  capacity_factor_eval=1.0,
  capacity_factor_train=0.75,
  min_capacity=1,
)
ATOL = RTOL = 1e-4
STATS_CFG = BASE.replace(num_iterations=2, dispatch="capacity", router_z_loss_coef=0.01)


def _h(seed=0):
  return (2.0 * np.random.default_rng(seed).normal(size=(B, S, D))).astype(np.float32)


def _params(cfg, seed=0):
  return ref.random_params(CoELayer(cfg).init, jnp.zeros((B, S, D)), seed=seed)


@functools.lru_cache(maxsize=None)
def _apply_fn(cfg, train=False):
  """Compiled `(params, h) -> (out, aux, intermediates)`, one per config."""

  def fn(params, h, token_mask=None):
    (out, aux), state = CoELayer(cfg).apply(
      {"params": params}, h, train=train, token_mask=token_mask, mutable=["intermediates"]
    )
    return out, aux, state["intermediates"]

  return ref.fast_jit(fn)


def _capacity(cfg, train=False):
  if cfg.dispatch != "capacity":
    return None
  cf = cfg.capacity_factor_train if train else cfg.capacity_factor_eval
  return ref.capacity(B * S, cfg.num_experts_per_tok, cfg.n_routed_experts, cf, cfg.min_capacity)


def _probe():
  return np.cos(np.arange(B * S * D)).reshape(B, S, D)


@functools.lru_cache(maxsize=None)
def _value_and_grad_fn(cfg):
  """Compiled `(params, h) -> ((out, aux, intermediates), (d params, d h))` of
  loss = sum(out * probe) + aux_loss."""
  probe = jnp.asarray(_probe(), jnp.float32)

  def loss(params, h):
    (out, aux), state = CoELayer(cfg).apply({"params": params}, h, mutable=["intermediates"])
    return jnp.sum(out * probe) + aux.aux_loss, (out, aux, state["intermediates"])

  def fn(params, h):
    (_, res), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, h)
    return res, grads

  return ref.fast_jit(fn)


def _numpy_loss(params, h, cfg):
  """(loss, routing decisions) of the numpy layer."""
  out, info = ref.coe_block(h, ref.flax_ffn_weights(params), cfg, _capacity(cfg))
  return np.sum(out * _probe()) + sum(info["aux"]), (np.stack(info["ids"]), np.stack(info["kept"]))


def _check_against_numpy(cfg, seed=0):
  params, h = _params(cfg, seed), _h(seed)
  (out, aux, inter), (g_params, g_h) = _value_and_grad_fn(cfg)(params, jnp.asarray(h))
  want, info = ref.coe_block(h, ref.flax_ffn_weights(params), cfg, _capacity(cfg))
  np.testing.assert_array_equal(np.asarray(inter["expert_ids"][0]), np.stack(info["ids"]))
  np.testing.assert_array_equal(np.asarray(inter["kept"][0]), np.stack(info["kept"]))
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(np.asarray(out), want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(aux.aux_loss), sum(info["aux"]), rtol=1e-5)
  # Gradients: finite, the routers get one, and they match a float64 central difference
  # of the numpy loss along a random direction (routing is locally constant).
  for g in jax.tree.leaves((g_params, g_h)):
    assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(g_params["router"])).max() > 0
  rng = np.random.default_rng(seed + 100)
  v_params = jax.tree.map(lambda a: rng.normal(size=a.shape), params)
  v_h = rng.normal(size=h.shape)
  eps = 1e-6  # float64: tiny steps keep every routing decision fixed
  shift = lambda sign: (
    jax.tree.map(lambda a, v: ref.f64(a) + sign * eps * v, params, v_params),
    ref.f64(h) + sign * eps * v_h,
  )
  (up, routing_up), (down, routing_down) = (
    _numpy_loss(*shift(+1), cfg),
    _numpy_loss(*shift(-1), cfg),
  )
  for a, b in zip(routing_up, routing_down):
    np.testing.assert_array_equal(a, b)  # no top-K / capacity decision flipped in between
  fd = (up - down) / (2 * eps)
  analytic = sum(
    float(np.sum(ref.f64(g) * v))
    for g, v in zip(jax.tree.leaves((g_params, g_h)), jax.tree.leaves((v_params, v_h)))
  )
  np.testing.assert_allclose(analytic, fd, rtol=2e-3)
  return info


# Every value of every switch; the 16 (independent_gates, inner, outer, style) combinations,
# each with a C in {1, 2, 3}, a number of shared experts in {0, 1, 2} (all 9 (C, shared)
# pairs appear) and a dispatch (capacity with drops, dropless gather, dropless ragged_dot).
_DISPATCHES = [
  dict(dispatch="capacity"),
  dict(dispatch="dropless", dropless_impl="gather"),
  dict(dispatch="dropless", dropless_impl="ragged_dot"),
]
COMBOS = []
for _i, (_ig, _inner, _outer, _style) in enumerate(
  itertools.product([True, False], [True, False], [True, False], ["reference", "textbook"])
):
  COMBOS.append(
    dict(
      independent_gates=_ig,
      inner_residual=_inner,
      outer_residual=_outer,
      residual_style=_style,
      num_iterations=1 + _i % 3,
      n_shared_experts=(_i // 3) % 3,
      **_DISPATCHES[(_i // 2) % 3],
    )
  )


def _combo_id(c):
  return (
    f"{'igate' if c['independent_gates'] else 'sgate'}-"
    f"{'in' if c['inner_residual'] else 'noin'}-{'out' if c['outer_residual'] else 'noout'}-"
    f"{c['residual_style'][:4]}-C{c['num_iterations']}-sh{c['n_shared_experts']}-"
    f"{c.get('dropless_impl', c['dispatch'])}"
  )


@pytest.mark.parametrize("index", range(len(COMBOS)), ids=[_combo_id(c) for c in COMBOS])
def test_layer_matches_numpy_spec(index):
  _check_against_numpy(BASE.replace(**COMBOS[index]), seed=index)


@pytest.mark.parametrize("chain,shared,defer", [(2, 0, True), (3, 1, True), (2, 1, False)])
def test_blocked_chain_matches_numpy_spec(chain, shared, defer):
  # 'blocked' with C > 1 builds the weight gradient once from every pass's rows
  # (defer_weight_grads, the default) or threads the expert weights from pass to pass, so
  # every pass's weight gradient lands in one accumulator (DispatchOutput.weights).
  cfg = BASE.replace(
    num_iterations=chain,
    n_shared_experts=shared,
    dispatch="dropless",
    dropless_impl="blocked",
    defer_weight_grads=defer,
  )
  _check_against_numpy(cfg, seed=40 + chain)


def test_blocked_chain_gradients_equal_gather_leaf_by_leaf():
  params, h = _params(BASE.replace(num_iterations=3), 7), jnp.asarray(_h(7))
  cfg = lambda impl: BASE.replace(num_iterations=3, dispatch="dropless", dropless_impl=impl)
  grads = {impl: _value_and_grad_fn(cfg(impl))(params, h) for impl in ("blocked", "gather")}
  for a, b in zip(jax.tree.leaves(grads["blocked"]), jax.tree.leaves(grads["gather"])):
    a, b = np.asarray(a), np.asarray(b)  # float32 sums in another order: 1e-5 of the leaf's scale
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_reference_default_output_is_u0_plus_sum_of_m():
  # Defaults (inner on, outer off, 'reference'): out = u0 + m1 + ... + mC, h not re-added.
  cfg = BASE.replace(
    num_iterations=3, n_shared_experts=0, dispatch="dropless", dropless_impl="gather"
  )
  assert cfg.replace(**COMBOS[2]) == cfg  # the same compiled function as that combination
  params, h = _params(cfg, 1), _h(1)
  (out, _, _), _ = _value_and_grad_fn(cfg)(params, jnp.asarray(h))
  p = ref.flax_ffn_weights(params)
  _, info = ref.coe_block(h, p, cfg)
  u0 = ref.rms_norm(ref.f64(h), ref.f64(p["ffn_norm"]), cfg.rms_norm_eps)
  np.testing.assert_allclose(np.asarray(out), u0 + sum(info["m"]), rtol=RTOL, atol=ATOL)
  assert np.abs(np.asarray(out) - (h + sum(info["m"]))).max() > 0.1  # not the textbook form


@pytest.mark.parametrize("n_shared", [0, 2])
def test_c1_is_a_plain_top_k_moe(n_shared):
  cfg = BASE.replace(num_iterations=1, n_shared_experts=n_shared, dispatch="dropless")
  params, h = _params(cfg, 2), _h(2)
  out, _, _ = _apply_fn(cfg)(params, jnp.asarray(h))
  # Direct dense-gating MoE: gates[t, e] = softmax score if e is in the token's top-K else 0.
  p = ref.flax_ffn_weights(params)
  u = ref.rms_norm(ref.f64(h), ref.f64(p["ffn_norm"]), cfg.rms_norm_eps).reshape(B * S, D)
  probs = ref.softmax(u @ ref.f64(p["router"][0]).T)
  gates = np.where(probs >= np.sort(probs, -1)[:, [-cfg.num_experts_per_tok]], probs, 0.0)
  every_expert = np.stack(
    [
      ref.swiglu(u, ref.f64(p["gate"][e]), ref.f64(p["up"][e]), ref.f64(p["down"][e]))
      for e in range(cfg.n_routed_experts)
    ],
    1,
  )
  y = u + np.einsum("te,ted->td", gates, every_expert)
  if n_shared:
    assert p["shared"][0].shape == (D, cfg.moe_intermediate_size * n_shared)
    y = y + ref.swiglu(u, *map(ref.f64, p["shared"]))
  else:
    assert p["shared"] is None
  np.testing.assert_allclose(np.asarray(out), y.reshape(B, S, D), rtol=RTOL, atol=ATOL)


_jitted_expert_pass = ref.fast_jit(expert_pass, static_argnames=("cfg", "capacity"))


@pytest.mark.parametrize("independent_gates", [True, False])
def test_scan_equals_unrolled_python_loop(independent_gates):
  cfg = BASE.replace(
    num_iterations=3, independent_gates=independent_gates, n_shared_experts=1, dispatch="capacity"
  )
  params, h = _params(cfg, 3), jnp.asarray(_h(3))
  out, aux, inter = _apply_fn(cfg)(params, h)
  routed = SwiGLUWeights(
    gate=params["routed_experts"]["gate_proj"],
    up=params["routed_experts"]["up_proj"],
    down=params["routed_experts"]["down_proj"],
  )
  sh = params["shared_experts"]
  shared = SwiGLUWeights(gate=sh["gate_proj"], up=sh["up_proj"], down=sh["down_proj"])
  cap = expert_capacity(
    B * S, cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.capacity_factor_eval, cfg.min_capacity
  )
  u = rms_norm(h, params["norm"]["scale"], cfg.rms_norm_eps)
  aux_sum, ids = 0.0, []
  for t in range(cfg.num_iterations):
    router_weight = params["router"][t if independent_gates else 0]
    # (the gate switch only decides which router weight comes in; one compile serves both)
    m, routing, kept, _ = _jitted_expert_pass(
      u, router_weight, routed, shared, cfg=cfg.replace(independent_gates=True), capacity=cap
    )
    u = u + m
    aux_sum += routing.aux_loss
    ids.append(routing.expert_ids)
  np.testing.assert_allclose(np.asarray(out), np.asarray(u), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(aux.aux_loss), float(aux_sum), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(inter["expert_ids"][0]), np.stack(ids))


def test_sown_intermediates_match_numpy():
  cfg = STATS_CFG
  params, h = _params(cfg, 4), _h(4)
  _, _, inter = _apply_fn(cfg)(params, jnp.asarray(h))
  C, K, N = 2, 2, 6
  shapes = {name: value[0].shape for name, value in inter.items()}
  assert shapes == {
    "expert_ids": (C, B, S, K),
    "combine_weights": (C, B, S, K),
    "kept": (C, B, S, K),
    "router_probs": (C, B, S, N),
  }
  assert inter["expert_ids"][0].dtype == jnp.int32 and inter["kept"][0].dtype == jnp.bool_
  assert inter["combine_weights"][0].dtype == jnp.float32
  _, info = ref.coe_block(h, ref.flax_ffn_weights(params), cfg, _capacity(cfg))
  np.testing.assert_array_equal(np.asarray(inter["expert_ids"][0]), np.stack(info["ids"]))
  np.testing.assert_array_equal(np.asarray(inter["kept"][0]), np.stack(info["kept"]))
  assert not np.stack(info["kept"]).all()  # capacity factor 1.0 drops some here
  np.testing.assert_allclose(
    np.asarray(inter["combine_weights"][0]), np.stack(info["weights"]), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(inter["router_probs"][0]), np.stack(info["probs"]), rtol=1e-5, atol=1e-6
  )
  # Without a mutable 'intermediates' collection the call simply returns (out, aux).
  out_plain, _ = jax.eval_shape(
    lambda p_, h_: CoELayer(cfg).apply({"params": p_}, h_), params, jnp.asarray(h)
  )
  assert out_plain.shape == (B, S, D)


def test_router_fn_replaces_the_router_and_defaults_to_route():
  def last_experts(x, weight, **kwargs):  # every token to the last K=2 of the 6 experts
    routing = route(x, weight, **kwargs)
    return routing.replace(expert_ids=jnp.broadcast_to(jnp.int32([5, 4]), routing.expert_ids.shape))

  cfg, params, h = STATS_CFG, _params(STATS_CFG, 5), jnp.asarray(_h(5))
  layer = CoELayer(cfg, router_fn=last_experts)
  (out, _), state = layer.apply({"params": params}, h, mutable=["intermediates"])
  assert (np.asarray(state["intermediates"]["expert_ids"][0]) == [5, 4]).all()
  assert CoELayer(cfg).router_fn is route  # the numpy-spec tests above check its output
  assert not np.allclose(out, _apply_fn(cfg)(params, h)[0], atol=1e-3)


@pytest.mark.parametrize("mode", ["eval", "train", "eval_padded"])
def test_aux_statistics_match_numpy(mode):
  train = mode == "train"
  cfg = STATS_CFG
  params, h = _params(cfg, 5), _h(5)
  token_mask = None
  if mode == "eval_padded":
    token_mask = np.ones((B, S), np.int32)
    token_mask[0, -2:] = 0
    token_mask[1, 0] = 0
  out, aux, inter = _apply_fn(cfg, train)(
    params, jnp.asarray(h), None if token_mask is None else jnp.asarray(token_mask)
  )
  C, N, K = cfg.num_iterations, cfg.n_routed_experts, cfg.num_experts_per_tok
  want_out, info = ref.coe_block(
    h, ref.flax_ffn_weights(params), cfg, _capacity(cfg, train), token_mask
  )
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=RTOL, atol=ATOL)
  ids, kept, probs = np.stack(info["ids"]), np.stack(info["kept"]), np.stack(info["probs"])
  np.testing.assert_array_equal(np.asarray(inter["kept"][0]), kept)
  # Statistics over real tokens only (padding is neither routed nor counted).
  real = np.ones((B, S), bool) if token_mask is None else token_mask.astype(bool)
  load = np.stack([np.bincount(ids[t][real].reshape(-1), minlength=N) for t in range(C)])
  dropped = np.stack([np.bincount(ids[t][real][~kept[t][real]], minlength=N) for t in range(C)])
  dropped_fraction = dropped.sum(-1) / (real.sum() * K)
  assert dropped_fraction.min() > 0
  load_cv = load.std(-1) / load.mean(-1)  # population std over experts
  entropy = np.stack([-(probs[t] * np.log(probs[t])).sum(-1)[real].mean() for t in range(C)])
  assert aux.dropped_fraction.shape == (C,) and aux.expert_load.shape == (C, N)
  np.testing.assert_allclose(np.asarray(aux.dropped_fraction), dropped_fraction, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux.expert_load), load)
  np.testing.assert_array_equal(np.asarray(aux.expert_dropped), dropped)
  np.testing.assert_allclose(np.asarray(aux.load_cv), load_cv, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux.router_entropy), entropy, rtol=1e-5)
  # The load-balancing loss sees every position, padding included (as in the reference).
  np.testing.assert_allclose(float(aux.aux_loss), sum(info["aux"]), rtol=1e-5)
  # z-loss: coef * mean(logsumexp(logits)^2) over every position, summed over iterations.
  p = ref.flax_ffn_weights(params)
  u = ref.rms_norm(ref.f64(h), ref.f64(p["ffn_norm"]), cfg.rms_norm_eps)
  z = 0.0
  for t in range(C):
    logits = u @ ref.f64(p["router"][t]).T
    z += 0.01 * np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    u = u + info["m"][t]
  np.testing.assert_allclose(float(aux.z_loss), z, rtol=1e-5)


def test_bfloat16_compute_with_float32_router():
  cfg = BASE.replace(dtype="bfloat16", num_iterations=2, dispatch="dropless")
  params, h = _params(cfg, 6), _h(6)
  out, aux, inter = _apply_fn(cfg)(params, jnp.asarray(h))
  assert out.dtype == jnp.bfloat16
  assert inter["router_probs"][0].dtype == jnp.float32
  assert inter["combine_weights"][0].dtype == jnp.float32
  assert aux.aux_loss.dtype == jnp.float32
  # Iteration 1: u0 is the bf16-rounded norm; its logits are float32 (agreement to 1e-5
  # would fail with bf16 logits, whose rounding error is ~1e-2).
  p = ref.flax_ffn_weights(params)
  u0 = ref.rms_norm(ref.f64(h), ref.f64(p["ffn_norm"]), cfg.rms_norm_eps)
  u0 = np.asarray(jnp.asarray(u0, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  probs = ref.softmax(u0 @ ref.f64(p["router"][0]).T)
  np.testing.assert_allclose(np.asarray(inter["router_probs"][0][0]), probs, rtol=1e-4, atol=1e-6)
  # The whole output is close to the float64 result at bf16 precision.
  want, _ = ref.coe_block(h, p, cfg)
  err = np.abs(np.asarray(out, np.float64) - want).max() / np.abs(want).max()
  assert err < 5e-2, err


def test_param_shapes_and_router_init():
  for independent_gates, rows in ((True, 3), (False, 1)):
    cfg = BASE.replace(num_iterations=3, independent_gates=independent_gates, hidden_size=64)
    variables = unbox(jax.eval_shape(CoELayer(cfg).init, jax.random.key(0), jnp.zeros((1, 2, 64))))
    assert variables["params"]["router"].shape == (rows, 6, 64)
  cfg = BASE.replace(num_iterations=3, hidden_size=64, n_routed_experts=16, n_shared_experts=2)
  init = ref.fast_jit(CoELayer(cfg).init)
  params = unbox(init(jax.random.key(0), jnp.zeros((1, 2, 64))))["params"]
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == {
    "norm": {"scale": (64,)},
    "router": (3, 16, 64),
    "routed_experts": {"gate_proj": (16, 64, 8), "up_proj": (16, 64, 8), "down_proj": (16, 8, 64)},
    "shared_experts": {"gate_proj": (64, 16), "up_proj": (64, 16), "down_proj": (16, 64)},
  }
  router = np.asarray(params["router"])
  bound = 1 / math.sqrt(64)
  assert np.abs(router).max() <= bound and np.abs(router).max() > 0.95 * bound
  np.testing.assert_allclose(router.std(), bound / math.sqrt(3), rtol=0.1)
  experts = np.asarray(params["routed_experts"]["gate_proj"])
  np.testing.assert_allclose(experts.std(), cfg.initializer_range, rtol=0.1)  # N(0, std)
  np.testing.assert_array_equal(np.asarray(params["norm"]["scale"]), np.ones(64))


@pytest.mark.parametrize(
  "changes, deferred",
  [
    (dict(dropless_impl="blocked"), True),
    (dict(dropless_impl="blocked", defer_weight_grads=False), False),
    (dict(dropless_impl="blocked", num_iterations=1), False),  # one pass: nothing to defer
    (dict(dropless_impl="gather"), False),
    (dict(dispatch="capacity"), False),
  ],
)
def test_the_layer_defers_weight_gradients_only_for_a_blocked_chain(changes, deferred, monkeypatch):
  made = []
  original = dispatch_lib.chain_weights

  def recording(weights, passes, *args, **kwargs):
    out = original(weights, passes, *args, **kwargs)
    made.append(isinstance(out, DeferredWeights))
    return out

  monkeypatch.setattr(dispatch_lib, "chain_weights", recording)
  cfg = BASE.replace(**{"num_iterations": 2, "dispatch": "dropless", **changes})
  x = jnp.zeros((2, 4, cfg.hidden_size))
  jax.eval_shape(lambda: CoELayer(cfg).init(jax.random.key(0), x, train=True))
  assert any(made) == deferred
  made.clear()
  jax.eval_shape(lambda: CoELayer(cfg).init(jax.random.key(0), x, train=False))
  assert not any(made)  # no backward to defer to
