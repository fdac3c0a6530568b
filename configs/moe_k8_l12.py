"""Deeper MoE: C=1, K=8, N=64, 12 layers (paper val loss 1.070). `:tiny` = 6 layers."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="MoE(K=8,L=12)", paper_val_loss=1.070, c=1, k=8, layers=12)
