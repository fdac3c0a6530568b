"""Timing machinery of `experiments.bench`: compiled programs called round-robin, their spread.

Every timed program runs one call per round, so ratios between programs (MFU,
CoE/MoE, dropless/capacity) compare numbers taken under the same machine load.
Each call records wall-clock seconds, this process's CPU seconds (which other
processes on a shared CPU barely change) and its minor page faults (memory
touched for the first time, which makes a call slow: experiments/PERF.md 22).
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

FAULTED_CALL_BYTES = 64 << 20  # a call that touches this much fresh memory counts as faulted


@dataclasses.dataclass
class Timed:
  """A compiled program benchmarked round-robin: `call()` runs it once, blocking.

  `seconds` is wall-clock time per call; `cpu_seconds` the CPU time this
  process spent in it (all threads), which other processes on a shared CPU
  barely change; `page_faults` the minor page faults of the process during it
  (memory touched for the first time). `xla_flops` is XLA's own count
  (`cost_analysis()`), if known.
  """

  name: str
  call: Callable[[], Any]
  seconds: list[float] = dataclasses.field(default_factory=list)
  cpu_seconds: list[float] = dataclasses.field(default_factory=list)
  page_faults: list[int] = dataclasses.field(default_factory=list)
  xla_flops: Optional[float] = None

  def run_once(self) -> None:
    faults0 = _minor_faults()
    cpu0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(self.call())
    self.seconds.append(time.perf_counter() - t0)
    self.cpu_seconds.append(time.process_time() - cpu0)
    self.page_faults.append(_minor_faults() - faults0)

  def faulted_steps(self) -> int:
    """Timed calls that touched >= `FAULTED_CALL_BYTES` of fresh memory (slow calls).

    Counted in base pages: where transparent huge pages back the memory, one
    fault maps 2 MiB and such calls go uncounted (`step_page_faults` has the raw counts).
    """
    pages = FAULTED_CALL_BYTES // resource.getpagesize()
    return sum(faults >= pages for faults in self.page_faults)


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_round_robin(
  programs: list[Timed], warmup: int, steps: int, settle_seconds: float = 0.0
) -> None:
  """`warmup` untimed then `steps` timed calls of every program, interleaved call by call.

  `settle_seconds`: a pause before each timed call, so that a thread pool still spinning
  after the previous program (XLA's, or another process's OpenMP) takes no core from it.
  """
  for _ in range(warmup):
    for program in programs:
      jax.block_until_ready(program.call())
  for _ in range(steps):
    for program in programs:
      time.sleep(settle_seconds)
      program.run_once()


def spread(seconds: list[float]) -> dict[str, float]:
  """Median, min, max and interquartile range of a list of timings."""
  return dict(
    median=statistics.median(seconds),
    min=min(seconds),
    max=max(seconds),
    iqr=float(np.subtract(*np.percentile(seconds, [75, 25]))),
  )


def matmul_probe(dtype: jnp.dtype, size: int) -> tuple[Timed, float]:
  """A [size, size] @ [size, size] matmul in `dtype` and its FLOPs (2 size^3): the machine's
  own matmul rate, measured beside the programs, is the denominator of their MFU."""
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys)
  compiled = jax.jit(jnp.dot).lower(a, b).compile()
  return Timed(f"matmul[{size}]", lambda: compiled(a, b)), 2.0 * size**3


def xla_flops(compiled) -> Optional[float]:
  """FLOPs XLA counts for a compiled program (None where the backend gives no estimate)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(analysis, list):  # older JAX returns one dict per program
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None
