"""coe_jax.training.host_devices: which runs split a CPU host, and that a split run trains as one
device does (up to float summation order), resumable across the two."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import ml_collections
import pytest
from run_helpers import cli_flags, metric_rows, run_cli

from coe_jax import config_lib
from coe_jax.errors import ConfigError
from coe_jax.training import host_devices

NARROW = "configs/coe_c2.py:narrow"


@pytest.mark.parametrize(
  "cores,batch_sizes,seq,hidden,vocab,dropless,expected",
  [
    (2, (16, 32), 256, 128, 5620, True, 2),  # narrow: 2048 tokens a device, the least that splits
    (2, (8, 32), 256, 128, 5620, True, 1),  # 1024 a device
    (2, (16, 32), 128, 128, 5620, True, 1),
    (2, (16, 32), 256, 256, 5620, True, 2),
    (2, (16, 32), 256, 512, 5620, True, 1),  # wide ops use the cores already
    (2, (16, 32), 256, 128, 5620, False, 1),  # capacity: drops would change per device
    (1, (16, 32), 256, 128, 5620, True, 1),
    (16, (16, 32), 256, 128, 5620, True, 2),  # the most that leave 2048 tokens each
    (16, (64, 64), 256, 128, 5620, True, 8),
    (3, (24, 24), 256, 128, 5620, True, 3),
    (3, (24, 32), 256, 128, 5620, True, 2),  # 3 does not divide the eval batch
    (2, (15, 32), 256, 128, 5620, True, 1),
    (4, (16, 32, 63), 256, 128, 5620, True, 1),  # the reference's validation batch is odd
    (2, (16, 32), 256, 128, 16384, True, 2),
    (2, (16, 32), 256, 128, 102400, True, 1),  # the head's matmul uses the cores already
    (2, (16, 32), 256, 128, None, True, 1),  # a tokenizer used whole: its size is not known yet
  ],
)
def test_auto_cpu_devices(cores, batch_sizes, seq, hidden, vocab, dropless, expected):
  kwargs = dict(batch_sizes=batch_sizes, seq=seq, hidden=hidden, vocab=vocab, dropless=dropless)
  assert host_devices.auto_cpu_devices(cores=cores, **kwargs) == expected


def _narrow(**mesh):
  config = config_lib.load_config_file(NARROW)
  config.mesh.update(mesh)
  return config


def test_requested_cpu_devices_reads_the_config(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert host_devices.requested_cpu_devices(_narrow(), cores=2) == 2  # 16 x 256, hidden 128
  assert host_devices.requested_cpu_devices(_narrow(cpu_devices=1), cores=2) == 1
  assert host_devices.requested_cpu_devices(_narrow(cpu_devices=3), cores=2) == 3  # as asked
  assert host_devices.requested_cpu_devices(_narrow(fsdp=2), cores=2) == 1  # not the default mesh
  assert host_devices.requested_cpu_devices(_narrow(distributed=True), cores=2) == 1
  capacity = _narrow()
  capacity.model.dispatch = "capacity"
  assert host_devices.requested_cpu_devices(capacity, cores=2) == 1
  accumulating = _narrow()
  accumulating.train.grad_accum_steps = 2  # micro-batches of 8 x 256 tokens
  assert host_devices.requested_cpu_devices(accumulating, cores=2) == 1
  odd_reference_batch = _narrow()
  odd_reference_batch.train.paper_val, odd_reference_batch.train.paper_val_batch_size = True, 9
  assert host_devices.requested_cpu_devices(odd_reference_batch, cores=2) == 1
  assert host_devices.requested_cpu_devices(_narrow(), cores=16) == 2  # MAX_AUTO_DEVICES
  whole_tokenizer = _narrow()
  whole_tokenizer.data.tokenizer = "tokenizer.json"  # its size is known only once it loads
  assert host_devices.requested_cpu_devices(whole_tokenizer, cores=2) == 1
  whole_tokenizer.data.trim_vocab = 4096  # at most ~8K after trimming
  assert host_devices.requested_cpu_devices(whole_tokenizer, cores=2) == 2
  big_head = _narrow()
  big_head.model.vocab_size = 102400
  assert host_devices.requested_cpu_devices(big_head, cores=2) == 1
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  assert host_devices.requested_cpu_devices(_narrow(), cores=2) == 1


def test_the_split_line_says_capacity_drops_per_device():
  assert "Capacity" not in host_devices.split_message(_narrow(), 2)
  capacity = _narrow(cpu_devices=2)
  capacity.model.dispatch = "capacity"
  assert "each device drops against the capacity of its own tokens" in (
    host_devices.split_message(capacity, 2)
  )


@pytest.mark.parametrize("value", [-1, "2", 1.5, True])
def test_bad_cpu_devices_names_the_field(value):
  config = ml_collections.ConfigDict({"mesh": {"cpu_devices": value}})  # no type checks
  with pytest.raises(ConfigError, match=r"mesh\.cpu_devices: got .*integer >= 0"):
    host_devices.requested_cpu_devices(config, cores=2)


def test_split_host_leaves_what_it_cannot_change():
  cpu = {"JAX_PLATFORMS": "cpu"}
  assert host_devices.split_host(1, cpu) == 1
  assert host_devices.split_host(2, {"JAX_PLATFORMS": "cuda"}) == 1
  forced = {**cpu, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert host_devices.split_host(2, forced) == 1
  jax.devices()  # this process's backend is running: its device count is fixed
  before = jax.device_count()
  assert host_devices.split_host(before + 1, cpu) == 1
  assert jax.device_count() == before


def test_jax_num_cpu_devices_wins():
  code = (
    "from coe_jax.training import host_devices; import jax; "
    "print(host_devices.split_host(2, {'JAX_PLATFORMS': 'cpu'}), jax.device_count())"
  )
  env = {"JAX_NUM_CPU_DEVICES": "3", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["1", "3"]


# The shrunk test model at 16 x 256 tokens: 2048 tokens a device on two, so auto splits.
LONG_ROWS = dict(
  data__max_length=256, train__batch_size=16, train__eval_every=2, train__checkpoint_every=2
)


def _train(workdir, env, steps, *flags):
  args = (f"--workdir={workdir}", *cli_flags(**LONG_ROWS))
  proc = run_cli("coe_jax.main", *args, f"--config.train.steps={steps}", *flags, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.skipif(host_devices.usable_cores() < 2, reason="needs 2 CPUs to split the host")
def test_split_run_trains_as_one_device_and_resumes_on_one(tmp_path, cli_env):
  env = {**cli_env, "JAX_PLATFORMS": "cpu"}
  one = _train(tmp_path / "one", env, 6, "--config.mesh.cpu_devices=1")
  assert "CPU host split" not in one.stdout
  split = _train(tmp_path / "split", env, 4)
  assert "CPU host split into 2 devices" in split.stdout
  assert json.loads((tmp_path / "split" / "summary.json").read_text())["devices"] == 2
  resumed = _train(tmp_path / "split", env, 6, "--config.mesh.cpu_devices=1")
  assert "Resumed from" in resumed.stdout and "at step 4" in resumed.stdout
  rows_one, rows_split = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "split")
  for step in range(1, 7):
    for key in ("train/loss", "train/grad_norm"):
      assert rows_split[step][key] == pytest.approx(rows_one[step][key], rel=1e-5), (step, key)
  for step in (2, 4, 6):
    assert rows_split[step]["val/loss"] == pytest.approx(rows_one[step]["val/loss"], rel=1e-5)


def test_split_host_benchmark_times_every_device_count(tmp_path, cli_env):
  out = tmp_path / "split.json"
  env = {**cli_env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  args = ["--scale=tiny", "--runs=moe_k8", "--batch=2", "--seq=16", "--vocab=64", "--layers=1"]
  args += ["--hidden=32", "--devices=1,2", "--steps=1", "--warmup=0", f"--json={out}"]
  proc = run_cli("experiments.split_host", *args, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert [(r["hidden"], r["devices"]) for r in rows] == [(32, 1), (32, 2)]
  assert all(r["seconds"]["median"] > 0 and r["cpu_seconds"]["median"] > 0 for r in rows)
  assert rows[0]["speedup_over_first"] == 1.0
