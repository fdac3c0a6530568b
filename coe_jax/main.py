"""Command line: `python -m coe_jax.main --config=configs/coe_c2.py[:tiny] --workdir=runs/x`.

Any config field can be overridden, e.g. `--config.train.steps=50`.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from coe_jax import host_memory
from coe_jax.nn.model_config import ConfigError
from coe_jax.nn.params import count_params, format_counts
from coe_jax.training import multihost, train, train_config

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file (`file.py[:scale]`).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  config = _CONFIG.value
  try:
    model_config = train_config.validate_config(config)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  if config.get("mesh") is not None:
    multihost.initialize_distributed(config.mesh)  # several processes: only process 0 prints
  if multihost.is_primary():
    print(f"Model ({'vocab from tokenizer' if config.model.vocab_size == 0 else 'vocab fixed'}):")
    print(format_counts(count_params(model_config)))
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as e:  # found once data is read, e.g. a workdir holding another model
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # CPU: reuse the step's memory (PERF.md 19)
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
