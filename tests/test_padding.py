"""Padded rows as the reference trains them (DESIGN.md 6, `model.pad_semantics`).

The reference right-pads every row with its end-of-text id, scores
`loss_mask = attention_mask[:, :-1]` (the last real token predicts the first
pad), zeroes a pad's attention output (flash-attention's unpad/pad) and routes
pads like any token. These tests hold our row layout and the gradient of our
training objective on such a batch to an independent numpy version of theirs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from model_helpers import tiny_model_config

from coe_jax.data.tokenized import Split
from coe_jax.nn.model import CoECausalLM
from coe_jax.nn.model_config import ModelConfig
from coe_jax.training.train_step import next_token_targets, training_objective

EOS, PAD, V, S = 1, 0, 40, 10
CONFIG = tiny_model_config(vocab_size=V, min_capacity=4, dispatch="dropless")


def _split(texts: list[list[int]], eos_pad_id=EOS) -> Split:
  """A split of `texts` (token ids), each followed by EOS and cut to S, as `encode` makes it."""
  examples = [(t + [EOS])[:S] for t in texts]
  offsets = np.concatenate([[0], np.cumsum([len(e) for e in examples])]).astype(np.int64)
  return Split(
    tokens=np.concatenate(examples).astype(np.int32),
    offsets=offsets,
    rows=np.arange(len(examples) + 1, dtype=np.int64),
    max_length=S,
    pad_id=PAD,
    packed=False,
    eos_pad_id=eos_pad_id,
  )


TEXTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], list(range(20, 32))]  # the last is truncated


def _reference_rows(texts):
  """The reference's (input_ids, attention_mask): text, then EOS pads (mask 0), cut to S."""
  ids = np.full((len(texts), S), EOS, np.int32)
  mask = np.zeros((len(texts), S), np.int32)
  for row, text in enumerate(texts):
    n = min(len(text), S)
    ids[row, :n], mask[row, :n] = text[:n], 1
  return ids, mask


def test_rows_are_laid_out_and_scored_as_the_references():
  batch = _split(TEXTS).batch(range(len(TEXTS)))
  ids, mask = _reference_rows(TEXTS)
  np.testing.assert_array_equal(batch["input_ids"], ids)
  np.testing.assert_array_equal(batch["attention_mask"], mask)
  _, weights = next_token_targets(jax.tree.map(jnp.asarray, batch))
  np.testing.assert_array_equal(np.asarray(weights), mask[:, :-1])  # their loss_mask
  # The first row's last real token (8) predicts the EOS; the truncated row has no EOS target.
  assert batch["input_ids"][0, 4] == EOS and weights[0, 3] == 1 and weights[0, 4] == 0
  assert EOS not in batch["input_ids"][2]


def test_our_own_layout_keeps_the_end_of_text_a_real_token_with_the_same_targets():
  ours = _split(TEXTS, eos_pad_id=None).batch(range(len(TEXTS)))
  theirs = _split(TEXTS).batch(range(len(TEXTS)))
  assert ours["attention_mask"][0, 4] == 1 and ours["input_ids"][0, 5] == PAD
  weights = [
    np.asarray(next_token_targets(jax.tree.map(jnp.asarray, b))[1]) for b in (ours, theirs)
  ]
  np.testing.assert_array_equal(*weights)


def _batch():
  return jax.tree.map(jnp.asarray, _split(TEXTS[:2]).batch(range(2)))


@functools.lru_cache(maxsize=None)
def _objective_and_grad(cfg: ModelConfig):
  """The train step's objective (`training_objective`) and its gradient, jitted."""

  def objective(params, batch):
    return training_objective(CoECausalLM(cfg), params, batch)[0]

  return jax.jit(jax.value_and_grad(objective))


def _their_objective(params, cfg, ids, mask):
  """The reference trainer's objective in float64 numpy: CE at loss_mask = mask[:, :-1] plus
  the balance losses, pads' positions as theirs (cumsum(mask) - 1, clamped at 0)."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  logits, aux, _ = ref.lm_forward(
    ref.flax_weights(params, cfg.num_layers), cfg, ids, mask, positions=positions
  )
  return ref.cross_entropy(logits[:, :-1], ids[:, 1:], mask[:, :-1]) + aux


def _leaf_directional_derivatives(params, cfg, ids, mask, seed=0, eps=1e-6):
  """Per parameter leaf: (path, direction) and the float64 central difference along it."""
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  base = [ref.f64(leaf) for _, leaf in flat]
  for i, (path, leaf) in enumerate(flat):
    direction = rng.normal(size=leaf.shape)
    shifted = lambda sign: treedef.unflatten(
      [b + sign * eps * direction if j == i else b for j, b in enumerate(base)]
    )
    up = _their_objective(shifted(+1), cfg, ids, mask)
    down = _their_objective(shifted(-1), cfg, ids, mask)
    yield jax.tree_util.keystr(path), direction, (up - down) / (2 * eps)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_objective_and_every_gradient_on_a_padded_batch_equal_the_references(dispatch):
  # capacity: a factor at which nothing drops, so it computes the dropless function.
  cfg = CONFIG.replace(dispatch=dispatch, capacity_factor_train=100.0)
  params = ref.random_params(CoECausalLM(cfg).init, jnp.zeros((1, S), jnp.int32), seed=3)
  batch = _batch()
  loss, grads = _objective_and_grad(cfg)(params, batch)
  ids, mask = (np.asarray(batch[k]) for k in ("input_ids", "attention_mask"))
  np.testing.assert_allclose(float(loss), _their_objective(params, cfg, ids, mask), rtol=1e-6)
  grad_leaves = [ref.f64(g) for g in jax.tree.leaves(grads)]
  checked = 0
  for (name, direction, fd), grad in zip(
    _leaf_directional_derivatives(params, cfg, ids, mask), grad_leaves
  ):
    analytic = float(np.sum(grad * direction))
    # float32 gradients against float64 differences: 4.3e-5 at worst here; the old 'masked'
    # semantics move the router's gradient by ~3e-3 (the test below).
    assert abs(analytic - fd) <= 3e-4 * abs(fd) + 1e-9, (name, analytic, fd)
    checked += 1
  assert checked == len(grad_leaves)


def test_masked_padding_trains_a_different_router_than_the_reference():
  # The option (and the semantics of runs saved before it) differs where logits cannot see:
  # the router's gradient on a padded batch.
  params = ref.random_params(CoECausalLM(CONFIG).init, jnp.zeros((1, S), jnp.int32), seed=3)
  batch = _batch()
  grads = {
    semantics: _objective_and_grad(CONFIG.replace(pad_semantics=semantics))(params, batch)[1]
    for semantics in ("reference", "masked")
  }
  router = [np.asarray(g["layers_1"]["mlp"]["router"]) for g in grads.values()]
  # ~3e-3 here (with N(0, 0.3) weights cross-entropy dominates the router's gradient; at the
  # 0.02 init of a real run the balance loss's share, and the gap, is far larger): far above
  # float32 rounding (~1e-6) either way.
  assert np.linalg.norm(router[0] - router[1]) > 1e-3 * np.linalg.norm(router[0])
