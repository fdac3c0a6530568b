"""The tiny model the model-level tests share (plain helpers, imported like numpy_reference)."""

from __future__ import annotations

from typing import Any

from coe_jax.nn.model_config import ModelConfig

TINY_FIELDS = dict(
  vocab_size=48,
  hidden_size=16,
  num_layers=2,
  num_heads=2,
  kv_lora_rank=8,
  qk_nope_head_dim=4,
  qk_rope_head_dim=4,
  v_head_dim=4,
  n_routed_experts=6,
  n_shared_experts=1,
  num_experts_per_tok=2,
  moe_intermediate_size=8,
  num_iterations=2,
  initializer_range=0.2,
  min_capacity=1,
)


def tiny_model_config(**changes: Any) -> ModelConfig:
  """A 2-layer CoE(C=2, K=2 of 6 + 1 shared) LM of width 16, with `changes` applied."""
  return ModelConfig().replace(**{**TINY_FIELDS, **changes})
