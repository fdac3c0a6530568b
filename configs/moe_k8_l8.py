"""Deeper MoE: C=1, K=8, N=64, 8 layers (paper val loss 1.109). `:tiny` = 4 layers (tiny halves depth)."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="MoE(K=8,L=8)", paper_val_loss=1.109, c=1, k=8, layers=8)
