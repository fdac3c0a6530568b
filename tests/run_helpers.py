"""Helpers shared by the training-run tests: the shrunk config, its trained run, CLI runs.

Every training test trains a shrunk CoE(C=2) (`small_config`): one layer, hidden 32,
7 routed experts + 1 shared, 32-token rows, a 300-token BPE. Compilation is the cost on
CPU, so the modules that train compile without XLA's slow optimisation passes and share
one persistent compilation cache (the `fast_compilation` fixture of conftest.py): runs of
the same config, in-process or in a CLI subprocess (`jax_cache_env`), compile once.
Fixtures built on these are in conftest.py; this module holds plain functions and values.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest

from coe_jax import config_lib
from coe_jax.nn.model import CoECausalLM
from coe_jax.training import train, train_step
from coe_jax.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONFIG_FILE = REPO / "configs" / "coe_c2.py"

# Dotted field -> value, applied to `configs/coe_c2.py:tiny`; test_cli passes the same
# values as --config.<field>=<value> flags, so its subprocess hits the compilation cache.
SMALL = {
  "model.hidden_size": 32,
  "model.num_layers": 1,
  "model.n_routed_experts": 7,
  "model.moe_intermediate_size": 32,
  "model.kv_lora_rank": 16,
  "model.qk_nope_head_dim": 8,
  "model.qk_rope_head_dim": 8,
  "model.v_head_dim": 8,
  "model.num_heads": 2,
  # capacity = tokens (cf 3.5 = N/K): nothing drops, so micro-batches route exactly as the
  # whole batch (the accumulation test compares them).
  "model.capacity_factor_train": 3.5,
  "data.max_length": 32,
  "data.vocab_size": 300,
  "data.synthetic_train_size": 400,
  "data.synthetic_val_size": 32,
  "train.batch_size": 8,
  "train.eval_batch_size": 16,
  "train.max_eval_batches": 2,
  # 30 steps at the paper's 3e-4 barely move this model; 3e-3 shows learning clearly.
  "train.lr": 3e-3,
  "train.steps": 30,
  "train.eval_every": 10,
  "train.checkpoint_every": 5,
  "train.keep_checkpoints": 2,
}
# Metrics every train row of metrics.jsonl must hold (the list).
REQUIRED_TRAIN_KEYS = (
  "train/loss",
  "train/aux_loss",
  "train/lr",
  "train/grad_norm",
  "train/tokens_per_sec",
  "train/dropped_fraction",
)
# Timing-dependent columns; everything else in metrics.jsonl is a deterministic number.
TIMING_KEYS = (
  "train/tokens_per_sec",
  "train/step_seconds",
  "train/tflops_per_sec_per_device",
  "train/mfu",
)


def load_config_file(path: Path, arg: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, as `--config=path:arg` loads it."""
  return config_lib.load_config_file(f"{path}:{arg}")


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  section, field = dotted.split(".")
  config[section][field] = value


def small_config(**changes: Any) -> ml_collections.ConfigDict:
  """`configs/coe_c2.py:tiny` with `SMALL` and then `changes` (dotted names with '__' for '.')."""
  config = load_config_file(CONFIG_FILE, "tiny")
  for dotted, value in SMALL.items():
    set_field(config, dotted, value)
  for name, value in changes.items():
    set_field(config, name.replace("__", "."), value)
  return config


def jax_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """One compilation cache for the whole pytest session."""
  return tmp_path_factory.getbasetemp() / "jax_compilation_cache"


def jax_cache_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
  """Environment variables giving a subprocess the settings of `fast_compilation`."""
  return {
    "JAX_COMPILATION_CACHE_DIR": str(jax_cache_dir(tmp_path_factory)),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
  }


def shared_trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """A workdir of `small_config()` trained for its 30 steps in one go, once per session.

  Tests read it; a test that would write to it works on a copy. Call it with the
  `fast_compilation` fixture active (conftest's `reference_run` does): the tests compare
  their own runs, compiled that way, with this one bit for bit.
  """
  workdir = tmp_path_factory.getbasetemp() / "small_config_trained"
  if not (workdir / "summary.json").is_file():
    train.train_and_evaluate(small_config(), str(workdir), progress=False)
  return workdir


