"""Parameter accounting: analytic counts per config, and each param's logical axes.

`count_params(config)` is the hand count of DESIGN.md 5; `tree_size(params)` counts
an initialised tree. Tests assert they agree. `param_axes(config)` names every
axis of every param (`coe_jax.nn.logical_axes`), which `training.sharding` lays
out by its rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from coe_jax.nn.model import CoECausalLM
from coe_jax.nn.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Parameter counts of one config.

  Attributes:
    total: every parameter.
    embedding: the input embedding [vocab, hidden].
    head: the untied output head [hidden, vocab].
    attention: MLA projections and their norm, all layers.
    routed_experts: N_routed SwiGLU experts, all layers.
    shared_experts: shared experts, all layers.
    routers: router weights, all layers (C per layer with independent gates).
    norms: RMSNorm scales outside attention (two per layer plus the final one).
    active_per_token: parameters a token touches in one forward pass: everything
      but the routed experts, plus min(C*K, N_routed) routed experts per layer
      (an upper bound: CoE may pick the same expert in two iterations).
  """

  total: int
  embedding: int
  head: int
  attention: int
  routed_experts: int
  shared_experts: int
  routers: int
  norms: int
  active_per_token: int

  @property
  def non_embedding(self) -> int:
    return self.total - self.embedding

  def bytes(self, dtype: str = "float32") -> int:
    return self.total * {"float32": 4, "bfloat16": 2}[dtype]


def attention_params_per_layer(cfg: ModelConfig) -> int:
  heads = cfg.num_heads
  q_proj = cfg.hidden_size * heads * cfg.q_head_dim
  kv_a = cfg.hidden_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
  kv_norm = cfg.kv_lora_rank
  kv_b = cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
  o_proj = heads * cfg.v_head_dim * cfg.hidden_size
  return q_proj + kv_a + kv_norm + kv_b + o_proj


def expert_params(cfg: ModelConfig) -> int:
  """One routed SwiGLU expert: gate, up and down projections."""
  return 3 * cfg.hidden_size * cfg.coe.moe_intermediate_size


def count_params(cfg: ModelConfig) -> ParamCounts:
  layers, coe = cfg.num_layers, cfg.coe
  embedding = cfg.vocab_size * cfg.hidden_size
  head = cfg.hidden_size * cfg.vocab_size
  attention = layers * attention_params_per_layer(cfg)
  routed = layers * coe.n_routed_experts * expert_params(cfg)
  shared = layers * 3 * cfg.hidden_size * coe.shared_intermediate_size
  routers = layers * coe.num_router_weights * coe.n_routed_experts * cfg.hidden_size
  norms = (2 * layers + 1) * cfg.hidden_size
  total = embedding + head + attention + routed + shared + routers + norms
  active_experts = min(coe.num_iterations * coe.num_experts_per_tok, coe.n_routed_experts)
  active = total - routed + layers * active_experts * expert_params(cfg)
  return ParamCounts(
    total=total,
    embedding=embedding,
    head=head,
    attention=attention,
    routed_experts=routed,
    shared_experts=shared,
    routers=routers,
    norms=norms,
    active_per_token=active,
  )


def param_axes(cfg: ModelConfig) -> Any:
  """The params' tree with a `PartitionSpec` of logical axis names at every leaf.

  Read from the boxes `CoECausalLM(cfg).init` creates, traced only (nothing is
  allocated): e.g. `param_axes(cfg)["layers_0"]["mlp"]["routed_experts"]["gate_proj"]`
  is `PartitionSpec('expert', 'embed', 'mlp')`.
  """
  ids = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(CoECausalLM(cfg).init, jax.random.key(0), ids)
  return nn.get_partition_spec(abstract)["params"]


def tree_size(params) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def format_counts(counts: ParamCounts) -> str:
  """One human-readable line per count, in millions."""
  rows = [(f.name, getattr(counts, f.name)) for f in dataclasses.fields(counts)]
  rows.append(("non_embedding", counts.non_embedding))
  return "\n".join(f"  {name:<18s} {value:>14,d}  ({value / 1e6:8.2f}M)" for name, value in rows)
