"""CoE with fewer experts: C=2, K=4, N=48 (paper val loss 1.210): 17.6% fewer params than MoE N=64."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="CoE(C=2,K=4,N=48)", paper_val_loss=1.210, c=2, k=4, n=48)
