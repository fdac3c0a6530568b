"""Tests for coe_jax.analysis against the model: the sown routing agrees with the statistics
CoEAux logs in training; loading runs and texts."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import numpy_reference as ref
import pytest
from flax.core.meta import unbox
from model_helpers import tiny_model_config

from coe_jax import analysis
from coe_jax.nn.model import CoECausalLM

N = 6  # routed experts of TINY

# ----------------------------------------------------------------------------
# Against the model: the sown routing agrees with the statistics CoEAux logs in training
# ----------------------------------------------------------------------------

B, S, V = 2, 8, 40
TINY = tiny_model_config(
  vocab_size=V,
  n_routed_experts=N,
  capacity_factor_train=0.75,
  capacity_factor_eval=1.0,
  dispatch="capacity",
)


def _batch(seed=0):
  ids = np.random.default_rng(seed).integers(0, V, size=(B, S)).astype(np.int32)
  mask = np.ones((B, S), np.int32)
  mask[1, 5:] = 0
  return {
    "input_ids": ids,
    "attention_mask": mask,
    "segment_ids": mask.copy(),
    "positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)),
  }


def _assert_matches_aux(routing: analysis.Routing, aux_layers) -> None:
  stats = analysis.analyze(routing)
  np.testing.assert_allclose(stats.load.counts, aux_layers.expert_load)
  np.testing.assert_allclose(stats.load.cv, aux_layers.load_cv, rtol=1e-5)
  np.testing.assert_allclose(stats.confidence.entropy, aux_layers.router_entropy, rtol=1e-5)
  np.testing.assert_allclose(stats.drops.counts, aux_layers.expert_dropped)
  np.testing.assert_allclose(stats.drops.fraction, aux_layers.dropped_fraction, rtol=1e-6)


@pytest.mark.parametrize("pad_semantics", ["reference", "masked"])
@pytest.mark.parametrize("train", [False, True])
def test_collect_routing_agrees_with_model_aux(train, pad_semantics):
  model = CoECausalLM(TINY.replace(pad_semantics=pad_semantics))
  params = ref.random_params(model.init, jnp.zeros((B, S), jnp.int32), seed=0)
  batch = _batch()
  routing = analysis.collect_routing(model, {"params": params}, batch, train=train)
  assert routing.expert_ids.shape == (TINY.num_layers, 2, B, S, 2)
  assert routing.router_probs.shape == (TINY.num_layers, 2, B, S, N)
  assert routing.num_tokens == batch["attention_mask"].sum()
  # 'masked' pads take no capacity; the reference's are routed like any token (statistics
  # still count real tokens only).
  assert routing.kept[:, :, 1, 5:].any() == (pad_semantics == "reference")
  forward = ref.fast_jit(functools.partial(model.apply, train=train))
  _, aux = forward(
    {"params": params},
    batch["input_ids"],
    batch["attention_mask"],
    batch["positions"],
    batch["segment_ids"],
  )
  assert float(aux.layers.dropped_fraction.max()) > 0  # the capacity factors do drop
  _assert_matches_aux(routing, jax.device_get(aux.layers))


def _train_state(model: CoECausalLM, config: ml_collections.ConfigDict, seed: int = 0):
  """`train_step.init_train_state` with a jitted init (eager init costs seconds of CPU)."""
  from coe_jax.training import optimizer, train_step

  init = ref.fast_jit(model.init)
  params = unbox(init(jax.random.key(seed), jnp.zeros((1, S), jnp.int32)))["params"]
  return train_step.TrainState.create(params, optimizer.make_optimizer(config.train))


def _train_config() -> ml_collections.ConfigDict:
  from coe_jax import config_lib

  config = config_lib.build("tiny", **TINY.to_dict())
  config.data.max_length = S
  return config


def test_train_step_logs_per_iteration_routing_stats():
  from coe_jax.training import train_step

  model = CoECausalLM(TINY)
  state = _train_state(model, _train_config())
  batch = _batch(seed=2)
  with_stats = train_step.make_train_step(model, grad_accum_steps=2, log_routing_stats=True)
  without = train_step.make_train_step(model, grad_accum_steps=2, log_routing_stats=False)
  rng = jax.random.key(0)
  shapes = jax.eval_shape(without, state, batch, rng)[1]
  assert not any(name.endswith("_iter") for name in shapes)
  _, metrics = ref.fast_jit(with_stats)(state, batch, rng)
  # Per iteration, averaged over layers and the two micro-batches (rows 0 and 1).
  micro = [
    analysis.analyze(
      analysis.collect_routing(
        model, {"params": state.params}, {k: v[i : i + 1] for k, v in batch.items()}, train=True
      )
    )
    for i in range(2)
  ]
  expected = {
    "load_cv_iter": np.mean([m.load.cv for m in micro], axis=(0, 1)),
    "router_entropy_iter": np.mean([m.confidence.entropy for m in micro], axis=(0, 1)),
    "dropped_fraction_iter": np.mean([m.drops.fraction for m in micro], axis=(0, 1)),
  }
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------
# Loading runs and texts
# ----------------------------------------------------------------------------


def test_load_run_restores_the_checkpointed_params(tmp_path):
  from coe_jax.training.checkpoint import Checkpointer, save_run_config

  config = _train_config()
  model = CoECausalLM(TINY)
  state = _train_state(model, config, seed=3)
  checkpointer = Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(7, state, {"position": 0})
  checkpointer.close()
  save_run_config(str(tmp_path), json.loads(config.to_json_best_effort()))
  run = analysis.load_run(str(tmp_path))
  assert run.step == 7
  assert run.model.config == TINY
  restored = jax.tree.leaves(run.variables["params"])
  for restored_leaf, saved_leaf in zip(restored, jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(restored_leaf, saved_leaf)


def test_encode_texts_pads_and_masks():
  from coe_jax.data.tokenizer import pad_id, train_bpe

  tok = train_bpe(["query : one plus one response : two"] * 4, vocab_size=300)
  texts = ["one plus one", "query : one plus one response : two two two"]
  batch = analysis.encode_texts(tok, texts, max_length=6)
  lengths = [min(len(tok.encode(t, add_special_tokens=False).ids), 6) for t in texts]
  np.testing.assert_array_equal(batch["attention_mask"].sum(1), lengths)
  assert (batch["input_ids"][0, lengths[0] :] == pad_id(tok)).all()
  assert batch["input_ids"].shape == batch["positions"].shape == (2, 6)
