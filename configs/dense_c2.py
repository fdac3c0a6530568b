"""Dense-style with iteration: K=N=8, C=2, no shared expert (paper val loss 1.293)."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(arg, name="Dense(K=N=8,C=2)", paper_val_loss=1.293, c=2, k=8, n=8)
