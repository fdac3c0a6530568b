"""Ablation: CoE C=2, K=8 with one router shared by both iterations and the outer residual on (paper val loss 1.244)."""

from coe_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_run(
    arg,
    name="CoE(C=2,K=8) shared gate",
    paper_val_loss=1.244,
    c=2,
    k=8,
    independent_gates=False,
    outer_residual=True,
  )
