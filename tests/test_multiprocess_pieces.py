"""In-process pieces of multi-process training and of the training log's extras: per-process
iterator rows and global batches, the profile and peak-FLOP/s fields, the wandb writer.

Marked like test_multiprocess.py, whose two-process runs exercise these pieces end to end.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from run_helpers import FakeWandb, small_config

from coe_jax.data import input_pipeline
from coe_jax.nn.flops import known_peak_tflops, peak_tflops_per_device
from coe_jax.nn.model_config import ConfigError
from coe_jax.training import sharding, train_config
from coe_jax.training.metrics import MetricWriter, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_compilation")]


def test_iterator_rows_of_two_processes_make_the_global_batch_and_resume_exactly():
  datasets = input_pipeline.build_datasets(small_config().data)
  halves = [np.arange(0, 4), np.arange(4, 8)]
  whole = datasets.train_iterator(8, seed=3)
  parts = [datasets.train_iterator(8, seed=3, local_rows=rows) for rows in halves]
  for _ in range(60):  # past an epoch of 400 rows
    batch = next(whole)
    local = [next(part) for part in parts]
    for name in batch:
      np.testing.assert_array_equal(np.concatenate([b[name] for b in local]), batch[name])
  state = parts[0].get_state()
  assert state == parts[1].get_state() == whole.get_state()  # one state for every process
  resumed = datasets.train_iterator(8, seed=3, local_rows=halves[1])
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["input_ids"], next(whole)["input_ids"][4:])


def test_process_rows_and_global_batch_on_one_process():
  mesh = sharding.make_mesh()
  np.testing.assert_array_equal(sharding.process_rows(mesh, 8), np.arange(8))
  assert sharding.Parallelism(mesh).process_rows(8) is None  # one process builds every row
  local = {"input_ids": np.arange(16, dtype=np.int32).reshape(8, 2)}
  batch = sharding.global_batch(local, mesh, 8)
  np.testing.assert_array_equal(np.asarray(batch["input_ids"]), local["input_ids"])
  assert batch["input_ids"].sharding == sharding.batch_sharding(mesh)


@pytest.mark.parametrize(
  "dotted, value, message",
  [
    (
      "train.profile_steps",
      "10",
      "train.profile_steps: got '10'; must be '' (off) or 'START:STOP'",
    ),
    ("train.profile_steps", "5:5", "train.profile_steps: got '5:5'"),
    ("train.profile_steps", "20:40", "STOP <= train.steps=30"),
    ("train.peak_tflops_per_device", -2.0, "train.peak_tflops_per_device: got -2.0; must be -1"),
  ],
)
def test_new_train_fields_are_validated(dotted, value, message):
  config = small_config(**{dotted.replace(".", "__"): value})
  with pytest.raises(ConfigError) as error:
    train_config.validate_config(config)
  assert str(error.value).startswith(dotted) and message in str(error.value)


def test_profile_window_and_peak_rates():
  assert train_config.profile_window(small_config().train) is None
  assert train_config.profile_window(small_config(train__profile_steps="10:15").train) == (10, 15)
  assert known_peak_tflops("NVIDIA H200", "bfloat16") == 989.4
  assert known_peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 494.7
  assert known_peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
  assert known_peak_tflops("cpu", "float32") is None
  assert peak_tflops_per_device(-1, "NVIDIA H200", "bfloat16") == 989.4
  assert peak_tflops_per_device(0, "NVIDIA H200", "bfloat16") is None  # 0 = unknown: no MFU
  assert peak_tflops_per_device(400, "cpu", "float32") == 400.0


def test_metric_writer_without_wandb_installed_writes_as_before(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  writer = MetricWriter(str(tmp_path), tensorboard=False, wandb_project="coe-test")
  writer.write(1, {"train/loss": 1.5})
  writer.close()
  assert read_metrics(str(tmp_path)) == [{"step": 1, "train/loss": 1.5}]
  assert "wandb is not installed" in capsys.readouterr().err


def test_metric_writer_resumes_the_same_wandb_run(tmp_path, monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  for step in (1, 2):
    writer = MetricWriter(str(tmp_path), tensorboard=False, wandb_project="p")
    writer.write(step, {"train/loss": float(step)})
    writer.close()
    fake.util.generate_id = lambda: "another-id"  # the second run reads the saved id instead
  assert [init["id"] for init in fake.inits] == ["fake-run-id", "fake-run-id"]
  assert fake.logged == [(1, {"train/loss": 1.0}), (2, {"train/loss": 2.0})]
