"""Deviceless GPU compile check: the real train step compiled for H100 / H200 from a CPU host.

    make gpu-check                                   # the CI subset, in .venv-gpu
    .venv-gpu/bin/python -m experiments.gpu_compile  # paper pair, every program, 1 and 8 GPUs
    .venv-gpu/bin/python -m experiments.gpu_compile --all_configs --targets=h100,h200

Needs the CUDA build of JAX (`pip install -c constraints.txt -e '.[train,gpu]'`) and no GPU:
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=<the
experiments/gpu_targets/*.txtpb text proto>, topology="1x1x<n>")` gives the devices, a
(data, fsdp, expert) mesh over them, and `jax.jit(train_step).lower(<abstract state and
batch carrying shardings on that mesh>).compile()` the program those GPUs would run. No
platform is forced: the kernel policies read the mesh's devices (`nn.tuning`).

Each program compiles in a child process (a failure or an out-of-memory kill is a row, not
the end of the run). Per program: compile seconds, state and temporary GiB per device
against the device's memory, while loops (and how many have a trip count XLA cannot bound,
i.e. data-dependent), GEMM fusions and GEMM/kernel custom calls, collectives by kind;
each dropless row's ratios to its capacity row. Writes JSON (`--out`); prints the table
last. `--check` exits 1 when the default dropless program misses the issue-24 targets (no
data-dependent loops, temp <= 1.1x capacity's, state + temp within the device, all-reduces
<= 1.5x capacity's on 8 GPUs).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin must not look for a GPU

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGETS = {
  "h100": "experiments/gpu_targets/h100_sxm.txtpb",
  "h200": "experiments/gpu_targets/h200.txtpb",
}
PAPER_PAIR = ("configs/moe_k8.py", "configs/coe_c2.py")
# program name -> (model.dispatch, model.dropless_impl)
PROGRAMS = {
  "capacity": ("capacity", "auto"),
  "dropless": ("dropless", "auto"),
  "dropless[grouped]": ("dropless", "grouped"),
  "dropless[blocked]": ("dropless", "blocked"),
  "dropless[ragged_dot]": ("dropless", "ragged_dot"),
  "dropless[gather]": ("dropless", "gather"),
}
# mesh name -> (devices, (data, fsdp, expert)); 'expert' only where N divides over 8
MESHES = {
  "1": (1, (1, 1, 1)),
  "8data": (8, (8, 1, 1)),
  "8fsdp": (8, (1, 8, 1)),
  "8ep": (8, (1, 1, 8)),
}
GIB = 1 << 30
COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "ragged-all-to-all",
  "collective-permute",
)


# ---------------------------------------------------------------------------
# One program (child process)
# ---------------------------------------------------------------------------


def _topology_mesh(target: str, devices: int, shape: tuple[int, int, int]):
  import numpy as np
  from jax.experimental import topologies
  from jax.sharding import AxisType, Mesh

  from coe_jax.training.sharding import MESH_AXES

  text = (REPO / TARGETS[target]).read_text()
  topo = topologies.get_topology_desc(
    platform="cuda", target_config=text, topology=f"1x1x{devices}"
  )
  grid = np.array(topo.devices[:devices]).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3), text


def compile_program(spec: dict[str, Any]) -> dict[str, Any]:
  """Compiles one train step for the spec's target/config/mesh/program; returns its facts."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from coe_jax import config_lib
  from coe_jax.nn import params
  from coe_jax.nn.model import CoECausalLM
  from coe_jax.training import metrics, sharding, train_step

  devices, shape = MESHES[spec["mesh"]]
  mesh, target_text = _topology_mesh(spec["target"], devices, shape)
  config = config_lib.load_config_file(f"{spec['config']}:{spec['scale']}", root=REPO)
  dispatch, impl = PROGRAMS[spec["program"]]
  config.model.dispatch, config.model.dropless_impl = dispatch, impl
  for key, value in spec.get("model", {}).items():
    config.model[key] = value
  model_config = config_lib.model_config_from(config, config.data.get("vocab_size", 102400))
  batch, seq = spec["batch"], spec["seq"]
  parallel = sharding.Parallelism(mesh if devices > 1 else None)
  model = CoECausalLM(model_config, expert_parallel=parallel.expert_parallel())
  make_state = lambda: train_step.init_train_state(model, config.train, config.seed, seq)
  abstract = jax.eval_shape(make_state)
  replicated = NamedSharding(mesh, P())
  if devices > 1:
    sharding.validate_for_mesh(mesh, model_config, {"batch": batch})
    axes_tree = params.param_axes(model_config)
    state_sh = sharding.state_shardings(abstract, mesh, axes_tree)
    batch_sh = sharding.batch_sharding(mesh)
  else:
    state_sh, batch_sh = jax.tree.map(lambda _: replicated, abstract), replicated
  sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  state = jax.tree.map(sds, abstract, state_sh)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sh)
  data = dict(input_ids=ids, attention_mask=ids, segment_ids=ids, positions=ids)
  rng = sds(jax.eval_shape(lambda: jax.random.key(1)), replicated)
  step = jax.jit(
    train_step.make_train_step(model, 1, config.train.log_routing_stats),
    donate_argnums=0,
    in_shardings=(state_sh, batch_sh, replicated),
    out_shardings=(state_sh, replicated),
  )
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = step.lower(state, data, rng)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  resident, temp = metrics.compiled_memory_split(compiled)
  memory = int(re.search(r"device_memory_size:\s*(\d+)", target_text).group(1))
  return dict(
    spec,
    device=mesh.devices.flat[0].device_kind,
    lower_seconds=t1 - t0,
    compile_seconds=t2 - t1,
    state_bytes=resident,
    temp_bytes=temp,
    device_memory_bytes=memory,
    fits=resident + temp < memory,
    **hlo_facts(compiled.as_text()),
  )


