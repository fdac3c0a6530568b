"""Wider MoE: C=1, K=16, N=64 (paper val loss 1.166): 2x the compute of K=8, like C=2,K=8."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="MoE(K=16)", paper_val_loss=1.166, c=1, k=16)
