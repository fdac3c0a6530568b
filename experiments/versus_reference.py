"""Our train step against the authors' PyTorch step, side by side in one run on one machine.

    REF_DIR=... REF_VENV=... python -m experiments.versus_reference \
        [--shapes=narrow,paper_width] [--runs=moe_k8,coe_c2] [--devices=1,cli] [--steps=10] \
        [--warmup=2] [--json=runs/bench/versus_reference.json]

`REF_DIR` and `REF_VENV` come from `../shared/tools/ref_torch/setup.sh` (their `modeling_coe.py`,
loaded from outside the repository; torch CPU + transformers 4.49). Their step runs in a
server process under that venv (`reference_step_server.py`, built as `ref.py time` builds it,
2 torch threads); ours is the donated train step the CLI compiles, in this process with the
CLI's host-allocator settings, on one CPU device and on as many as the CLI splits this host
into for the run (`--devices`; `coe_jax/training/host_devices.py`: 2 at `narrow` on 2 cores, one
at paper width, whose one row cannot be split), data-parallel as the CLI lays it out. Every
timed program (each side's step of each run, and the matmul probe) runs round-robin, one call
each per round, so each ratio compares times taken under the same load. Shapes (`SHAPES`):
`narrow`, the headline study's scale, and `paper_width`, the paper's layer width at 2 layers and
one 512-token row. Prints a table and writes JSON; the speed-up is the authors' median step time over ours, and "ours CPU s" the CPU
time our process spent in a step (all threads; under 2 x the wall time on 2 cores, a core sat
idle for part of the step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
from absl import app, flags

from coe_jax import host_memory
from coe_jax.nn.model_config import ModelConfig
from coe_jax.training import host_devices
from experiments import bench

HARNESS = bench.REPO.parent / "shared" / "tools" / "ref_torch" / "ref.py"
SERVER = Path(__file__).with_name("reference_step_server.py")
RUNS = {"moe_k8": "MoE(K=8)", "coe_c2": "CoE(C=2,K=4)", "coe_c2_k8": "CoE(C=2,K=8)"}
# Per shape: the config scale, model overrides, batch x seq, and whether every run of the shape
# is timed in one round-robin group (False: one run at a time, both sides, to bound memory).
SHAPES = {
  "narrow": dict(
    scale="narrow",
    model=dict(vocab_size=5620, dtype="float32"),
    batch=16,
    seq=256,
    together=True,
  ),
  "paper_width": dict(
    scale="paper",
    model=dict(num_layers=2, vocab_size=8192, dtype="float32"),
    batch=1,
    seq=512,
    together=False,
  ),
}

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_list("shapes", list(SHAPES), f"Shapes to time: {', '.join(SHAPES)}.")
  flags.DEFINE_list(
    "devices",
    ["1", "cli"],
    "Our step on this many CPU devices, data-parallel; 'cli': as many as the CLI splits this "
    "host into for the run (coe_jax/training/host_devices.py).",
  )
  flags.DEFINE_list("runs", ["moe_k8", "coe_c2"], f"Paper runs (configs/<run>.py): {list(RUNS)}.")
  flags.DEFINE_integer("steps", 10, "Timed steps of every program.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps of every program first.")
  flags.DEFINE_integer("threads", 2, "torch threads on the authors' side.")
  flags.DEFINE_string("json", "", "Also write the results here.")
  flags.DEFINE_float(
    "settle",
    0.3,
    "Seconds of pause before each timed call: the previous program's spinning threads "
    "(XLA's pool, torch's OpenMP) then take no core from the one timed.",
  )


def reference_args(cfg: ModelConfig, batch: int, seq: int, threads: int) -> list[str]:
  """`ref.py` model arguments describing `cfg` (their --experts counts the shared expert)."""
  coe = cfg.coe
  rope = None
  if cfg.rope_scaling == "yarn":
    rope = dict(
      type="yarn",
      factor=cfg.rope_factor,
      original_max_position_embeddings=cfg.rope_original_max_position,
      beta_fast=cfg.rope_beta_fast,
      beta_slow=cfg.rope_beta_slow,
      mscale=cfg.rope_mscale,
      mscale_all_dim=cfg.rope_mscale_all_dim,
    )
  sets = dict(
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_heads,
    kv_lora_rank=cfg.kv_lora_rank,
    qk_nope_head_dim=cfg.qk_nope_head_dim,
    qk_rope_head_dim=cfg.qk_rope_head_dim,
    v_head_dim=cfg.v_head_dim,
    rope_theta=cfg.rope_theta,
    rope_scaling=rope,
    rms_norm_eps=cfg.rms_norm_eps,
    aux_loss_alpha=coe.aux_loss_alpha,
    norm_topk_prob=coe.norm_topk_prob,
    routed_scaling_factor=coe.routed_scaling_factor,
  )
  args = [
    *("--hidden", str(cfg.hidden_size), "--layers", str(cfg.num_layers)),
    *("--experts", str(coe.n_routed_experts + coe.n_shared_experts)),
    *("--n-shared", str(coe.n_shared_experts), "--topk", str(coe.num_experts_per_tok)),
    *("--iters", str(coe.num_iterations), "--vocab", str(cfg.vocab_size)),
    *("--moe-inter", str(coe.moe_intermediate_size), "--batch", str(batch), "--seq", str(seq)),
    *("--outer-residual", str(coe.outer_residual), "--inner-residual", str(coe.inner_residual)),
    *("--use-igate", str(coe.independent_gates), "--threads", str(threads)),
  ]
  for key, value in sets.items():
    args += ["--set", f"{key}={json.dumps(value)}"]
  return args


@dataclasses.dataclass
class ReferenceStep:
  """The authors' step in a server process; `run_once()` times one step there."""

  name: str
  process: subprocess.Popen
  params: int
  seconds: list[float] = dataclasses.field(default_factory=list)

  @classmethod
  def start(cls, name: str, args: list[str]) -> "ReferenceStep":
    venv = os.environ.get("REF_VENV")
    if not venv or not os.environ.get("REF_DIR"):
      sys.exit("error: REF_VENV and REF_DIR: set both (../shared/tools/ref_torch/README.md)")
    command = [f"{venv}/bin/python", str(SERVER), str(HARNESS), "--", *args]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    first = process.stdout.readline().split()
    if not first or first[0] != "ready":
      sys.exit(f"error: the authors' step server did not start ({' '.join(command)})")
    return cls(name, process, int(first[1]))

  def call(self) -> float:
    self.process.stdin.write("step\n")
    self.process.stdin.flush()
    return float(self.process.stdout.readline().split()[0])

  def run_once(self) -> None:
    self.seconds.append(self.call())

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait(timeout=60)


