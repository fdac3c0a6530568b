"""Command line: `python -m coe_jax.main --config=configs/coe_c2.py[:tiny] --workdir=runs/x`.

Any config field can be overridden, e.g. `--config.train.steps=50`. A bad flag, config field or
value is one line and exit code 2, a run that cannot go on one line and exit code 1
(`coe_jax.cli`; `--verbose` adds the traceback).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from coe_jax import cli, host_memory
from coe_jax.training import host_devices, multihost, train, train_config

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file (`file.py[:scale]`).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  train_config.validate_config(config)  # a ConfigError is one line, exit code 2 (coe_jax.cli)
  devices = host_devices.split_host_for_run(config)  # before anything starts JAX's backend
  if config.get("mesh") is not None:
    multihost.initialize_distributed(config.mesh)  # several processes: only process 0 prints
  if devices > 1 and multihost.is_primary():
    print(host_devices.split_message(config, devices))
  # The model summary is printed by the run once the tokenizer has fixed the vocabulary.
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # CPU: reuse the step's memory (PERF.md 19)
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