def tensorboard_scalars(workdir: Path) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...] in logging order} from the run's TensorBoard event files.

  As TensorBoard does, a SessionLog START event at step s (a resumed run's
  purge marker) drops the values logged earlier at steps >= s.
  """
  from tensorboardX.proto import event_pb2

  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])  # then a 4-byte length CRC
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4  # record and its 4-byte CRC
      if event.session_log.status == event_pb2.SessionLog.START:
        for values in scalars.values():
          values[:] = [(step, value) for step, value in values if step < event.step]
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def metric_rows(workdir: Path) -> dict[int, dict]:
  """metrics.jsonl by step, without the timing columns."""
  return {
    row["step"]: {k: v for k, v in row.items() if k not in TIMING_KEYS}
    for row in read_metrics(str(workdir))
  }


def abstract_state(config: ml_collections.ConfigDict) -> Any:
  """The shapes and dtypes of `config`'s fresh TrainState, without computing it."""
  model = CoECausalLM(config_lib.model_config_from(config, config.data.vocab_size))
  return jax.eval_shape(
    lambda: train_step.init_train_state(model, config.train, config.seed, config.data.max_length)
  )


def max_abs_diff(a: Any, b: Any) -> float:
  """The largest absolute difference between the leaves of two trees of equal structure."""
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


# --- the command line ---------------------------------------------------------------------------

STEPS = 30  # small_config's train.steps; checkpoints every 5, the last two (25, 30) kept
CLI_TIMEOUT_S = 300  # a CLI subprocess: imports, data and (on a cache miss) compilation


def cli_flags(**changes) -> list[str]:
  """SMALL (and `changes`, dotted with '__') as `--config.<field>=<value>` flags."""
  values = {**SMALL, **{k.replace("__", "."): v for k, v in changes.items()}}
  return ["--config=configs/coe_c2.py:tiny", *(f"--config.{k}={v}" for k, v in values.items())]


def run_cli(module: str, *args: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
  """`python -m module args` in the repository, `env` over this environment, output captured."""
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=CLI_TIMEOUT_S,
    **kwargs,
  )


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
  """Lines of stderr other than the progress bar's."""
  return [
    line
    for line in re.split(r"[\r\n]", result.stderr)
    if line.strip() and not re.match(r"\s*\d+%\|", line)
  ]


def one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
  """The single line of stderr (besides the progress bar): `error: ...`, exit code `code`."""
  lines = stderr_lines(result)
  assert result.returncode == code and len(lines) == 1, (result.returncode, result.stderr[-3000:])
  assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
  return lines[0]


def tree(path: Path) -> dict[str, tuple[int, int]]:
  """Every file and directory under `path`: relative path -> (size, mtime in ns).

  `path`'s own mtime is left out: a run's lock file comes and goes in it.
  """
  entries = {}
  for p in path.rglob("*"):
    stat = p.lstat()
    entries[str(p.relative_to(path))] = (stat.st_size if p.is_file() else 0, stat.st_mtime_ns)
  return entries


class FakeWandb(types.ModuleType):
  """What `MetricWriter` uses of the `wandb` package, recording the calls."""

  def __init__(self):
    super().__init__("wandb")
    self.inits, self.logged, self.finished = [], [], 0
    self.util = types.SimpleNamespace(generate_id=lambda: "fake-run-id")

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, values, step):
    self.logged.append((step, dict(values)))

  def finish(self):
    self.finished += 1


def fake_run_result(name: str, seeds: list[int], losses: list[float], paper_val_loss: float = 1.0):
  """An `experiments.ablation` RunResult of `name` with these final losses and nothing else."""
  from experiments.ablation_results import RunResult

  return RunResult(
    name=name,
    paper_name=name,
    c=1,
    k=8,
    n=64,
    layers=4,
    paper_val_loss=paper_val_loss,
    seeds=seeds,
    val_losses=losses,
    params_total=1,
    params_active=1,
    peak_bytes=None,
    step_seconds=1.0,
    tokens_per_sec=1.0,
    curves=[],
  )
