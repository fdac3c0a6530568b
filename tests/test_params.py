"""Tests for coe_jax.nn.params and coe_jax.nn.logical_axes: analytic counts vs real trees, the
paper's hand counts, and the logical axis names every param is created with."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy_reference as ref
import pytest
from jax.sharding import PartitionSpec as P
from model_helpers import tiny_model_config

from coe_jax.nn import logical_axes
from coe_jax.nn.model import CoECausalLM
from coe_jax.nn.model_config import ModelConfig
from coe_jax.nn.params import count_params, format_counts, param_axes, tree_size

SMALL = tiny_model_config(
  vocab_size=50, v_head_dim=6, n_routed_experts=7, moe_intermediate_size=12, num_iterations=1
)

CONFIGS = {
  "moe_C1": dict(),
  "coe_C2": dict(num_iterations=2),
  "shared_gate_C3": dict(num_iterations=3, independent_gates=False),
  "no_shared_C2": dict(num_iterations=2, n_shared_experts=0),
  "two_shared_C2_3layers": dict(num_iterations=2, n_shared_experts=2, num_layers=3),
}


def _subtree_size(params, *path):
  """Size of params[path[0]][path[1]]...; 'layers' sums over every decoder layer's tree."""
  if path[0] == "layers":
    trees = [v for k, v in params.items() if k == "layers" or k.startswith("layers_")]
    return sum(_subtree_size({"t": tree}, "t", *path[1:]) for tree in trees)
  for key in path:
    params = params[key]
  return tree_size(params)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_params_equals_initialised_tree(name):
  cfg = SMALL.replace(**CONFIGS[name])
  ids = jnp.zeros((1, 4), jnp.int32)
  if name == "shared_gate_C3":  # really initialise one (the model tests initialise others)
    params = ref.fast_jit(CoECausalLM(cfg).init)(jax.random.key(0), ids)["params"]
  else:  # the exact shapes `init` creates, without compiling it
    params = jax.eval_shape(CoECausalLM(cfg).init, jax.random.key(0), ids)["params"]
  params = nn.meta.unbox(params)
  counts = count_params(cfg)
  assert counts.total == tree_size(params)
  assert counts.embedding == _subtree_size(params, "embed_tokens")
  assert counts.head == _subtree_size(params, "lm_head")
  assert counts.attention == _subtree_size(params, "layers", "self_attn")
  assert counts.routed_experts == _subtree_size(params, "layers", "mlp", "routed_experts")
  assert counts.routers == _subtree_size(params, "layers", "mlp", "router")
  shared = (
    _subtree_size(params, "layers", "mlp", "shared_experts") if cfg.coe.n_shared_experts else 0
  )
  assert counts.shared_experts == shared
  assert counts.norms == (
    _subtree_size(params, "layers", "input_layernorm")
    + _subtree_size(params, "layers", "mlp", "norm")
    + _subtree_size(params, "norm")
  )
  assert counts.non_embedding == counts.total - counts.embedding
  assert counts.bytes("bfloat16") * 2 == counts.bytes("float32") == 4 * counts.total
  assert "routed_experts" in format_counts(counts)


def test_paper_moe_k8_n64_hand_count():
  cfg = ModelConfig()  # the paper's MoE(K=8, N=64): 63 routed + 1 shared, f = 704
  assert (
    cfg.vocab_size,
    cfg.hidden_size,
    cfg.num_layers,
    cfg.coe.n_routed_experts,
    cfg.coe.n_shared_experts,
    cfg.coe.num_experts_per_tok,
    cfg.coe.moe_intermediate_size,
  ) == (102400, 1024, 4, 63, 1, 8, 704)
  counts = count_params(cfg)
  assert counts.routed_experts == 4 * 63 * 3 * 1024 * 704 == 544_997_376  # "544M"
  attention = (
    1024 * 8 * 192  # q_proj: hidden -> 8 heads x (128 nope + 64 rope)
    + 1024 * 576  # kv_a_proj_with_mqa: hidden -> 512 latent + 64 rope
    + 512  # kv_a_layernorm
    + 512 * 8 * 256  # kv_b_proj: latent -> 8 heads x (128 nope + 128 v)
    + 1024 * 1024
  )  # o_proj: 8 x 128 -> hidden
  per_layer = (
    attention
    + 63 * 3 * 1024 * 704  # routed experts
    + 3 * 1024 * 704  # the shared expert
    + 63 * 1024  # one router (C = 1)
    + 2 * 1024
  )  # input_layernorm, post_attention_layernorm
  non_embedding = 4 * per_layer + 1024 + 1024 * 102400  # + final norm + untied head
  assert counts.non_embedding == non_embedding
  assert counts.total == non_embedding + 102400 * 1024
  assert counts.attention == 4 * attention
  # Active per token: everything but the routed experts, plus K = 8 of them per layer.
  assert counts.active_per_token == counts.total - counts.routed_experts + 4 * 8 * 3 * 1024 * 704


