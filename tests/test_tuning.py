"""Kernel policies follow the platform the program is compiled for (coe_jax.nn.tuning)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from coe_jax.nn import dispatch as dispatch_lib
from coe_jax.nn import tuning
from coe_jax.nn.coe_config import CoEConfig
from coe_jax.nn.coe_layer import CoELayer
from coe_jax.nn.model_config import ConfigError, ModelConfig

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def _gpu_mesh() -> AbstractMesh:
  return AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=H100)


def test_explicit_platform_wins_and_names_are_normalised():
  assert tuning.target_platform("gpu") == "gpu"
  assert tuning.target_platform("cuda") == "gpu"
  assert tuning.target_platform("") == jax.devices()[0].platform  # off-mesh: the default device
  with jax.sharding.use_abstract_mesh(_gpu_mesh()):
    assert tuning.target_platform("") == "gpu"
    assert tuning.target_platform("cpu") == "cpu"


def test_the_mesh_devices_decide_inside_jit_and_shard_map():
  seen = []

  def f(x):
    seen.append(tuning.target_platform())
    return x + 1

  with jax.sharding.use_abstract_mesh(_gpu_mesh()):
    jax.make_jaxpr(f)(jnp.ones(2))
    mesh = jax.sharding.get_abstract_mesh()
    jax.make_jaxpr(jax.shard_map(f, mesh=mesh, in_specs=jax.P("data"), out_specs=jax.P("data")))(
      jnp.ones(2)
    )
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    jax.make_jaxpr(f)(jnp.ones(2))
  assert seen == ["gpu", "gpu", "cpu"]


def test_target_platform_is_a_validated_execution_field():
  assert ModelConfig().replace(target_platform="gpu").coe.target_platform == "gpu"
  with pytest.raises(ConfigError, match=r"model\.target_platform"):
    ModelConfig().replace(target_platform="cuda")


def test_tiling_and_tiles_per_step_follow_the_target():
  paper = 3 * 1024 * 704 * 4
  assert tuning.default_tiling(512 * 4, 63, paper, platform="cpu") == tuple(range(8, 121, 8))
  assert tuning.default_tiling(512 * 4, 63, paper, platform="gpu") == (40,)
  with jax.sharding.use_abstract_mesh(_gpu_mesh()):
    assert tuning.default_tiling(512 * 4, 63, paper) == (40,)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_forcing_the_platform_in_the_config_traces_that_platforms_form(monkeypatch, platform):
  calls = []
  real = dispatch_lib.blocked_dispatch

  def spy(*args, **kwargs):
    calls.append((args[4], args[5]))  # tile sizes, tiles per step
    return real(*args, **kwargs)

  monkeypatch.setattr(dispatch_lib, "blocked_dispatch", spy)
  cfg = CoEConfig(
    hidden_size=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    dropless_impl="blocked",
    target_platform=platform,
  )
  layer = CoELayer(cfg)
  h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 64)), jnp.float32)
  params = jax.eval_shape(layer.init, jax.random.key(0), h)
  jax.eval_shape(lambda p: layer.apply(p, h, train=True), params)
  sizes, per_step = calls[-1]
  if platform == "cpu":
    assert len(sizes) > 1 and per_step == 1  # last tiles of several sizes, one tile a step
  else:
    assert len(sizes) == 1 and per_step > 1  # whole tiles, many a step