def shape_config(run: str, shape: dict):
  """The run's config at the shape's scale, batch, length and model overrides."""
  config = bench.load_config(f"configs/{run}.py:{shape['scale']}")
  config.train.batch_size, config.data.max_length = shape["batch"], shape["seq"]
  config.model.update(shape["model"])
  return config


def cli_devices(run: str, shape: dict) -> int:
  """The devices the CLI splits this CPU host into for the run at the shape (`host_devices`)."""
  return host_devices.requested_cpu_devices(shape_config(run, shape), host_devices.usable_cores())


def device_counts(run: str, shape: dict) -> list[int]:
  """`--devices` for the run at the shape, 'cli' resolved, each count once."""
  counts = [cli_devices(run, shape) if d == "cli" else int(d) for d in FLAGS.devices]
  return list(dict.fromkeys(counts))


def our_step(run: str, shape: dict, devices: int) -> bench.StepBench:
  config = shape_config(run, shape)  # the shape's model overrides applied already
  cfg = bench.bench_model_config(config, config.model.dispatch, {})
  label = f"ours {RUNS[run]} x{devices}"
  step = bench.build_step_bench(label, config, cfg, shape["batch"], shape["seq"], devices=devices)
  step.allocate()
  return step


def time_shape(name: str, shape: dict, probe: bench.Timed) -> list[dict]:
  groups = [FLAGS.runs] if shape["together"] else [[run] for run in FLAGS.runs]
  rows = []
  for runs in groups:
    ours = {(run, d): our_step(run, shape, d) for run in runs for d in device_counts(run, shape)}
    model_configs = {run: step.model_config for (run, _), step in ours.items()}
    theirs = {
      run: ReferenceStep.start(
        f"authors {RUNS[run]}",
        reference_args(model_configs[run], shape["batch"], shape["seq"], FLAGS.threads),
      )
      for run in runs
    }
    try:  # one call of each side of each run, and the probe, per round
      programs = [
        program
        for run in runs
        for program in [s.timed for (r, _), s in ours.items() if r == run] + [theirs[run]]
      ]
      bench.run_round_robin(programs + [probe], FLAGS.warmup, FLAGS.steps, FLAGS.settle)
    finally:
      for server in theirs.values():
        server.close()
    for (run, devices), step in ours.items():
      mine, reference = step.timed.seconds, theirs[run].seconds
      rows.append(
        dict(
          shape=name,
          run=RUNS[run],
          devices=devices,
          dispatch=step.model_config.coe.dispatch,
          dropless_impl=step.model_config.coe.dropless_impl,
          batch=shape["batch"],
          seq=shape["seq"],
          ours_seconds=bench.spread(mine),
          ours_cpu_seconds=bench.spread(step.timed.cpu_seconds),
          authors_seconds=bench.spread(reference),
          authors_params=theirs[run].params,
          speedup=statistics.median(reference) / statistics.median(mine),
        )
      )
    del ours
  return rows