def test_coe_c2_k4_n48_saves_about_17_6_percent_of_parameters():
  moe = count_params(ModelConfig())
  coe_cfg = ModelConfig().replace(num_iterations=2, num_experts_per_tok=4, n_routed_experts=47)
  coe = count_params(coe_cfg)
  assert coe.routers == 4 * 2 * 47 * 1024  # two independent routers per layer
  assert coe.routed_experts == 4 * 47 * 3 * 1024 * 704
  saving = 100.0 * (1 - coe.total / moe.total)
  assert math.isclose(saving, 17.6, abs_tol=0.5), saving


KNOWN_NAMES = {
  value
  for key, value in vars(logical_axes).items()
  if key.isupper() and isinstance(value, str) and key != "BATCH"
}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_param_axis_has_a_logical_name(scan_layers):
  cfg = SMALL.replace(num_iterations=2, scan_layers=scan_layers)
  ids = jnp.zeros((1, 4), jnp.int32)
  boxed = jax.eval_shape(CoECausalLM(cfg).init, jax.random.key(0), ids)["params"]
  axes = param_axes(cfg)
  plain = nn.meta.unbox(boxed)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(plain)
  for spec, leaf in zip(jax.tree.leaves(axes), jax.tree.leaves(plain)):
    assert len(spec) == leaf.ndim and set(spec) <= KNOWN_NAMES, (spec, leaf.shape)
  layer = axes["layers"] if scan_layers else axes["layers_1"]
  stacked = ("layers",) if scan_layers else ()
  want = {
    ("mlp", "routed_experts", "gate_proj"): ("expert", "embed", "mlp"),
    ("mlp", "routed_experts", "down_proj"): ("expert", "mlp", "embed"),
    ("mlp", "shared_experts", "up_proj"): ("embed", "mlp"),
    ("mlp", "router"): ("chain", "expert_logits", "embed"),
    ("mlp", "norm", "scale"): ("norm",),
    ("self_attn", "q_proj", "kernel"): ("embed", "heads"),
    ("self_attn", "kv_a_proj_with_mqa", "kernel"): ("embed", "kv_lora"),
    ("self_attn", "kv_b_proj", "kernel"): ("kv_lora", "heads"),
    ("self_attn", "o_proj", "kernel"): ("heads", "embed"),
  }
  for path, names in want.items():
    node = layer
    for key in path:
      node = node[key]
    assert tuple(node) == stacked + names, path
  assert tuple(axes["embed_tokens"]["embedding"]) == ("vocab", "embed")
  assert tuple(axes["lm_head"]["kernel"]) == ("embed", "vocab")


def test_constrain_is_the_identity_without_rules_or_mesh():
  x = jnp.ones((2, 3, 4))
  names = ("batch", "length", "embed")
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  assert logical_axes.constrain(x, names) is x  # nothing set
  with nn.logical_axis_rules((("batch", "data"),)):
    assert logical_axes.constrain(x, names) is x  # rules, no mesh
  with jax.set_mesh(mesh):
    assert logical_axes.constrain(x, names) is x  # a mesh, no rules
    with nn.logical_axis_rules((("batch", "data"),)):
      traced = jax.make_jaxpr(lambda y: logical_axes.constrain(y, names))(x)
  assert "sharding_constraint" in str(traced)  # both: a constraint


def test_boxes_keep_their_names_in_nnx_metadata_without_sharding_at_creation():
  box = logical_axes.param_init(jnp.ones, ("embed", "mlp"))((2, 3))
  metadata = box.to_nnx_metadata()
  assert metadata["out_sharding"] == ("embed", "mlp") and metadata["eager_sharding"] is False
  assert box.names == ("embed", "mlp")  # the box itself is left as it was
  assert nn.get_partition_spec({"w": box})["w"] == P("embed", "mlp")
