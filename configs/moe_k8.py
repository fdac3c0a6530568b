"""MoE baseline: C=1, K=8, N=64, 4 layers (paper val loss 1.196). `:tiny` = K=4 of N=32."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="MoE(K=8)", paper_val_loss=1.196, c=1, k=8)
