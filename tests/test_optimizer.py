"""optimizer.fused_clip_adamw (train.fused_optimizer=True) against the optax chain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from coe_jax.training import optimizer


def _train_config(**changes):
  values = dict(
    fused_optimizer=True,
    grad_clip=1.0,
    lr=1e-2,
    b1=0.9,
    b2=0.95,
    weight_decay=0.1,
    warmup_fraction=0.25,
    steps=8,
    schedule="cosine",
  )
  values.update(changes)
  return ml_collections.ConfigDict(values)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "layer": {
      "experts": jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32),
      "norm": {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=(8,)), jnp.float32)},
    },
    "head": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
  }


@pytest.mark.parametrize(
  "changes",
  [dict(), dict(grad_clip=0.0), dict(grad_clip=100.0), dict(weight_decay=0.0, schedule="constant")],
)
def test_fused_optimizer_matches_the_optax_chain_over_steps(changes):
  cfg = _train_config(**changes)
  fused, reference = optimizer.make_optimizer(cfg), optimizer.make_reference_optimizer(cfg)
  params = _params()
  states = {"fused": (params, fused.init(params)), "reference": (params, reference.init(params))}
  assert jax.tree.structure(states["fused"][1]) == jax.tree.structure(states["reference"][1])
  rng = np.random.default_rng(1)

  def step(p, s, g, which):
    tx = fused if which == "fused" else reference
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  for i in range(6):  # gradients large enough that clipping at 1.0 triggers
    grads = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) * (3 if i % 2 else 0.01), jnp.float32), params
    )
    for which in states:
      states[which] = jax.jit(step, static_argnums=3)(*states[which], grads, which)
  for got, want in zip(jax.tree.leaves(states["fused"]), jax.tree.leaves(states["reference"])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=1e-7)
  assert not np.allclose(np.asarray(states["fused"][0]["head"]), np.asarray(params["head"]))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("decay_norm_scales", [True, False, None])
def test_weight_decay_reaches_norm_scales_exactly_when_asked(fused, decay_norm_scales):
  # None: a config without the field (a run saved before it): norm scales undecayed.
  cfg = _train_config(
    weight_decay=0.5, warmup_fraction=0.0, schedule="constant", lr=0.1, fused_optimizer=fused
  )
  if decay_norm_scales is not None:
    cfg.decay_norm_scales = decay_norm_scales
  tx = optimizer.make_optimizer(cfg)
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  decayed = lambda p: -0.1 * 0.5 * np.asarray(p)
  np.testing.assert_allclose(np.asarray(updates["head"]), decayed(params["head"]), rtol=1e-6)
  scale_update = np.asarray(updates["layer"]["norm"]["scale"])
  if decay_norm_scales:
    np.testing.assert_allclose(scale_update, decayed(params["layer"]["norm"]["scale"]), rtol=1e-6)
  else:
    np.testing.assert_array_equal(scale_update, 0.0)


def test_the_reference_weight_decay_is_the_config_default():
  from coe_jax import config_lib

  for scale in ("paper", "tiny"):
    assert config_lib.build(scale).train.decay_norm_scales is True


def test_fused_optimizer_needs_params():
  fused = optimizer.make_optimizer(_train_config())
  params = _params()
  with pytest.raises(ValueError, match="params"):
    fused.update(params, fused.init(params), None)


def test_the_fused_update_is_the_config_default():
  from coe_jax import config_lib

  for scale in ("paper", "tiny"):
    assert config_lib.build(scale).train.fused_optimizer is True


def test_a_config_without_the_field_keeps_the_optax_chain_bit_for_bit():
  cfg = _train_config()  # like the config.json of a run saved before the fused default
  del cfg["fused_optimizer"]
  params = _params()
  grads = jax.tree.map(lambda p: 3 * p, params)
  tx, reference = optimizer.make_optimizer(cfg), optimizer.make_reference_optimizer(cfg)
  got, _ = tx.update(grads, tx.init(params), params)
  want, _ = reference.update(grads, reference.init(params), params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