def hlo_facts(hlo: str) -> dict[str, Any]:
  """Counts in optimized HLO text: while loops (unbounded: no `known_trip_count`), GEMM
  fusions by kind, custom calls by target, collectives by kind (async starts counted once)."""
  whiles = [line for line in hlo.splitlines() if re.search(r"\swhile\(", line)]
  fusion_kinds = collections.Counter(re.findall(r'"kind":"(__[A-Za-z_$]+)"', hlo))
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
  collectives = {}
  for kind in COLLECTIVES:
    found = re.findall(rf"\s{kind}(?:-start)?\(", hlo)
    if found:
      collectives[kind] = len(found)
  return dict(
    while_loops=len(whiles),
    data_dependent_loops=sum("known_trip_count" not in line for line in whiles),
    gemm_fusions=sum(n for kind, n in fusion_kinds.items() if "gemm" in kind or "cudnn" in kind),
    fusion_kinds=dict(fusion_kinds),
    custom_calls=dict(targets),
    gemm_custom_calls=sum(n for t, n in targets.items() if "gemm" in t or "matmul" in t),
    triton_kernels=sum(n for t, n in targets.items() if "triton" in t),
    collectives=collectives,
  )


# ---------------------------------------------------------------------------
# Driver (parent process)
# ---------------------------------------------------------------------------


