"""Train-step benchmark: time, tokens/s, FLOPs, MFU, peak memory, dispatch cost.

    python -m experiments.bench --config=configs/coe_c2.py:tiny [--dispatch=capacity,dropless]
    python -m experiments.bench --suite --scale=tiny --out=bench.json

For every (config, dispatch mode) it compiles the real train step
(`coe_jax.training.train_step.make_train_step`, state donated, AdamW included) on a fixed
random batch and reports: compile seconds; the median, min and max of
`--steps` step times after `--warmup` warm-up steps, each timed with
`block_until_ready`; tokens/s (batch x length positions per step); the
analytic training FLOPs per token (`train_flops_per_token`); the achieved
FLOP/s; the machine's own matmul FLOP/s, measured in the same run with a large
square `jnp.dot` in the compute dtype; their ratio (MFU); the peak memory of
the compiled step (`compiled.memory_analysis()`, plus the device's
`peak_bytes_in_use` where it reports one); and the dropped-assignment fraction.
The JSON also holds each program's CPU time per call and the MFU computed
from CPU seconds on both sides (`mfu_cpu_time`): on a CPU shared with other
processes that ratio moves much less than the wall-clock one.

All timed programs (every train step and the matmul probe) run round-robin,
one call each per round, so every ratio (MFU, CoE/MoE) compares numbers taken
under the same machine load. `--suite` benchmarks MoE(K=8), CoE(C=2,K=4) and
CoE(C=2,K=8) at equal N (the paper's K; `:tiny` maps them to K=4/2/4 of 31+1).

`--shapes=paper_width` is the paper's layer width on a CPU-sized step: the
`:paper` suite configs (hidden 1024, MLA dims, 63 routed + 1 shared experts,
f=704) with 2 layers, vocab 8192, float32, batch 1 x 512 tokens. With
`--dispatch=capacity,dropless --dropless_impl=blocked,gather,ragged_dot` every
dropless implementation runs beside capacity (rows `... dropless[impl]`).
`--memory_only` compiles and reports compiled peak memory without running
(abstract state: works at the paper configuration on a CPU).

Every program is compiled from abstract state before any state is allocated.
On CPU the bench then checks that the programs fit in host memory together
(their states plus the largest temporary buffer, `fit_in_host_memory`): one
that does not stops the run with an error naming it (with `--keep_going` it is
reported as failed and the others run), instead of the kernel killing the
process halfway with every result lost; a warning says when only the sum of
the compiled peaks does not fit.

`--layer_cost` also times one CoE layer's forward+backward twice: as is, and
with the routed and shared expert MLPs replaced by the identity (everything
else, i.e. norm, router, top-K, sorting, gather/scatter and combine, kept).
The ratio of the two is the share of the layer's time spent on dispatch.

The pieces: `bench_timing` (round-robin timing, the matmul probe),
`bench_programs` (the grid of train steps, the layer probe, `--routing`'s
routers), `bench_memory` (host-memory admission), `bench_report` (records,
capacity baselines, tables); this module parses the flags and runs them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import jax

from coe_jax import host_memory

# The analytic FLOP count lives in the library: the training log reports the same numbers.
from coe_jax.nn.flops import FlopCount, flops_per_token  # noqa: F401 (re-exported)
from coe_jax.nn.layers import compute_dtype
from coe_jax.training import metrics as metrics_lib

# The pieces, re-exported: other experiments and the tests use them as `bench.<name>`.
from experiments.bench_memory import HOST_MEMORY_MARGIN, fit_in_host_memory  # noqa: F401
from experiments.bench_programs import (  # noqa: F401
  REPO,
  ROUTERS,
  ROUTINGS,
  SHAPES,
  SUITE,
  StepBench,
  _dropless_variants,
  balanced_route,
  bench_model_config,
  build_benches,
  build_step_bench,
  identity_expert,
  layer_program,
  load_config,
  random_batch,
)
from experiments.bench_report import (  # noqa: F401
  capacity_baseline,
  format_memory_table,
  format_table,
  memory_report,
  summarize_step,
)
from experiments.bench_timing import (  # noqa: F401
  FAULTED_CALL_BYTES,
  Timed,
  matmul_probe,
  run_round_robin,
  spread,
  xla_flops,
)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--config", default="configs/coe_c2.py:tiny", help="config file[:scale] (ignored with --suite)"
  )
  parser.add_argument(
    "--suite", action="store_true", help="MoE(K=8) vs CoE(C=2,K=4) vs CoE(C=2,K=8) in one process"
  )
  parser.add_argument("--scale", default="tiny", help="scale of the --suite configs: tiny | paper")
  parser.add_argument(
    "--dispatch", default="capacity", help="comma-separated dispatch modes: capacity,dropless"
  )
  parser.add_argument(
    "--dropless_impl",
    default=None,
    help="comma-separated: auto | blocked | gather | ragged_dot (one row each)",
  )
  parser.add_argument(
    "--dropless_tile",
    default=None,
    help="model.dropless_tile (rows per whole tile of 'blocked'; 0 = default); a "
    "comma-separated list benchmarks each value side by side",
  )
  parser.add_argument(
    "--dropless_tile_sizes",
    default=None,
    help="model.dropless_tile_sizes (sizes each expert's last tile picks from; 1 = whole tiles "
    "only, 0 = default); a comma-separated list benchmarks each value side by side",
  )
  parser.add_argument(
    "--shapes",
    default=None,
    choices=sorted(SHAPES),
    help="preset: paper_width = the :paper suite at 2 layers, vocab 8192, fp32, "
    "batch 1 x 512; narrow = the :narrow suite, vocab 5620, fp32, 16 x 256 "
    "(explicit --batch/--seq/--dtype still win)",
  )
  parser.add_argument(
    "--optimizer",
    default="config",
    choices=("config", "fused", "chain"),
    help="clip + AdamW as the config says (fused by default), fused, or the optax chain",
  )
  parser.add_argument(
    "--keep_going",
    action="store_true",
    help="a program that fails to compile, fit in host memory or allocate is reported, not fatal",
  )
  parser.add_argument(
    "--memory_only",
    action="store_true",
    help="compile from abstract state and report compiled peak memory only",
  )
  parser.add_argument(
    "--batch", type=int, default=None, help="sequences per step (default: config)"
  )
  parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: config)")
  parser.add_argument("--dtype", default=None, help="compute dtype override: float32 | bfloat16")
  parser.add_argument("--remat", default=None, help="none | full | dots")
  parser.add_argument(
    "--attention_query_block",
    default=None,
    help="model.attention_query_block override; a comma-separated list "
    "benchmarks each value side by side (e.g. 0,64)",
  )
  parser.add_argument(
    "--scan_layers",
    default=None,
    help="model.scan_layers override: false (per-layer params) | true (stacked); "
    "false,true benchmarks both side by side",
  )
  parser.add_argument(
    "--routing",
    default="model",
    choices=ROUTINGS,
    help="model: the untrained router's own (skewed) top-K; balanced: K distinct experts drawn "
    "uniformly per token (the loads training reaches), weights and losses still the router's",
  )
  parser.add_argument("--steps", type=int, default=10, help="timed steps per program")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per program first")
  parser.add_argument(
    "--matmul_size",
    type=int,
    default=None,
    help="side of the matmul probe (default 2048 on CPU, 8192 elsewhere)",
  )
  parser.add_argument(
    "--layer_cost",
    action="store_true",
    help="also time one layer with the expert MLPs replaced by the identity",
  )
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  return parser.parse_args(argv)


def runnable_benches(args: argparse.Namespace) -> list[StepBench]:
  """`build_benches`, then (on CPU) the programs that fit in host memory, each state allocated.

  With `--keep_going` every program is also called once, and one that fails
  to allocate or at that first call (e.g. out of device memory) is reported in
  `args.failures` and dropped; the others still run.
  """
  benches = build_benches(args)
  if jax.default_backend() == "cpu":
    benches = fit_in_host_memory(
      benches, host_memory.available_bytes(), args.keep_going, args.failures
    )
  alive = []
  for bench in benches:
    try:
      bench.allocate()
      if args.keep_going:
        jax.block_until_ready(bench.timed.call())
    except Exception as error:
      if not args.keep_going:
        raise
      args.failures.append(
        dict(label=bench.label, error=f"{type(error).__name__}: {str(error)[:500]}")
      )
      print(
        f"bench: {bench.label} failed to allocate or at its first step: "
        f"{args.failures[-1]['error']}",
        file=sys.stderr,
      )
      continue
    alive.append(bench)
  return alive


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds, admits and times the programs round-robin; returns the results' JSON."""
  if args.memory_only:
    return dict(memory_report(build_benches(args)), failed=args.failures)
  benches = runnable_benches(args)
  if not benches:
    raise SystemExit(f"bench: every program failed: {args.failures}")
  dtype = compute_dtype(benches[0].model_config.dtype)
  size = args.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
  probe, probe_flops = matmul_probe(dtype, size)
  layer_programs = []
  if args.layer_cost:
    first = benches[0]
    router_fn = ROUTERS[args.routing]
    layer_programs = [
      layer_program(first.model_config, *first.batch_shape, identity, router_fn)
      for identity in (False, True)
    ]
  run_round_robin([b.timed for b in benches] + [probe] + layer_programs, args.warmup, args.steps)
  matmul_rate = probe_flops / statistics.median(probe.seconds)
  matmul_cpu_rate = probe_flops / statistics.median(probe.cpu_seconds)
  results = dict(
    backend=jax.default_backend(),
    device=str(jax.devices()[0].device_kind),
    device_count=jax.device_count(),
    jax_version=jax.__version__,
    host_malloc=host_memory.active_settings(),
    routing=args.routing,
    steps=args.steps,
    warmup=args.warmup,
    matmul=dict(
      size=size,
      dtype=str(dtype),
      seconds=spread(probe.seconds),
      flops_per_sec=matmul_rate,
      flops_per_cpu_sec=matmul_cpu_rate,
    ),
    device_peak_bytes=metrics_lib.device_peak_bytes(),
    runs=[summarize_step(b, matmul_rate, matmul_cpu_rate) for b in benches],
    failed=args.failures,
  )
  if layer_programs:
    full, identity = (spread(p.seconds)["median"] for p in layer_programs)
    full_cpu, identity_cpu = (spread(p.cpu_seconds)["median"] for p in layer_programs)
    results["layer_cost"] = dict(
      config=benches[0].label,
      layer_seconds=full,
      identity_experts_seconds=identity,
      dispatch_fraction=identity / full,
      dispatch_fraction_cpu_time=identity_cpu / full_cpu,
      layer_xla_flops=layer_programs[0].xla_flops,
      identity_experts_xla_flops=layer_programs[1].xla_flops,
    )
  return results


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  results = run(args)
  print(format_memory_table(results) if args.memory_only else format_table(results))
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
  return results


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # CPU: reuse the step's memory (PERF.md 19)
  main(sys.argv[1:])
