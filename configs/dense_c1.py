"""Dense-style: every expert runs, K=N=8, C=1, no shared expert (paper val loss 1.232). `:tiny` = K=N=4."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="Dense(K=N=8,C=1)", paper_val_loss=1.232, c=1, k=8, n=8)
