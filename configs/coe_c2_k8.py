"""CoE with more compute: C=2, K=8, N=64 (paper val loss 1.120)."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="CoE(C=2,K=8)", paper_val_loss=1.120, c=2, k=8)
