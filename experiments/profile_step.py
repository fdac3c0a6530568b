"""Where a train step's time goes: XLA's per-op trace, summed by op kind, program beside program.

    python -m experiments.profile_step --config=configs/coe_c2.py --shapes=paper_width \
        --dispatch=capacity,dropless --dropless_impl=blocked [--out=profile.json]

Compiles the same train steps as `experiments.bench` (every flag it is given is
passed on to `bench.parse_args`), runs each one a few times under
`jax.profiler.trace`, and sums the trace's per-op events by op kind (the HLO
instruction name without its `.N` suffix: `ynn_fusion`, `dot`,
`slice_bitcast_fusion`, `wrapped_broadcast`, ...; a while loop's own event
is left out, its body's ops are counted). Prints one column per
program (ms per step) with each kind's difference to the first program, and
writes the per-op and per-kind numbers as JSON.

Read the numbers as a map, not a stopwatch: XLA:CPU runs independent ops
concurrently, so an op's event also counts the time it waited for a core
(the kinds sum to more than the step's wall time), and on a shared machine
every number moves with the load. PERF.md 15 shows what they were good for.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import jax

from coe_jax import host_memory
from coe_jax.nn.blocked import TILES_BWD_SCOPE
from experiments import bench

# Trace events that are not one XLA op (runtime, Python, thread-pool bookkeeping), and ops
# whose event spans the ops of their body (counted there).
_NOT_AN_OP = re.compile(r"[\s:$()<>]")
CONTAINER_KINDS = ("while", "conditional", "call")
STEP_EVENT = "ThunkExecutor::Execute (wait for completion)"


def op_kind(name: str) -> str:
  """`ynn_fusion.12` -> `ynn_fusion`."""
  return re.sub(r"\.\d+$", "", name)


def trace_op_times(call, steps: int) -> dict[str, Any]:
  """Runs `call` `steps` times under the profiler; ms per step of every op and of the step."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(call())
    traces = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not traces:
      raise RuntimeError(f"jax.profiler.trace wrote no perfetto trace under {trace_dir}")
    with gzip.open(traces[-1]) as f:
      data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  ops: collections.Counter = collections.Counter()
  step_ms = 0.0
  for event in events:
    if event.get("ph") != "X":
      continue
    name, ms = event["name"], event.get("dur", 0) / 1e3 / steps
    if name == STEP_EVENT:
      step_ms += ms
    elif not _NOT_AN_OP.search(name) and op_kind(name) not in CONTAINER_KINDS:
      ops[name] += ms
  kinds: collections.Counter = collections.Counter()
  for name, ms in ops.items():
    kinds[op_kind(name)] += ms
  return dict(step_ms=step_ms, ops=dict(ops), kinds=dict(kinds))


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
MLP_PARTS = ("router", "layout", "gather", "tiles", "combine", "shared_expert")


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> its JAX op name (`metadata.op_name`), for every instruction of a
  compiled module. A fusion without one takes its computation's root's (or its most common);
  an op XLA made without one (e.g. a rewritten dot) its first named operand's."""
  own: dict[str, str] = {}
  calls: dict[str, str] = {}
  operands: dict[str, list[str]] = {}
  members: dict[str, list[str]] = collections.defaultdict(list)
  roots: dict[str, str] = {}
  computation = ""
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and "=" not in line.split("(")[0]:
      computation = header.group(1)
      continue
    instruction = _INSTRUCTION.match(line)
    if not instruction:
      continue
    name, rest = instruction.groups()
    members[computation].append(name)
    if line.lstrip().startswith("ROOT"):
      roots[computation] = name
    op_name = _OP_NAME.search(rest)
    if op_name:
      own[name] = op_name.group(1)
    called = _CALLS.search(rest)
    if called:
      calls[name] = called.group(1)
    arguments = re.search(r"\w\((.*?)\)", rest)
    operands[name] = re.findall(r"%([\w.\-]+)", arguments.group(1)) if arguments else []

  def resolve(name: str, depth: int = 0) -> str:
    if name in own or depth > 8:
      return own.get(name, "")
    found = ""
    computation = calls.get(name)
    if computation is not None:
      root = roots.get(computation)
      found = resolve(root, depth + 1) if root else ""
      if not found:
        named = [resolve(m, depth + 1) for m in members.get(computation, ())]
        named = [n for n in named if n]
        found = collections.Counter(named).most_common(1)[0][0] if named else ""
    for operand in operands.get(name, ()) if not found else ():
      found = resolve(operand, depth + 1)
      if found:
        break
    own[name] = found
    return found

  return {name: resolve(name) for computation in members.values() for name in computation}