def format_table(rows: list[dict], probe_rate: float) -> str:
  lines = [
    f"{'shape':<12} {'run':<14} {'devices':>7} {'authors s':>10} {'ours s':>8} {'speed-up':>9} "
    f"{'ours CPU s':>11}",
    "-" * 77,
  ]
  for row in rows:
    lines.append(
      f"{row['shape']:<12} {row['run']:<14} {row['devices']:>7} "
      f"{row['authors_seconds']['median']:>10.3f} "
      f"{row['ours_seconds']['median']:>8.3f} {row['speedup']:>8.2f}x "
      f"{row['ours_cpu_seconds']['median']:>11.3f}"
    )
  for shape in dict.fromkeys(r["shape"] for r in rows):
    authors = {r["run"]: r["authors_seconds"]["median"] for r in rows if r["shape"] == shape}
    ours = {
      (r["run"], r["devices"]): r["ours_seconds"]["median"] for r in rows if r["shape"] == shape
    }
    if {"MoE(K=8)", "CoE(C=2,K=4)"} <= set(authors):
      for devices in sorted({d for _, d in ours}):
        coe, moe = ours.get(("CoE(C=2,K=4)", devices)), ours.get(("MoE(K=8)", devices))
        if coe and moe:
          lines.append(
            f"{shape}: CoE(C=2,K=4) / MoE(K=8) step time: ours on {devices} device(s) "
            f"{coe / moe:.2f}x, authors {authors['CoE(C=2,K=4)'] / authors['MoE(K=8)']:.2f}x"
          )
  lines.append(f"matmul probe: {probe_rate / 1e9:.1f} GFLOP/s (2048^2 float32, median)")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  unknown = [s for s in FLAGS.shapes if s not in SHAPES] + [r for r in FLAGS.runs if r not in RUNS]
  if unknown:
    raise app.UsageError(f"unknown shape or run {unknown}; allowed: {list(SHAPES)}, {list(RUNS)}")
  needed = max(
    d for name in FLAGS.shapes for run in FLAGS.runs for d in device_counts(run, SHAPES[name])
  )
  if needed > 1 and host_devices.split_host(needed) != needed:  # before JAX's backend starts
    raise app.UsageError(
      f"could not split this host into {needed} devices (XLA_FLAGS or JAX_NUM_CPU_DEVICES sets "
      "a count, or JAX is not on the CPU)"
    )
  probe, probe_flops = bench.matmul_probe(jax.numpy.float32, 2048)
  started = time.time()
  rows = [row for name in FLAGS.shapes for row in time_shape(name, SHAPES[name], probe)]
  rate = probe_flops / statistics.median(probe.seconds)
  print(format_table(rows, rate))
  if FLAGS.json:
    results = dict(
      rows=rows,
      matmul_flops_per_sec=rate,
      steps=FLAGS.steps,
      warmup=FLAGS.warmup,
      torch_threads=FLAGS.threads,
      host_malloc=host_memory.active_settings(),
      seconds=time.time() - started,
    )
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # the CLI's allocator settings (PERF.md 19)
  _define_flags()
  app.run(main)
