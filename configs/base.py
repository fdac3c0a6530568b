"""Base config: the paper's MoE(K=8, N=64) recipe (DESIGN.md 5-6). `:tiny` for CPU scale."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.build(arg)
