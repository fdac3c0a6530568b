"""One train step on one CPU device and on a host split into several, side by side in one process.

    python -m experiments.split_host [--scale=narrow] [--runs=moe_k8,coe_c2] [--batch=16] \
        [--seq=256] [--hidden=0,256,512] [--devices=1,2] [--steps=8] [--json=runs/bench/split.json]

The measurements behind `coe_jax/training/host_devices.py`'s automatic split
(experiments/PERF.md 37). For each run and model width, the step of
`experiments.bench` (random unpadded tokens, dropless, fp32 unless the config
says otherwise) is compiled for every device count, data-parallel as the CLI
lays out a default mesh, and all of them run round-robin, so each ratio is taken
under one load. `--hidden` 0 keeps the config's width; another width also sets
the experts' intermediate size to 3/4 of it (`narrow`'s 96 / 128). Prints the
median step time, the CPU time the process spent in it (all threads) and the
speed-up over one device; writes JSON with `--json`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from absl import app, flags

from coe_jax import host_memory
from coe_jax.training import host_devices
from experiments import bench

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("scale", "narrow", "Config scale: tiny, narrow or paper.")
  flags.DEFINE_list("runs", ["moe_k8", "coe_c2"], "Paper runs (configs/<run>.py).")
  flags.DEFINE_integer("batch", 16, "Rows per step.")
  flags.DEFINE_integer("seq", 256, "Tokens per row.")
  flags.DEFINE_integer("layers", 0, "Decoder layers; 0 = the config's.")
  flags.DEFINE_integer("vocab", 5620, "Vocabulary (the headline study's trimmed tokenizer).")
  flags.DEFINE_list("hidden", ["0"], "Model widths; 0 = the config's.")
  flags.DEFINE_list("devices", ["1", "2"], "CPU device counts; the host is split into the most.")
  flags.DEFINE_integer("steps", 8, "Timed steps of every program.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps of every program first.")
  flags.DEFINE_string("json", "", "Also write the results here.")


def model_overrides(hidden: int) -> dict:
  changes = dict(vocab_size=FLAGS.vocab, dtype="float32")
  if FLAGS.layers:
    changes["num_layers"] = FLAGS.layers
  if hidden:
    changes.update(hidden_size=hidden, moe_intermediate_size=3 * hidden // 4)
  return changes


def time_group(run: str, hidden: int, counts: list[int]) -> list[dict]:
  """Every device count of one run and width, round-robin; a row per count."""
  config = bench.load_config(f"configs/{run}.py:{FLAGS.scale}")
  cfg = bench.bench_model_config(config, config.model.dispatch, model_overrides(hidden))
  steps = []
  for devices in counts:
    label = f"{run} hidden {cfg.hidden_size} x{devices}"
    step = bench.build_step_bench(label, config, cfg, FLAGS.batch, FLAGS.seq, devices=devices)
    step.allocate()
    steps.append(step)
  bench.run_round_robin([s.timed for s in steps], FLAGS.warmup, FLAGS.steps)
  one = statistics.median(steps[0].timed.seconds)
  return [
    dict(
      run=run,
      hidden=cfg.hidden_size,
      devices=devices,
      batch=FLAGS.batch,
      seq=FLAGS.seq,
      seconds=bench.spread(step.timed.seconds),
      cpu_seconds=bench.spread(step.timed.cpu_seconds),
      speedup_over_first=one / statistics.median(step.timed.seconds),
    )
    for devices, step in zip(counts, steps)
  ]


def main(argv) -> None:
  del argv
  counts = [int(d) for d in FLAGS.devices]
  if min(counts) < 1 or any(FLAGS.batch % c for c in counts):
    raise app.UsageError(f"--devices={counts}: each >= 1 and dividing --batch={FLAGS.batch}")
  granted = host_devices.split_host(max(counts))  # before anything starts JAX's backend
  if max(counts) > 1 and granted != max(counts):
    raise app.UsageError(
      f"could not split this host into {max(counts)} devices (XLA_FLAGS or JAX_NUM_CPU_DEVICES "
      "sets a count, or JAX is not on the CPU)"
    )
  rows = [
    row
    for run in FLAGS.runs
    for hidden in FLAGS.hidden
    for row in time_group(run, int(hidden), counts)
  ]
  print(f"{'run':<8} {'hidden':>6} {'devices':>7} {'step s':>8} {'CPU s':>7} {'speed-up':>9}")
  for row in rows:
    print(
      f"{row['run']:<8} {row['hidden']:>6} {row['devices']:>7} {row['seconds']['median']:>8.3f} "
      f"{row['cpu_seconds']['median']:>7.3f} {row['speedup_over_first']:>8.2f}x"
    )
  if FLAGS.json:
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(scale=FLAGS.scale, host_malloc=host_memory.active_settings())
    Path(FLAGS.json).write_text(json.dumps(dict(rows=rows, **meta), indent=1))


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # the CLI's allocator settings (PERF.md 19)
  _define_flags()
  app.run(main)
