"""Host-memory admission of `experiments.bench`'s programs (CPU runs), before any state exists.

A CPU process that allocates more than the host holds is killed by the kernel
halfway through the run, every result lost. The bench compiles every program
from abstract state first, so their memory is known before any is allocated:
`fit_in_host_memory` keeps the programs that fit together and names the first
that does not.
"""

from __future__ import annotations

import sys
from typing import Optional

from experiments.bench_programs import StepBench

# Beside the programs' states and temporaries: init's temporaries, the probe, Python's growth (the
# memory the process holds already is outside what `host_memory.available_bytes` counts). Not
# counted: `--layer_cost`'s two layer programs (~2 GB at the paper width).
HOST_MEMORY_MARGIN = 512 << 20


def fit_in_host_memory(
  benches: list[StepBench], available: Optional[int], keep_going: bool, failures: list[dict]
) -> list[StepBench]:
  """The programs that fit in `available` bytes of host memory together, in order (CPU runs).

  Checked before any train state is allocated. Every program keeps its state
  (its compiled arguments and outputs) for the whole run and needs its
  temporary buffer at each call. With `host_memory`'s allocator settings the
  heap never shrinks, so the process needs at least the states plus the largest
  temporary buffer, and up to the sum of the compiled peaks where a freed
  buffer is too small for the next one (experiments/PERF.md 23). A program that
  takes the first past `available` less `HOST_MEMORY_MARGIN` stops the run with
  an error naming it (with `keep_going`: it is reported in `failures` and left
  out), where the kernel would otherwise kill the process and every result
  would be lost; the second only draws a warning. Where `available` or any
  program's sizes are unknown, every program is kept.
  """
  if available is None or any(b.resident_bytes is None for b in benches):
    return benches
  budget = available - HOST_MEMORY_MARGIN
  kept, states, largest_temp = [], 0, 0
  for bench in benches:
    state, temp = bench.resident_bytes, bench.temp_bytes
    need = states + state + max(largest_temp, temp)
    if need <= budget:
      kept.append(bench)
      states, largest_temp = states + state, max(largest_temp, temp)
      continue
    error = _does_not_fit(len(kept), states + state, max(largest_temp, temp), need, available)
    if not keep_going:
      raise SystemExit(f"bench: {bench.label}: {error}")
    failures.append(dict(label=bench.label, error=error))
    print(f"bench: {bench.label} left out: {error}", file=sys.stderr)
  peaks = sum(b.resident_bytes + b.temp_bytes for b in kept)
  if peaks > budget:
    print(
      f"bench: warning: the programs' compiled peaks sum to {_gib(peaks)}, more than the "
      f"{_gib(available)} of host memory available less {_gib(HOST_MEMORY_MARGIN)}; if the "
      "heap fragments, the kernel kills the process (experiments/PERF.md 23)",
      file=sys.stderr,
    )
  return kept


def _does_not_fit(kept: int, states: int, largest_temp: int, need: int, available: int) -> str:
  """The error for a program that would take the process past the host's memory."""
  return (
    f"HostMemory: with it, the states of the {kept + 1} programs kept "
    f"({_gib(states)}) and the largest temporary buffer "
    f"({_gib(largest_temp)}) take {_gib(need)}, more than the {_gib(available)} "
    f"of host memory available less {_gib(HOST_MEMORY_MARGIN)} for the runtime; "
    + (
      "bench fewer programs per process (fewer configs or values of --dispatch, "
      "--dropless_impl, --dropless_tile, --dropless_tile_sizes, --attention_query_block, "
      "--scan_layers)"
      if kept
      else "it does not fit alone: use a smaller --batch or --seq"
    )
  )


def _gib(n: int) -> str:
  return f"{n / 2**30:.1f} GiB"
