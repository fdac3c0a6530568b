"""Reporting of `experiments.bench`: one JSON record per program, and the tables printed.

Every record carries its variant as fields (`config`, `dispatch`,
`dropless_impl`, `attention_query_block`, `scan_layers`, ...); a program is
compared with the capacity program of the same config, query block and layer
layout (`capacity_baseline`), never by parsing its label.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from coe_jax.nn import dispatch, tuning
from coe_jax.nn.flops import flops_per_token
from experiments.bench_programs import StepBench
from experiments.bench_timing import FAULTED_CALL_BYTES, spread


def variant_fields(bench: StepBench) -> dict[str, Any]:
  """The structured description of a program's variant (what its label spells out)."""
  cfg = bench.model_config
  coe = cfg.coe
  return dict(
    config=bench.config_name or bench.label,
    dispatch=coe.dispatch,
    dropless_impl=dispatch.resolve_dropless_impl(coe.dropless_impl)
    if coe.dispatch == "dropless"
    else None,
    attention_query_block=cfg.attention_query_block,
    scan_layers=cfg.scan_layers,
  )


def capacity_baseline(record: dict[str, Any], records: list[dict]) -> Optional[dict[str, Any]]:
  """The capacity record of `record`'s config, query block and layer layout (None if none)."""
  same = ("config", "attention_query_block", "scan_layers")
  return next(
    (
      r
      for r in records
      if r["dispatch"] == "capacity" and all(r.get(k) == record.get(k) for k in same)
    ),
    None,
  )


def summarize_step(
  bench: StepBench, matmul_flops_per_s: float, matmul_flops_per_cpu_s: float
) -> dict[str, Any]:
  """The JSON record of one train step; `mfu_cpu_time` uses CPU seconds on both sides."""
  batch, seq = bench.batch_shape
  flops = flops_per_token(bench.model_config, seq)
  times = spread(bench.timed.seconds)
  tokens_per_s = batch * seq / times["median"]
  achieved = flops.train * tokens_per_s
  achieved_per_cpu_s = flops.train * batch * seq / spread(bench.timed.cpu_seconds)["median"]
  metrics = jax.device_get(bench.last_metrics["metrics"])
  coe = bench.model_config.coe
  sizes = tuning.default_tiling(
    batch * seq * coe.num_experts_per_tok,
    coe.n_routed_experts,
    3 * coe.hidden_size * coe.moe_intermediate_size * jnp.dtype(coe.dtype).itemsize,
    coe.dropless_tile,
    coe.dropless_tile_sizes,
  )
  return dict(
    label=bench.label,
    **variant_fields(bench),
    dropless_tile=sizes[-1],
    dropless_tile_sizes=list(sizes),
    C=coe.num_iterations,
    K=coe.num_experts_per_tok,
    N_routed=coe.n_routed_experts,
    dtype=coe.dtype,
    remat=bench.model_config.remat,
    batch=batch,
    seq=seq,
    compile_seconds=bench.compile_seconds,
    step_seconds=times,
    step_cpu_seconds=spread(bench.timed.cpu_seconds),
    faulted_steps=bench.timed.faulted_steps(),
    step_page_faults=spread(bench.timed.page_faults),
    tokens_per_sec=tokens_per_s,
    train_flops_per_token=flops.train,
    flops_breakdown_forward=dataclasses.asdict(flops),
    achieved_flops_per_sec=achieved,
    matmul_flops_per_sec=matmul_flops_per_s,
    mfu=achieved / matmul_flops_per_s,
    mfu_cpu_time=achieved_per_cpu_s / matmul_flops_per_cpu_s,
    compiled_peak_bytes=bench.compiled_peak_bytes,
    compiled_state_bytes=bench.resident_bytes,
    compiled_temp_bytes=bench.temp_bytes,
    dropped_fraction=float(metrics["dropped_fraction"]),
    loss=float(metrics["loss"]),
  )


def memory_report(benches: list[StepBench]) -> dict[str, Any]:
  """Compiled peak memory of every program and its ratio to its capacity baseline's."""
  rows = [
    dict(
      label=bench.label,
      **variant_fields(bench),
      compile_seconds=bench.compile_seconds,
      compiled_peak_bytes=bench.compiled_peak_bytes,
      batch=bench.batch_shape[0],
      seq=bench.batch_shape[1],
      dtype=bench.model_config.dtype,
      num_layers=bench.model_config.num_layers,
      vocab_size=bench.model_config.vocab_size,
    )
    for bench in benches
  ]
  for row in rows:
    base = capacity_baseline(row, rows)
    peak, base_peak = row["compiled_peak_bytes"], base and base["compiled_peak_bytes"]
    row["peak_vs_capacity"] = peak / base_peak if peak and base_peak else None
  return dict(backend=jax.default_backend(), jax_version=jax.__version__, memory_only=rows)


