"""MoE with fewer experts: C=1, K=8, N=48 (not in the paper's table; the MoE side of the N=48 comparison)."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="MoE(K=8,N=48)", paper_val_loss=None, c=1, k=8, n=48)
