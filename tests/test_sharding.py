"""Sharded training on 8 CPU devices equals single-device training (coe_jax.training.sharding).

The device count is an XLA flag that must be set before jax is imported, so the
multi-device checks run once, in a subprocess that executes this very file as
a script (`python tests/test_sharding.py OUT.json`) under
`XLA_FLAGS=--xla_force_host_platform_device_count=8`; the tests below assert
on the JSON it writes. The mesh-shape tests run in-process; the layout rules
are tested on abstract meshes in test_layout_rules.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MESHES = ((8, 1), (2, 4), (1, 8))  # (data, expert)
FSDP_MESH = dict(data=2, fsdp=2, expert=2)
TRAIN_MESH = (2, 4)
TRAIN_STEPS = 3
FP32_RTOL = 2e-5
WORKER_FLAGS = (
  "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
  "--xla_llvm_disable_expensive_passes=true"
)


# ---------------------------------------------------------------------------
# The worker (runs in the subprocess with 8 devices)
# ---------------------------------------------------------------------------


def _worker_config():
  from coe_jax.nn.model_config import ModelConfig

  # C=2, K=2 of 8 routed + 1 shared. capacity_factor = N/K gives capacity = tokens:
  # nothing drops, so the per-device capacity of a mesh cannot change the result.
  return ModelConfig().replace(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    num_iterations=2,
    capacity_factor_train=4.0,
    capacity_factor_eval=4.0,
    rope_original_max_position=16,
    initializer_range=0.1,
    dispatch="capacity",
  )  # the training check below routes dropless


def _worker_batch(batch=8, seq=16, vocab=64):
  rng = np.random.default_rng(0)
  mask = np.ones((batch, seq), np.int32)
  mask[0, 10:] = 0  # some padding, which must take no capacity on any mesh
  return dict(
    input_ids=rng.integers(0, vocab, (batch, seq)).astype(np.int32),
    attention_mask=mask,
    segment_ids=np.ones((batch, seq), np.int32),
    positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
  )


def _max_relative_error(tree, reference_tree) -> float:
  import jax

  errors = [
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(b))) + 1e-30))
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference_tree))
  ]
  return max(errors)


def _max_norm_relative_error(tree, reference_tree) -> float:
  """max over leaves of ||a - b|| / ||b||."""
  import jax

  errors = [
    float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / (np.linalg.norm(np.asarray(b)) + 1e-30))
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference_tree))
  ]
  return max(errors)


def _loss_and_grad_results(model_config, params, batch) -> dict:
  """Loss and gradients on one device and on every mesh of MESHES."""
  import jax

  from coe_jax.nn.model import CoECausalLM
  from coe_jax.nn.params import param_axes
  from coe_jax.training import sharding, train_step

  def value_and_grad_fn(expert_parallel):
    model = CoECausalLM(model_config, expert_parallel=expert_parallel)

    def loss_fn(params_, batch_):
      logits, aux = model.apply(
        {"params": params_},
        batch_["input_ids"],
        batch_["attention_mask"],
        batch_["positions"],
        batch_["segment_ids"],
        train=True,
      )
      ce_sum, count = train_step.cross_entropy_sum(logits, batch_)
      return ce_sum / count + aux.aux_loss + aux.z_loss

    return jax.value_and_grad(loss_fn)

  loss, grads = jax.jit(value_and_grad_fn(None))(params, batch)
  results = {"single": {"loss": float(loss)}}
  meshes = {f"{d}x{e}": dict(data=d, expert=e) for d, e in MESHES}
  meshes["fsdp"] = FSDP_MESH
  for name, axes in meshes.items():
    parallel = sharding.Parallelism(sharding.make_mesh(**axes), param_axes(model_config))
    shardings = sharding.state_shardings(params, parallel.mesh, parallel.axes_tree)
    sharded_params = jax.device_put(params, shardings)
    sharded_batch = parallel.shard_batch(batch)
    value_and_grad = value_and_grad_fn(parallel.expert_parallel())
    compiled = (
      sharding.MeshJit(jax.jit(value_and_grad), parallel)
      .lower(sharded_params, sharded_batch)
      .compile()
    )
    mesh_loss, mesh_grads = compiled(sharded_params, sharded_batch)
    hlo = compiled.as_text()
    results[name] = dict(
      loss=float(mesh_loss),
      grad_rel_error=_max_relative_error(mesh_grads, grads),
      has_all_to_all="all-to-all" in hlo,
      has_all_gather="all-gather" in hlo,
      head_spec=[str(a) for a in sharded_params["lm_head"]["kernel"].sharding.spec],
    )
  return results


def _training_results(model_config, batch) -> dict:
  """TRAIN_STEPS AdamW steps on one device and on the TRAIN_MESH, as train.py runs them."""
  import jax
  import ml_collections

  from coe_jax import config_lib
  from coe_jax.nn.model import CoECausalLM
  from coe_jax.nn.params import param_axes
  from coe_jax.training import sharding, train_step

  train_config = config_lib.build("tiny").train
  train_config.lr, train_config.warmup_fraction = 1e-2, 0.0
  runs = {}
  mesh_config = ml_collections.ConfigDict(dict(data=TRAIN_MESH[0], fsdp=1, expert=TRAIN_MESH[1]))
  for name, parallel in (
    ("single", sharding.Parallelism(None)),
    ("mesh", sharding.Parallelism(sharding.make_mesh(**mesh_config), param_axes(model_config))),
  ):
    model = CoECausalLM(
      model_config.replace(dispatch="dropless"), expert_parallel=parallel.expert_parallel()
    )
    state = parallel.init_state(lambda: train_step.init_train_state(model, train_config, 0, 16))
    step = parallel.jit_train_step(train_step.make_train_step(model, grad_accum_steps=2), state)
    losses = []
    for i in range(TRAIN_STEPS):
      state, metrics = step(state, parallel.shard_batch(batch), jax.random.key(i))
      losses.append(float(metrics["loss"]))
    runs[name] = dict(losses=losses, state=state)
  mesh_state = runs["mesh"]["state"]
  routed = mesh_state.params["layers_0"]["mlp"]["routed_experts"]["gate_proj"]
  moment = _leaf_at(mesh_state.opt_state, ("mu", "routed_experts", "gate_proj"))
  return dict(
    single_losses=runs["single"]["losses"],
    mesh_losses=runs["mesh"]["losses"],
    param_rel_error=_max_norm_relative_error(mesh_state.params, runs["single"]["state"].params),
    expert_param_spec=[str(a) for a in routed.sharding.spec],
    expert_moment_spec=[str(a) for a in moment.sharding.spec],
    expert_shard_shape=list(routed.addressable_shards[0].data.shape),
    expert_global_shape=list(routed.shape),
  )


def _leaf_at(tree, names):
  """The first leaf of `tree` whose path mentions every one of `names`."""
  import jax

  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = {str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path}
    if set(names) <= keys:
      return leaf
  raise KeyError(names)


def run_worker(out_path: str) -> None:
  import flax.linen as nn
  import jax

  from coe_jax.nn.model import CoECausalLM

  assert jax.device_count() == 8, jax.devices()
  cfg = _worker_config()
  batch = _worker_batch()
  model = CoECausalLM(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch["input_ids"][:1]))["params"]
  results = dict(
    loss_and_grad=_loss_and_grad_results(cfg, params, batch), training=_training_results(cfg, batch)
  )
  Path(out_path).write_text(json.dumps(results, indent=2))


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding") / "results.json"
  repo = Path(__file__).resolve().parents[1]
  env = dict(
    os.environ,
    XLA_FLAGS=WORKER_FLAGS,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run(
    [sys.executable, __file__, str(out)],
    env=env,
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize("shape", MESHES, ids=[f"{d}x{e}" for d, e in MESHES])
def test_mesh_loss_and_gradients_match_one_device(worker_results, shape):
  runs = worker_results["loss_and_grad"]
  mesh = runs[f"{shape[0]}x{shape[1]}"]
  np.testing.assert_allclose(mesh["loss"], runs["single"]["loss"], rtol=FP32_RTOL)
  assert mesh["grad_rel_error"] < 1e-4, mesh
  # Tokens reach sharded experts by all-to-all, and only when experts are split.
  assert mesh["has_all_to_all"] == (shape[1] > 1)


def test_fsdp_mesh_matches_one_device_and_gathers_split_params(worker_results):
  runs = worker_results["loss_and_grad"]
  fsdp = runs["fsdp"]
  np.testing.assert_allclose(fsdp["loss"], runs["single"]["loss"], rtol=FP32_RTOL)
  assert fsdp["grad_rel_error"] < 1e-4, fsdp
  assert "fsdp" in fsdp["head_spec"]
  assert fsdp["has_all_gather"] and fsdp["has_all_to_all"]


def test_training_on_2x4_mesh_matches_one_device(worker_results):
  training = worker_results["training"]
  # Measured with the batch and init drawn from seeds 0, 1, 2: losses agree to 3.3e-7 and fall
  # by 1.03-1.06 in the 3 steps.
  np.testing.assert_allclose(training["mesh_losses"], training["single_losses"], rtol=1e-4)
  assert training["single_losses"][-1] < training["single_losses"][0]  # it does train
  # Adam divides each gradient by its own magnitude, so an element whose gradient is near zero
  # turns reduction-order rounding into a visible step: over the same seeds the worst element
  # differed by 8.6e-5, 9.5e-4 (!), 3.1e-5 of its leaf's largest value, so a max-element bound
  # is no margin across machines; per leaf in norm, ||mesh - single|| / ||single|| was at most
  # 4.1e-6, 1.1e-4, 3.3e-6. A sharding bug changes the steps themselves (each of size ~lr, as
  # large as the N(0, 0.02) init after 3 steps at lr 1e-2), far above 1e-2.
  assert training["param_rel_error"] < 1e-2, training["param_rel_error"]


def test_expert_params_and_adam_moments_are_split_over_expert_axis(worker_results):
  training = worker_results["training"]
  # Layer 0's routed experts, [E, d, f] (per-layer params): E is split over `expert`.
  assert training["expert_param_spec"][0] == "expert"
  assert training["expert_moment_spec"] == training["expert_param_spec"]
  global_shape, shard_shape = training["expert_global_shape"], training["expert_shard_shape"]
  assert shard_shape[0] * TRAIN_MESH[1] == global_shape[0]


def test_mesh_shape_fills_the_free_axis_and_rejects_bad_shapes():
  from coe_jax.nn.model_config import ConfigError
  from coe_jax.training.sharding import mesh_shape

  assert mesh_shape(-1, 1, 4, 8) == (2, 1, 4)
  assert mesh_shape(2, -1, 2, 8) == (2, 2, 2)
  with pytest.raises(ConfigError, match="mesh"):
    mesh_shape(-1, 1, 3, 8)
  with pytest.raises(ConfigError, match="at most one"):
    mesh_shape(-1, -1, 1, 8)
  with pytest.raises(ConfigError, match="mesh.expert"):
    mesh_shape(1, 1, 0, 8)


def test_validate_for_mesh_names_the_field_and_the_allowed_values():
  from jax.sharding import AbstractMesh

  from coe_jax.nn.model_config import ConfigError, ModelConfig
  from coe_jax.training.sharding import MESH_AXES, validate_for_mesh

  mesh = AbstractMesh((2, 1, 4), MESH_AXES)
  with pytest.raises(
    ConfigError, match=r"mesh.expert: got 4; must divide model.n_routed_experts=63"
  ):
    validate_for_mesh(mesh, ModelConfig(), {})
  cfg = ModelConfig().replace(n_routed_experts=8)
  with pytest.raises(ConfigError, match="train.batch_size: got 12; must be divisible by .* 8"):
    validate_for_mesh(mesh, cfg, {"train.batch_size": 12})
  validate_for_mesh(mesh, cfg, {"train.batch_size": 16})


if __name__ == "__main__":
  run_worker(sys.argv[1])
