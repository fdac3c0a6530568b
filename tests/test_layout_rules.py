"""The layout rules of coe_jax.training.sharding over the params' logical axes.

In-process, on abstract meshes (nothing is placed): how `mesh_spec` reads rules,
that `RULES` give the paper model the layout of the earlier path-and-shape rule,
and that Adam's moments are laid out like their params. test_sharding.py runs
the same rules on 8 devices.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from coe_jax import config_lib
from coe_jax.nn.model import CoECausalLM
from coe_jax.nn.model_config import ModelConfig
from coe_jax.nn.params import param_axes
from coe_jax.training import train_step
from coe_jax.training.sharding import MESH_AXES, mesh_spec, state_shardings

SMALL = ModelConfig().replace(
  vocab_size=64,
  hidden_size=32,
  num_layers=2,
  num_heads=2,
  kv_lora_rank=16,
  qk_nope_head_dim=8,
  qk_rope_head_dim=8,
  v_head_dim=8,
  n_routed_experts=8,
  num_experts_per_tok=2,
  moe_intermediate_size=16,
  num_iterations=2,
)


def test_mesh_spec_reads_rules_in_priority_order_and_skips_what_does_not_divide():
  sizes = dict(data=2, fsdp=4, expert=2)
  routed = ("expert", "embed", "mlp")
  assert mesh_spec(routed, (8, 32, 16), sizes) == P("expert", "fsdp", None)
  assert mesh_spec(("embed", "vocab"), (32, 64), sizes) == P(None, "fsdp")  # vocab before embed
  assert mesh_spec(("embed", "heads"), (32, 48), sizes) == P(None, "fsdp")  # heads before embed
  assert mesh_spec(("embed", "heads"), (32, 6), sizes) == P("fsdp", None)  # 4 does not divide 6
  assert mesh_spec(routed, (6, 30, 16), sizes) == P("expert", None, None)  # nor 30: replicated
  assert mesh_spec(("norm",), (32,), sizes) == P(None)  # no rule names it
  assert mesh_spec(("batch", "length", "embed"), (16, 8, 32), sizes) == P(
    ("data", "fsdp", "expert"), None, None
  )  # batch first, so activations keep their width whole
  tensor = (("mlp", "tensor"), ("embed", "fsdp"))  # a host's rules
  assert mesh_spec(routed, (8, 32, 16), dict(fsdp=2, tensor=2), tensor) == P(None, "fsdp", "tensor")
  assert mesh_spec(routed, (8, 32, 16), dict(fsdp=2), tensor) == P(None, "fsdp", None)  # no axis


def _largest_divisible_axis_rule(path_names, shape, axis_sizes):
  """The layout before logical axes: experts by path name, fsdp on the largest divisible axis."""
  spec = [None] * len(shape)
  if "routed_experts" in path_names and len(shape) >= 3 and axis_sizes["expert"] > 1:
    spec[len(shape) - 3] = "expert"
  fsdp = axis_sizes["fsdp"]
  if fsdp > 1 and len(shape) >= 2:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "fsdp"
  return tuple(spec)


@pytest.mark.parametrize("fsdp,expert", [(8, 1), (8, 7), (4, 9)])
def test_rules_give_the_paper_model_the_layout_of_the_earlier_rule(fsdp, expert):
  # the paper's CoE(C=2, K=4), N=64
  cfg = ModelConfig().replace(num_iterations=2, num_experts_per_tok=4)
  axes_tree = param_axes(cfg)
  mesh = AbstractMesh((1, fsdp, expert), MESH_AXES)
  abstract = _abstract_params(cfg)
  shardings = state_shardings(abstract, mesh, axes_tree)
  sizes = dict(data=1, fsdp=fsdp, expert=expert)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings)):
    names = [str(entry.key) for entry in path]
    got = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
    got = tuple(None if sizes.get(a, 2) == 1 else a for a in got)  # size-1 axes split nothing
    assert got == _largest_divisible_axis_rule(names, leaf.shape, sizes), (names, leaf.shape)


def _abstract_params(cfg):
  ids = jnp.zeros((1, 8), jnp.int32)
  return nn.meta.unbox(jax.eval_shape(CoECausalLM(cfg).init, jax.random.key(0), ids))["params"]


def test_adam_moments_are_laid_out_like_their_params_and_counts_replicated():
  model = CoECausalLM(SMALL)
  state = jax.eval_shape(
    lambda: train_step.init_train_state(model, config_lib.build("tiny").train, 0, 8)
  )
  mesh = AbstractMesh((1, 2, 2), MESH_AXES)
  shardings = state_shardings(state, mesh, param_axes(SMALL))
  assert shardings.step.spec == P()
  gate = shardings.params["layers_1"]["mlp"]["routed_experts"]["gate_proj"].spec
  assert gate == P("expert", "fsdp", None)
  wanted = "['layers_1']['mlp']['routed_experts']['gate_proj']"
  moments = [
    leaf.spec
    for path, leaf in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]
    if jax.tree_util.keystr(path).endswith(wanted)
  ]
  assert moments == [gate, gate]  # Adam's mu and nu
  counts = [leaf.spec for leaf in jax.tree.leaves(shardings.opt_state) if leaf.spec == P()]
  assert counts  # the step counts, replicated