def run_child(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
  """`compile_program(spec)` in a fresh Python (its memory returned at exit); errors as rows."""
  command = [sys.executable, "-m", "experiments.gpu_compile", "--child", json.dumps(spec)]
  try:
    done = subprocess.run(
      command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
  except subprocess.TimeoutExpired:
    return dict(spec, error=f"timed out after {timeout} s")
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if done.returncode or not lines:
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return dict(spec, error=f"exit {done.returncode}: " + " | ".join(tail))
  return json.loads(lines[-1])


def expert_count(config: str, scale: str) -> int:
  from coe_jax import config_lib

  return config_lib.load_config_file(f"{config}:{scale}", root=REPO).model.n_routed_experts


def overrides(text: str) -> dict[str, Any]:
  """'a=1,b=x' -> {'a': 1, 'b': 'x'} (values parsed as JSON where they parse)."""
  pairs = [item.split("=", 1) for item in text.split(",") if item]
  return {key: _value(value) for key, value in pairs}


def _value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Every (target, config, mesh, program) to compile, capacity first in each group."""
  configs = args.configs.split(",") if args.configs else list(PAPER_PAIR)
  if args.all_configs:
    configs = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.py"))
    configs = [c for c in configs if not c.endswith("demo.py")]
  specs = []
  for target in args.targets.split(","):
    for config in configs:
      experts = overrides(args.set).get("n_routed_experts") or expert_count(config, args.scale)
      for mesh in args.meshes.split(","):
        if mesh == "8ep" and experts % 8:
          print(f"skip {config} on {mesh}: N={experts} does not split over 8", file=sys.stderr)
          continue
        for program in args.programs.split(","):
          spec = dict(target=target, config=config, mesh=mesh, program=program, scale=args.scale)
          specs.append(dict(spec, batch=args.batch, seq=args.seq, model=overrides(args.set)))
  return specs


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each row's temp, compile-time and all-reduce ratios to its group's capacity row."""
  base = {
    (r["target"], r["config"], r["mesh"]): r
    for r in rows
    if r["program"] == "capacity" and "error" not in r
  }
  for row in rows:
    cap = base.get((row["target"], row["config"], row["mesh"]))
    if cap is None or "error" in row:
      continue
    row["temp_ratio"] = row["temp_bytes"] / max(cap["temp_bytes"], 1)
    row["compile_ratio"] = row["compile_seconds"] / max(cap["compile_seconds"], 1e-9)
    reduces = lambda r: r["collectives"].get("all-reduce", 0)
    row["all_reduce_ratio"] = reduces(row) / max(reduces(cap), 1) if reduces(cap) else None
  return rows


def misses(row: dict[str, Any]) -> list[str]:
  """Issue-24 targets the default dropless program misses (empty: met). Compile time (target
  <= 1.5x capacity's) is printed, not checked: on a shared CI machine it moves by +-30%."""
  if row["program"] != "dropless":
    return []
  if "error" in row:
    return [row["error"]]
  found = []
  if row["data_dependent_loops"]:
    found.append(f"{row['data_dependent_loops']} data-dependent loops")
  if row.get("temp_ratio", 0) > 1.1:
    found.append(f"temp {row['temp_ratio']:.2f}x capacity")
  if not row["fits"]:
    found.append("state + temp over the device memory")
  if row["mesh"] != "1" and (row.get("all_reduce_ratio") or 0) > 1.5:
    found.append(f"all-reduces {row['all_reduce_ratio']:.2f}x capacity")
  return found


def table(rows: list[dict[str, Any]]) -> str:
  head = (
    "| target | config | mesh | program | compile s (x cap) | state GiB | temp GiB (x cap) "
    "| of device GiB | while (data-dep.) | GEMM fusions / GEMM calls / Triton | collectives |"
  )
  lines = [head, "|" + "---|" * 11]
  for r in rows:
    name = (r["target"], Path(r["config"]).stem, r["mesh"], r["program"])
    if "error" in r:
      lines.append("| {} | {} | {} | {} | ".format(*name) + f"failed: {r['error'][:160]} |")
      continue
    ratio = lambda key: f" ({r[key]:.2f}x)" if r.get(key) is not None else ""
    coll = ", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "-"
    lines.append(
      "| {} | {} | {} | {} | ".format(*name)
      + f"{r['compile_seconds']:.0f}{ratio('compile_ratio')} | {r['state_bytes'] / GIB:.1f} | "
      f"{r['temp_bytes'] / GIB:.1f}{ratio('temp_ratio')} | "
      f"{(r['state_bytes'] + r['temp_bytes']) / GIB:.1f} of {r['device_memory_bytes'] / GIB:.0f} "
      f"| {r['while_loops']} ({r['data_dependent_loops']}) | "
      f"{r['gemm_fusions']} / {r['gemm_custom_calls']} / {r['triton_kernels']} | {coll} |"
    )
  return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--targets", default="h100", help=f"comma-separated: {', '.join(TARGETS)}")
  parser.add_argument("--configs", default=None, help="comma-separated config files")
  parser.add_argument("--all_configs", action="store_true", help="every configs/*.py but demo")
  parser.add_argument("--programs", default=",".join(PROGRAMS), help=", ".join(PROGRAMS))
  parser.add_argument("--meshes", default="1,8data,8fsdp,8ep", help=", ".join(MESHES))
  parser.add_argument(
    "--set",
    default="",
    help="model overrides, comma-separated key=value (e.g. n_routed_experts=64)",
  )
  parser.add_argument("--scale", default="paper", help="config scale: paper | tiny | narrow")
  parser.add_argument("--batch", type=int, default=64, help="sequences per step (paper: 64)")
  parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (paper: 512)")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per compile")
  parser.add_argument("--out", default="runs/gpu_compile/gpu_compile.json")
  parser.add_argument("--check", action="store_true", help="exit 1 if default dropless misses")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
  args = parse_args(argv)
  if args.child:
    print(json.dumps(compile_program(json.loads(args.child))))
    return 0
  rows = []
  for spec in plan(args):
    row = run_child(spec, args.timeout)
    rows.append(row)
    status = row.get("error") or (
      f"{row['compile_seconds']:.0f} s, temp {row['temp_bytes'] / GIB:.1f} GiB, "
      f"{row['while_loops']} loops ({row['data_dependent_loops']} data-dependent)"
    )
    print(f"{spec['target']} {spec['config']} {spec['mesh']} {spec['program']}: {status}")
    sys.stdout.flush()
  rows = with_ratios(rows)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(rows=rows), indent=1))
  print(table(rows))
  failed = [(r, m) for r in rows for m in [misses(r)] if m]
  for row, found in failed:
    print(f"MISSED {row['target']} {row['config']} {row['mesh']}: {'; '.join(found)}")
  return 1 if args.check and failed else 0


if __name__ == "__main__":
  sys.exit(main())