def format_table(results: dict[str, Any]) -> str:
  """A fixed-width table of the runs, plus the matmul probe and dispatch share."""
  header = (
    f"{'run':<26s} {'compile s':>9s} {'step ms':>9s} {'+-iqr':>7s} {'tok/s':>9s} "
    f"{'GFLOP/tok':>9s} {'GFLOP/s':>8s} {'MFU':>6s} {'peak MiB':>9s} {'dropped':>7s} "
    f"{'1k steps':>8s}"
  )
  lines = [header, "-" * len(header)]
  for r in results["runs"]:
    peak = r["compiled_peak_bytes"]
    lines.append(
      f"{r['label']:<26s} {r['compile_seconds']:9.1f} {1e3 * r['step_seconds']['median']:9.1f} "
      f"{1e3 * r['step_seconds']['iqr']:7.1f} {r['tokens_per_sec']:9.0f} "
      f"{r['train_flops_per_token'] / 1e9:9.4f} {r['achieved_flops_per_sec'] / 1e9:8.1f} "
      f"{r['mfu']:6.1%} {(peak or 0) / 2**20:9.1f} {r['dropped_fraction']:7.3f} "
      f"{1000 * r['step_seconds']['median'] / 60:6.1f} m"
    )
  for failure in results.get("failed", []):
    lines.append(f"{failure['label']:<26s} FAILED: {failure['error'][:200]}")
  mm = results["matmul"]
  lines.append(
    f"matmul probe: {mm['size']}^2 {mm['dtype']} at {mm['flops_per_sec'] / 1e9:.1f} GFLOP/s "
    f"({results['backend']}, {results['device']}); {results['steps']} timed steps each"
  )
  if results.get("routing", "model") != "model":
    lines.append(f"routing: {results['routing']} (K experts drawn uniformly per token)")
  malloc = results.get("host_malloc") or {"settings": "none (the platform's defaults)"}
  lines.append("host allocator: " + " ".join(f"{k}={v}" for k, v in malloc.items()))
  lines += _ratio_lines(results["runs"])
  for r in results["runs"]:
    if r.get("faulted_steps"):
      lines.append(
        f"{r['label']}: {r['faulted_steps']} of {results['steps']} timed steps touched "
        f">= {FAULTED_CALL_BYTES >> 20} MiB of fresh memory (page faults, slow: "
        "experiments/PERF.md 22): its median and iqr include them"
      )
  if "layer_cost" in results:
    lc = results["layer_cost"]
    lines.append(
      f"dispatch share of one layer ({lc['config']}): {lc['dispatch_fraction']:.1%} "
      f"({1e3 * lc['identity_experts_seconds']:.2f} of {1e3 * lc['layer_seconds']:.2f} ms "
      f"fwd+bwd)"
    )
  if results["device_peak_bytes"] is not None:
    lines.append(f"device peak memory: {results['device_peak_bytes'] / 2**30:.2f} GiB")
  return "\n".join(lines)


def _ratio_lines(runs: list[dict[str, Any]]) -> list[str]:
  """Every run's step time against the first's, and each dropless run against its capacity
  baseline."""
  lines = []
  step = lambda r: r["step_seconds"]["median"]
  for r in runs[1:]:
    lines.append(f"step time {r['label']} / {runs[0]['label']}: {step(r) / step(runs[0]):.2f}x")
  for r in runs:
    base = capacity_baseline(r, runs)
    if r["dispatch"] != "dropless" or base is None:
      continue
    cpu = r["step_cpu_seconds"]["median"] / base["step_cpu_seconds"]["median"]
    peak = (r["compiled_peak_bytes"] or 0) / max(base["compiled_peak_bytes"] or 1, 1)
    lines.append(
      f"dropless/capacity {r['label']}: wall {step(r) / step(base):.2f}x, "
      f"CPU time {cpu:.2f}x, compiled peak {peak:.2f}x"
    )
  return lines


def format_memory_table(results: dict[str, Any]) -> str:
  """A fixed-width table of `memory_report`'s rows."""
  lines = [f"{'program':<34s} {'compile s':>9s} {'peak MiB':>10s} {'vs capacity':>11s}"]
  for r in results["memory_only"]:
    ratio = "" if r["peak_vs_capacity"] is None else f"{r['peak_vs_capacity']:.2f}x"
    lines.append(
      f"{r['label']:<34s} {r['compile_seconds']:9.1f} "
      f"{(r['compiled_peak_bytes'] or 0) / 2**20:10.1f} {ratio:>11s}"
    )
  r = results["memory_only"][0]
  lines.append(
    f"compiled peak memory ({results['backend']}): batch {r['batch']} x {r['seq']}, "
    f"{r['dtype']}, {r['num_layers']} layers, vocab {r['vocab_size']}"
  )
  return "\n".join(lines)