def component(op_name: str) -> str:
  """The part of the train step an op belongs to, from its op name: 'fwd'/'bwd' and the model
  scope (layers' index dropped; the MoE block split by our named scopes), or the loss / the
  optimizer update outside the model."""
  if not op_name:
    return "(no op name)"
  if TILES_BWD_SCOPE in op_name:  # traced outside the model's name stack
    return "mlp/tiles bwd"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  inside = re.search(r"CoECausalLM\)*/(.+)", op_name)
  if inside is None:
    return f"loss {direction}" if "jvp(" in op_name else "optimizer update"
  path = inside.group(1).split("/")
  if re.fullmatch(r"layers_\d+", path[0]) and len(path) > 1:
    part = path[1]
    if part == "mlp":
      sub = next((p for p in MLP_PARTS if p in path[2:]), "other")
      part = f"mlp/{sub}"
  else:
    part = path[0]
  return f"{part} {direction}"


def by_component(ops: dict[str, float], hlo_text: str) -> dict[str, float]:
  """ms per step of each `component` (ops summed by their op names in `hlo_text`)."""
  names = op_names(hlo_text)
  totals: collections.Counter = collections.Counter()
  for op, ms in ops.items():
    totals[component(names.get(op, ""))] += ms
  return dict(totals)


def format_kinds(
  labels: list[str], profiles: list[dict[str, Any]], top: int, key: str = "kinds"
) -> str:
  """One row per op kind (or per `key` group; the `top` largest over all programs), ms per
  step per program."""
  totals: collections.Counter = collections.Counter()
  for profile in profiles:
    totals.update(profile[key])
  width = max(12, *(len(label) for label in labels))
  head = f"{'op kind' if key == 'kinds' else 'component':<34s}" + "".join(
    f" {label:>{width}s}" for label in labels
  )
  if len(labels) > 1:
    head += "".join(f" {'#' + str(i + 1) + ' - #1':>{width}s}" for i in range(1, len(labels)))
  lines = [head, "-" * len(head)]
  rows = [k for k, _ in totals.most_common(top)]
  for kind in rows + ["(all ops)", "(step wall, in the trace)"]:
    if kind == "(all ops)":
      values = [sum(p[key].values()) for p in profiles]
    elif kind.startswith("(step"):
      values = [p["step_ms"] for p in profiles]
    else:
      values = [p[key].get(kind, 0.0) for p in profiles]
    line = f"{kind:<34s}" + "".join(f" {v:{width}.1f}" for v in values)
    line += "".join(f" {v - values[0]:+{width}.1f}" for v in values[1:])
    lines.append(line)
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
  parser.add_argument("--trace_steps", type=int, default=3, help="profiled steps per program")
  parser.add_argument("--top", type=int, default=20, help="op kinds shown")
  parser.add_argument("--out", default=None, help="write per-op and per-kind ms as JSON here")
  ours, rest = parser.parse_known_args(argv)
  args = bench.parse_args(rest)
  benches = bench.runnable_benches(args)
  for step in benches:  # warm up every program before any trace
    for _ in range(max(1, args.warmup)):
      jax.block_until_ready(step.timed.call())
  profiles = [trace_op_times(step.timed.call, ours.trace_steps) for step in benches]
  for profile, step in zip(profiles, benches):
    profile["components"] = by_component(profile["ops"], step.hlo_text)
  labels = [step.label for step in benches]
  print(format_kinds(labels, profiles, ours.top))
  print()
  print(format_kinds(labels, profiles, ours.top, key="components"))
  results = dict(
    backend=jax.default_backend(),
    jax_version=jax.__version__,
    trace_steps=ours.trace_steps,
    programs=[dict(label=label, **profile) for label, profile in zip(labels, profiles)],
  )
  if ours.out:
    Path(ours.out).write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # CPU: reuse the step's memory (PERF.md 19)
  main(sys.argv[1:])
