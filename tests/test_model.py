"""Tests for coe_jax.nn.model (the whole LM); its config: test_model_config.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax.core.meta import unbox
from model_helpers import tiny_model_config

from coe_jax.nn.attention import make_attention_mask
from coe_jax.nn.model import CoECausalLM, DecoderLayer, stack_layers, unstack_layers

B, S, V = 2, 8, 48
TINY = tiny_model_config(
  vocab_size=V, dispatch="capacity"
)  # tests of the dropless path set dispatch='dropless'
# Capacity factors at which the capacity path drops in both modes (capacity 4 in training,
# 7 in eval for 16 tokens, K=2, N=6); shared by several tests so that compiles are reused.
FWD = TINY.replace(capacity_factor_train=0.75, capacity_factor_eval=1.25)


def _ids(seed=0, batch=B):
  return np.random.default_rng(seed).integers(0, V, size=(batch, S)).astype(np.int32)


def _params(cfg, seed=0):
  return ref.random_params(CoECausalLM(cfg).init, jnp.zeros((B, S), jnp.int32), seed=seed)


@functools.lru_cache(maxsize=None)
def _forward(cfg, train=False):
  def fn(params, ids, attention_mask, positions, segment_ids):
    (logits, aux), state = CoECausalLM(cfg).apply(
      {"params": params},
      ids,
      attention_mask,
      positions,
      segment_ids,
      train=train,
      mutable=["intermediates"],
    )
    return logits, aux, stack_layers(state["intermediates"])["layers"]["mlp"]

  return ref.fast_jit(fn)


def _cross_entropy(logits, labels, weights):
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights) / jnp.sum(weights)


@functools.lru_cache(maxsize=None)
def _train_step(cfg):
  """Compiled `(params, ids, labels, mask) -> ((loss, (ce, aux)), grads)`, with a trace counter.

  loss = CE over non-pad positions + load-balancing loss + z-loss (DESIGN.md 3 and 6).
  """
  traces = {"count": 0}

  def loss_fn(params, ids, labels, mask):
    logits, aux = CoECausalLM(cfg).apply({"params": params}, ids, mask, train=True)
    ce = _cross_entropy(logits, labels, mask.astype(jnp.float32))
    return ce + aux.aux_loss + aux.z_loss, (ce, aux)

  def step(params, ids, labels, mask):
    traces["count"] += 1  # runs only while tracing
    return jax.value_and_grad(loss_fn, has_aux=True)(params, ids, labels, mask)

  return ref.fast_jit(step), traces


def _batch(seed):
  """(ids, labels, attention_mask) with some right padding, as jnp arrays."""
  ids = _ids(seed)
  mask = np.ones((B, S), np.int32)
  mask[seed % B, -(1 + seed % 3) :] = 0
  return jnp.asarray(ids), jnp.asarray(np.roll(ids, -1, 1)), jnp.asarray(mask)


# ----------------------------------------------------------------------------
# Shapes and the numpy forward.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_shape_and_dtype(dtype):
  cfg = TINY.replace(dtype=dtype)
  ids = jnp.zeros((B, S), jnp.int32)
  params = jax.eval_shape(CoECausalLM(cfg).init, jax.random.key(0), ids)["params"]
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))  # params stay float32
  logits, aux = jax.eval_shape(lambda p: CoECausalLM(cfg).apply({"params": p}, ids), params)
  assert logits.shape == (B, S, V) and logits.dtype == jnp.float32
  assert aux.aux_loss.shape == () and aux.aux_loss.dtype == jnp.float32
  assert aux.layers.dropped_fraction.shape == (cfg.num_layers, cfg.coe.num_iterations)
  assert aux.layers.expert_load.shape == (cfg.num_layers, cfg.coe.num_iterations, 6)


@functools.lru_cache(maxsize=None)
def _perturbed_init(cfg, seed=0):
  """Real Flax init (initializer_range 0.2), then random RMSNorm scales so they matter."""
  params = unbox(
    ref.fast_jit(CoECausalLM(cfg).init)(jax.random.key(seed), jnp.zeros((B, S), jnp.int32))
  )
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
    lambda path, a: (
      (np.asarray(a) * (1 + 0.3 * rng.normal(size=a.shape))).astype(np.float32)
      if str(path[-1].key) == "scale"
      else np.asarray(a)
    ),
    params["params"],
  )


@pytest.mark.parametrize("variant", ["capacity_eval", "capacity_train", "dropless_padded_packed"])
def test_full_lm_forward_matches_numpy(variant):
  train = variant == "capacity_train"
  cfg = FWD
  attn_mask = positions = segment_ids = None
  if variant == "dropless_padded_packed":
    cfg = cfg.replace(dispatch="dropless")
    attn_mask = np.ones((B, S), np.int32)
    attn_mask[0, -3:] = 0  # right padding
    attn_mask[1, :2] = 0  # left padding: two queries with no allowed key
    positions = np.array([np.arange(S) + 3, [0, 0, 0, 1, 2, 0, 1, 2]], np.int32)
    segment_ids = np.array([[1] * S, [0, 0, 1, 1, 1, 2, 2, 2]], np.int32)  # packed row
  params = _perturbed_init(FWD)  # (dispatch does not change the parameters)
  ids = _ids(1)
  as_jnp = lambda a: None if a is None else jnp.asarray(a)
  logits, aux, inter = _forward(cfg, train)(
    params, jnp.asarray(ids), as_jnp(attn_mask), as_jnp(positions), as_jnp(segment_ids)
  )
  cf = (
    None
    if cfg.coe.dispatch == "dropless"
    else (cfg.coe.capacity_factor_train if train else cfg.coe.capacity_factor_eval)
  )
  want, want_aux, infos = ref.lm_forward(
    ref.flax_weights(params, cfg.num_layers),
    cfg,
    ids,
    attn_mask,
    positions,
    segment_ids,
    capacity_factor=cf,
  )
  kept = np.stack([np.stack(i["kept"]) for i in infos])
  np.testing.assert_array_equal(np.asarray(inter["kept"][0]), kept)
  if cf is not None:
    assert not kept.all()  # the capacity path really dropped something
  np.testing.assert_array_equal(
    np.asarray(inter["expert_ids"][0]), np.stack([np.stack(i["ids"]) for i in infos])
  )
  assert np.abs(want).std() > 0.5
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(float(aux.aux_loss), want_aux, rtol=1e-5)
  # Dropped share of the real tokens' assignments (padding is never routed, never counted).
  real = np.broadcast_to(
    (np.ones((B, S)) if attn_mask is None else attn_mask)[..., None],
    (B, S, cfg.coe.num_experts_per_tok),
  ).astype(bool)
  dropped = ((~kept) & real).reshape(cfg.num_layers, cfg.coe.num_iterations, -1).sum(
    -1
  ) / real.sum()
  np.testing.assert_allclose(np.asarray(aux.layers.dropped_fraction), dropped, rtol=1e-6)
  if variant == "dropless_padded_packed":
    # Changing the padded tokens' ids changes nothing at the real positions (dropless).
    ids2 = ids.copy()
    ids2[attn_mask == 0] = (ids2[attn_mask == 0] + 7) % V
    logits2, _, _ = _forward(cfg, train)(
      params,
      jnp.asarray(ids2),
      jnp.asarray(attn_mask),
      jnp.asarray(positions),
      jnp.asarray(segment_ids),
    )
    real = attn_mask.astype(bool)
    np.testing.assert_allclose(
      np.asarray(logits2)[real], np.asarray(logits)[real], rtol=1e-5, atol=1e-5
    )


def test_train_and_eval_use_their_capacity_factors():
  cfg = FWD
  params, ids = _params(cfg, 2), jnp.asarray(_ids(2))
  tokens, k, n = B * S, cfg.coe.num_experts_per_tok, cfg.coe.n_routed_experts
  caps = {True: 4, False: 7}  # ceil(0.75 * 16 * 2 / 6), ceil(1.25 * 16 * 2 / 6)
  for train, cf in ((True, 0.75), (False, 1.25)):
    _, aux, inter = _forward(cfg, train)(params, ids, None, None, None)
    assert caps[train] == ref.capacity(tokens, k, n, cf, cfg.coe.min_capacity)
    expert_ids = np.asarray(inter["expert_ids"][0])  # [L, C, b, s, K]

    def keep(cap):
      return np.stack(
        [
          np.stack(
            [
              ref.keep_mask(expert_ids[l, t].reshape(tokens, k), n, cap).reshape(B, S, k)
              for t in range(cfg.coe.num_iterations)
            ]
          )
          for l in range(cfg.num_layers)
        ]
      )

    kept = np.asarray(inter["kept"][0])
    np.testing.assert_array_equal(kept, keep(caps[train]))
    assert (kept != keep(caps[not train])).any()  # the other mode's capacity would differ
    np.testing.assert_allclose(float(aux.dropped_fraction), 1 - kept.mean(), rtol=1e-6)
    assert float(aux.dropped_fraction) > 0


def test_scan_over_layers_equals_layer_by_layer():
  cfg = FWD
  params, ids = _params(cfg, 3), _ids(3)
  logits, aux, _ = _forward(cfg)(params, jnp.asarray(ids), None, None, None)
  positions = jnp.broadcast_to(jnp.arange(S), (B, S))
  mask = make_attention_mask(seq_len=S)
  layer = ref.fast_jit(lambda p, x: DecoderLayer(cfg).apply({"params": p}, x, positions, mask))
  x = jnp.asarray(np.asarray(params["embed_tokens"]["embedding"])[ids])
  aux_sum = 0.0
  for i in range(cfg.num_layers):
    x, (layer_aux, no_cache) = layer(
      jax.tree.map(lambda a: a[i], stack_layers(params)["layers"]), x
    )
    assert no_cache is None
    aux_sum += float(layer_aux.aux_loss)
  x = ref.rms_norm(ref.f64(x), ref.f64(params["norm"]["scale"]), cfg.rms_norm_eps)
  want = x @ ref.f64(params["lm_head"]["kernel"])
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(aux.aux_loss), aux_sum, rtol=1e-5)


def test_per_layer_and_stacked_params_compute_the_same_function():
  per_layer, stacked = FWD, FWD.replace(scan_layers=True)
  params, ids = _params(per_layer, 6), jnp.asarray(_ids(6))
  assert {"layers_0", "layers_1"} <= set(params) and "layers" not in params
  params_stacked = stack_layers(params)
  assert "layers" in params_stacked and not any(k.startswith("layers_") for k in params_stacked)
  want = unbox(jax.eval_shape(CoECausalLM(stacked).init, jax.random.key(0), ids))["params"]
  assert jax.tree.structure(params_stacked) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(unstack_layers(params_stacked)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # exact round trip
  for train in (False, True):
    got = _forward(per_layer, train)(params, ids, None, None, None)
    ref_out = _forward(stacked, train)(params_stacked, ids, None, None, None)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_out)):  # logits, aux, routing
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  (loss, _), grads = _train_step(per_layer)[0](params, *_batch(6))
  (loss_stacked, _), grads_stacked = _train_step(stacked)[0](params_stacked, *_batch(6))
  np.testing.assert_allclose(float(loss), float(loss_stacked), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(stack_layers(grads)), jax.tree.leaves(grads_stacked)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Gradients and compilation.
# ----------------------------------------------------------------------------

# Every value of every switch appears at least once here; the CoE-layer tests check
# gradients for all 16 (gate, inner, outer, style) combinations. The first entry is TINY
# itself, whose compiled step the jit and remat tests reuse.
GRAD_COMBOS = {
  "igate-inner-reference-capacity-C2-sh1": dict(),
  "sgate-noinner-outer-dropless-C3-sh0-bf16": dict(
    num_layers=1,
    independent_gates=False,
    inner_residual=False,
    outer_residual=True,
    num_iterations=3,
    n_shared_experts=0,
    dispatch="dropless",
    dtype="bfloat16",
  ),
  "igate-textbook-ragged-C1-sh2-normtopk-zloss-norope": dict(
    num_layers=1,
    residual_style="textbook",
    num_iterations=1,
    n_shared_experts=2,
    dispatch="dropless",
    dropless_impl="ragged_dot",
    norm_topk_prob=True,
    routed_scaling_factor=2.0,
    router_z_loss_coef=0.001,
    rope_scaling="none",
  ),
}


@pytest.mark.parametrize("name", list(GRAD_COMBOS))
def test_gradients_finite_for_switch_combinations(name):
  cfg = TINY.replace(**GRAD_COMBOS[name])
  params = _params(cfg, 4)
  step, _ = _train_step(cfg)
  (loss, (ce, aux)), grads = step(params, *_batch(4))
  assert np.isfinite(float(loss)) and float(aux.aux_loss) > 0
  np.testing.assert_allclose(
    float(loss), float(ce) + float(aux.aux_loss) + float(aux.z_loss), rtol=1e-6
  )
  if cfg.coe.router_z_loss_coef:
    assert float(aux.z_loss) > 0
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.isfinite(g).all(), jax.tree_util.keystr(path)
  # The router learns (through the combine weights and the load-balancing loss).
  assert np.abs(np.asarray(stack_layers(grads)["layers"]["mlp"]["router"])).max() > 0
  assert (
    np.abs(np.asarray(stack_layers(grads)["layers"]["mlp"]["routed_experts"]["down_proj"])).max()
    > 0
  )


def test_jit_of_forward_and_backward_traces_once():
  params = _params(TINY, 5)
  step, traces = _train_step(TINY)
  before = traces["count"]
  for seed in (5, 6, 7):  # new data (and padding) of the same shape each call
    (loss, _), _ = step(params, *_batch(seed))
    assert np.isfinite(float(loss))
  assert traces["count"] - before <= 1
  assert traces["count"] == 1


def test_lm_gradient_matches_numpy_directional_derivative():
  # d loss along a random direction of every parameter: jax.grad vs a float64 central
  # difference of the numpy forward (train mode: capacity factor 1.25, padding mask).
  cfg = TINY
  params, (ids, labels, mask) = _params(cfg, 8), _batch(8)
  (loss, (ce, aux)), grads = _train_step(cfg)[0](params, ids, labels, mask)
  ids, labels, mask = np.asarray(ids), np.asarray(labels), np.asarray(mask)

  def numpy_loss(p):
    logits, aux_np, infos = ref.lm_forward(
      ref.flax_weights(p, cfg.num_layers),
      cfg,
      ids,
      mask,
      capacity_factor=cfg.coe.capacity_factor_train,
    )
    routing = [np.stack(i[name]) for i in infos for name in ("ids", "kept")]
    return ref.cross_entropy(logits, labels, mask) + aux_np, routing

  np.testing.assert_allclose(float(loss), numpy_loss(params)[0], rtol=1e-5)
  rng = np.random.default_rng(9)
  direction = jax.tree.map(lambda a: rng.normal(size=a.shape), params)
  eps = 1e-6  # float64: tiny steps keep every routing decision fixed
  shifted = lambda sign: jax.tree.map(lambda a, v: ref.f64(a) + sign * eps * v, params, direction)
  (up, routing_up), (down, routing_down) = numpy_loss(shifted(+1)), numpy_loss(shifted(-1))
  for a, b in zip(routing_up, routing_down):
    np.testing.assert_array_equal(a, b)  # no top-K / capacity decision flipped in between
  fd = (up - down) / (2 * eps)
  analytic = sum(
    float(np.sum(ref.f64(g) * v))
    for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))
  )
  assert abs(fd) > 1e-2
  np.testing.assert_allclose(analytic, fd, rtol=2e-3)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(remat):
  params, batch = _params(TINY, 5), _batch(5)
  (loss0, _), grads0 = _train_step(TINY)[0](params, *batch)
  (loss, _), grads = _train_step(TINY.replace(remat=remat))[0](params, *batch)
  np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
  for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-5, atol=1e-6)
