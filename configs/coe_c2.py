"""CoE: C=2, K=4, N=64 (paper val loss 1.121): compute equal to MoE(K=8). `:tiny` = K=2 of N=32."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="CoE(C=2,K=4)", paper_val_loss=1.121, c=2, k=4)
