"""Ablation: CoE C=2, K=8 with the outer residual on (DESIGN.md 7: outer_residual=True, the other switches at their defaults) (paper val loss 1.175)."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(
    arg, name="CoE(C=2,K=8) outer residual", paper_val_loss=1.175, c=2, k=8, outer_residual=True
  )
