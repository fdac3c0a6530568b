"""`make demo`: CoE(C=2) at tiny scale (K=2 of N=32, the paper's K=4 of 64 halved) on the
embedded synthetic corpus, a few minutes on 2 CPU cores."""

from coe_jax import config_lib


def get_config(arg=None):
  if arg not in (None, "", "tiny"):
    raise config_lib.ConfigError(f"configs/demo.py: got scale {arg!r}; the demo is tiny only")
  config = config_lib.paper_run("tiny", name="CoE(C=2,K=4) demo", paper_val_loss=None, c=2, k=4)
  config.data.max_length = 128  # synthetic problems are short
  config.data.vocab_size = 1024  # byte-level BPE trained on the synthetic text
  config.train.steps = 300
  config.train.eval_every = 50
  config.train.checkpoint_every = 100
  config.train.paper_val = True  # log the reference's validation number beside the pooled one
  return config
