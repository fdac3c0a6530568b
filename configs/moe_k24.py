"""Wider MoE: C=1, K=24, N=64 (paper val loss 1.175)."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="MoE(K=24)", paper_val_loss=1.175, c=1, k=24)
