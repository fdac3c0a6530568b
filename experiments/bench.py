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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from coe_jax import config_lib, host_memory
from coe_jax.nn import coe_layer, dispatch, router, tuning
from coe_jax.nn.coe_layer import CoELayer

# The analytic FLOP count lives in the library: the training log reports the same numbers.
from coe_jax.nn.flops import FlopCount, flops_per_token  # noqa: F401 (re-exported)
from coe_jax.nn.layers import compute_dtype
from coe_jax.nn.model import CoECausalLM
from coe_jax.nn.model_config import ModelConfig
from coe_jax.training import metrics as metrics_lib
from coe_jax.training import train_step

REPO = Path(__file__).resolve().parents[1]
SUITE = (
  ("MoE(K=8)", "configs/moe_k8.py"),
  ("CoE(C=2,K=4)", "configs/coe_c2.py"),
  ("CoE(C=2,K=8)", "configs/coe_c2_k8.py"),
)
# --shapes presets: model overrides plus batch / seq / suite scale.
SHAPES = {
  # the headline study's scale (its trimmed tokenizer's vocab), as `versus_reference` times it
  "narrow": dict(scale="narrow", batch=16, seq=256, model=dict(vocab_size=5620, dtype="float32")),
  "paper_width": dict(
    scale="paper", batch=1, seq=512, model=dict(num_layers=2, vocab_size=8192, dtype="float32")
  ),
}
ROUTINGS = ("model", "balanced")


def balanced_route(
  x, weight, *, k: int, norm_topk_prob: bool = False, routed_scaling_factor: float = 1.0, **kwargs
) -> router.RouterOutput:
  """The model's router with its top-K replaced by K distinct experts drawn uniformly per token.

  Loads are then binomial around tokens * K / N, what the load-balancing loss trains an
  untrained router's skewed loads towards; combine weights, losses and gradients stay the
  router's (its probabilities at the drawn experts, normalised and scaled as the router's
  own; `router.combine_weights`). Cost only: the routing
  is fixed (one key), so the draw is the same at every step and iteration.
  """
  scaling = dict(norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor)
  routing = router.route(x, weight, k=k, **scaling, **kwargs)
  noise = jax.random.uniform(jax.random.key(0), routing.probs.shape)
  _, expert_ids = jax.lax.top_k(noise, k)
  top_probs = jnp.take_along_axis(routing.probs, expert_ids, axis=-1)
  return routing.replace(
    expert_ids=expert_ids.astype(jnp.int32),
    combine_weights=router.combine_weights(top_probs, **scaling),
  )


def routing_patch(routing: str):
  """A context in which CoE layers traced route as `routing` says ('model': unchanged)."""
  if routing == "model":
    return contextlib.nullcontext()
  return mock.patch.object(coe_layer, "route", balanced_route)


# ---------------------------------------------------------------------------
# Timing machinery
# ---------------------------------------------------------------------------


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
    """Timed calls that touched >= `FAULTED_CALL_BYTES` of fresh memory (slow, PERF.md 22).

    Counted in base pages: where transparent huge pages back the memory, one
    fault maps 2 MiB and such calls go uncounted (`step_page_faults` has the raw counts).
    """
    pages = FAULTED_CALL_BYTES // resource.getpagesize()
    return sum(faults >= pages for faults in self.page_faults)


FAULTED_CALL_BYTES = 64 << 20


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
  return dict(
    median=statistics.median(seconds),
    min=min(seconds),
    max=max(seconds),
    iqr=float(np.subtract(*np.percentile(seconds, [75, 25]))),
  )


def matmul_probe(dtype: jnp.dtype, size: int) -> tuple[Timed, float]:
  """A [size, size] @ [size, size] matmul in `dtype` and its FLOPs (2 size^3)."""
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys)
  compiled = jax.jit(jnp.dot).lower(a, b).compile()
  return Timed(f"matmul[{size}]", lambda: compiled(a, b)), 2.0 * size**3


# ---------------------------------------------------------------------------
# The train step of one config
# ---------------------------------------------------------------------------


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> `get_config(arg)` (paths relative to the repo root too)."""
  return config_lib.load_config_file(spec, root=REPO)


def bench_model_config(
  config: ml_collections.ConfigDict, dispatch_mode: str, overrides: dict[str, Any]
) -> ModelConfig:
  """The config's ModelConfig with the dispatch and overrides applied.

  `model.vocab_size == 0` (the tokenizer's size) becomes the BPE size the data
  config asks for (`data.vocab_size`): the bench feeds random token ids.
  """
  model = config_lib.model_config_from(config, config.data.get("vocab_size", 2048))
  changes = {k: v for k, v in overrides.items() if v is not None}
  return model.replace(dispatch=dispatch_mode, **changes)


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, jax.Array]:
  ids = jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, jnp.int32)
  ones = jnp.ones((batch, seq), jnp.int32)
  return dict(
    input_ids=ids,
    attention_mask=ones,
    segment_ids=ones,
    positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
  )


@dataclasses.dataclass
class StepBench:
  """One config's compiled train step and what is known before timing.

  Compiled from abstract state: no train state exists until `allocate()` makes
  it (then `timed` can run).
  """

  label: str
  model_config: ModelConfig
  batch_shape: tuple[int, int]
  compile_seconds: float
  compiled_peak_bytes: Optional[int]
  timed: Timed
  last_metrics: dict
  make_state: Callable[[], Any]
  # compiled arguments + outputs - aliased (the state, kept between calls) and temporaries
  # (allocated at each call); None where the backend has no `memory_analysis`
  resident_bytes: Optional[int] = None
  temp_bytes: Optional[int] = None
  hlo_text: str = (
    ""  # the compiled program (op names for `experiments.profile_step --by=component`)
  )

  def allocate(self) -> None:
    self.last_metrics["state"] = jax.block_until_ready(self.make_state())


def build_step_bench(
  label: str,
  config: ml_collections.ConfigDict,
  model_config: ModelConfig,
  batch: int,
  seq: int,
) -> StepBench:
  """Compiles the train step from abstract state: no train state until `allocate()`."""
  model = CoECausalLM(model_config)
  make_state = lambda: train_step.init_train_state(model, config.train, config.seed, seq)
  data = random_batch(batch, seq, model_config.vocab_size)
  rng = jax.random.key(1)
  step_fn = jax.jit(train_step.make_train_step(model, 1, log_routing_stats=False), donate_argnums=0)
  abstract_state = jax.eval_shape(make_state)
  t0 = time.perf_counter()
  compiled = step_fn.lower(abstract_state, data, rng).compile()
  compile_seconds = time.perf_counter() - t0
  holder = {"state": None, "metrics": {}}

  def call():
    holder["state"], holder["metrics"] = compiled(holder["state"], data, rng)
    return holder["state"], holder["metrics"]

  resident, temp = metrics_lib.compiled_memory_split(compiled) or (None, None)
  return StepBench(
    label=label,
    model_config=model_config,
    batch_shape=(batch, seq),
    compile_seconds=compile_seconds,
    compiled_peak_bytes=None if resident is None else resident + temp,
    timed=Timed(label, call),
    last_metrics=holder,
    make_state=lambda: make_state().replace(tx=abstract_state.tx),  # the compiled pytree's `tx`
    resident_bytes=resident,
    temp_bytes=temp,
    hlo_text=compiled.as_text() or "",
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
  cfg = bench.model_config
  sizes = tuning.default_tiling(
    batch * seq * cfg.num_experts_per_tok,
    cfg.n_routed_experts,
    3 * cfg.hidden_size * cfg.moe_intermediate_size * jnp.dtype(cfg.dtype).itemsize,
    cfg.dropless_tile,
    cfg.dropless_tile_sizes,
  )
  return dict(
    label=bench.label,
    dispatch=bench.model_config.dispatch,
    dropless_impl=dispatch.resolve_dropless_impl(bench.model_config.dropless_impl)
    if bench.model_config.dispatch == "dropless"
    else None,
    dropless_tile=sizes[-1],
    dropless_tile_sizes=list(sizes),
    C=bench.model_config.num_iterations,
    K=bench.model_config.num_experts_per_tok,
    N_routed=bench.model_config.n_routed_experts,
    dtype=bench.model_config.dtype,
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


# ---------------------------------------------------------------------------
# Dispatch share of one layer
# ---------------------------------------------------------------------------


def identity_expert(weights, x):
  """An expert that returns its input: the layer then costs routing and dispatch only."""
  del weights
  return x


def layer_program(cfg: ModelConfig, batch: int, seq: int, experts_as_identity: bool) -> Timed:
  """One CoE layer's forward + backward (params and input), compiled, in train mode."""
  coe = cfg.coe
  if experts_as_identity and coe.dispatch == "dropless":
    coe = coe.replace(dropless_impl="gather")  # the generic path a custom expert_fn takes
  layer = CoELayer(coe, expert_fn=identity_expert) if experts_as_identity else CoELayer(coe)
  dtype = compute_dtype(cfg.dtype)
  h = jax.random.normal(jax.random.key(0), (batch, seq, cfg.hidden_size), jnp.float32).astype(dtype)
  params = layer.init(jax.random.key(1), h)["params"]
  probe = jax.random.normal(jax.random.key(2), h.shape, jnp.float32).astype(dtype)

  def loss(params_, h_):
    out, aux = layer.apply({"params": params_}, h_, train=True)
    return jnp.sum((out * probe).astype(jnp.float32)) + aux.aux_loss

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, h).compile()
  name = f"layer{'[identity experts]' if experts_as_identity else ''}"
  return Timed(name, lambda: compiled(params, h), xla_flops=xla_flops(compiled))


def xla_flops(compiled) -> Optional[float]:
  """FLOPs XLA counts for a compiled program (None where the backend gives no estimate)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(analysis, list):  # older JAX returns one dict per program
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


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


def build_benches(args: argparse.Namespace) -> list[StepBench]:
  """Every (config, dispatch mode[, dropless impl], query block) train step, compiled only."""
  preset = SHAPES[args.shapes] if args.shapes else dict(model={})
  scale = preset.get("scale", args.scale)
  specs = (
    [(label, f"{path}:{scale}") for label, path in SUITE]
    if args.suite
    else [(args.config, args.config)]
  )
  overrides = dict(preset["model"])
  overrides.update(
    {k: v for k, v in dict(dtype=args.dtype, remat=args.remat).items() if v is not None}
  )
  impls = (args.dropless_impl or "auto").split(",")
  tiles = [int(t) for t in (args.dropless_tile or "").split(",") if t]
  sizes = [int(s) for s in (args.dropless_tile_sizes or "").split(",") if s]
  benches = []
  failures = args.failures = []
  for label, spec in specs:
    config = load_config(spec)
    if args.optimizer != "config":
      config.train.fused_optimizer = args.optimizer == "fused"
    batch = args.batch or preset.get("batch") or config.train.batch_size
    seq = args.seq or preset.get("seq") or config.data.max_length
    blocks = (args.attention_query_block or "").split(",")
    layouts = [_parse_bool(v, "--scan_layers") for v in (args.scan_layers or "").split(",") if v]
    for mode in args.dispatch.split(","):
      for impl, tile, count in _dropless_variants(mode, impls, tiles, sizes):
        for block, scan in itertools.product(blocks, layouts or [None]):
          changes = dict(overrides, attention_query_block=int(block) if block else None)
          changes["scan_layers"] = scan
          if impl is not None:
            changes["dropless_impl"] = impl
          if tile is not None:
            changes["dropless_tile"] = tile
          if count is not None:
            changes["dropless_tile_sizes"] = count
          model_config = bench_model_config(config, mode, changes)
          name = f"{label} {mode}"
          if impl is not None and args.dropless_impl:
            name += f"[{dispatch.resolve_dropless_impl(impl)}]"
          name += f" tile={tile}" if tile is not None and len(tiles) > 1 else ""
          name += f" sizes={count}" if count is not None and len(sizes) > 1 else ""
          name += f" qb={block}" if len(blocks) > 1 else ""
          name += f" {'stacked' if scan else 'per-layer'}" if len(layouts) > 1 else ""
          try:
            with routing_patch(args.routing):
              benches.append(build_step_bench(name, config, model_config, batch, seq))
          except Exception as error:  # e.g. a dense lowering out of memory: report it, run the rest
            if not args.keep_going:
              raise
            failures.append(dict(label=name, error=f"{type(error).__name__}: {str(error)[:500]}"))
            print(
              f"bench: {name} failed to compile: {failures[-1]['error']}",
              file=sys.stderr,
            )
  return benches


def _parse_bool(value: str, flag: str) -> bool:
  if value.lower() not in ("true", "false"):
    raise SystemExit(f"{flag}: got {value!r}; allowed values: true, false")
  return value.lower() == "true"


def _dropless_variants(mode: str, impls: list[str], tiles: list[int], sizes: list[int]):
  """(impl, tile, sizes) for one dispatch mode: every impl, for 'blocked' every tile x sizes,
  for 'grouped' every tile."""
  if mode != "dropless":
    return [(None, None, None)]
  variants = []
  for impl in impls:
    resolved = dispatch.resolve_dropless_impl(impl)
    if resolved == "blocked":
      variants += itertools.product([impl], tiles or [None], sizes or [None])
    elif resolved == "grouped":  # rows per tile; no tile sizes
      variants += itertools.product([impl], tiles or [None], [None])
    else:
      variants.append((impl, tiles[0] if tiles else None, sizes[0] if sizes else None))
  return variants


def memory_report(benches: list[StepBench]) -> dict[str, Any]:
  """Compiled peak memory of every program and its ratio to the same config's capacity step."""
  rows = []
  for bench in benches:
    base = next(
      (
        b
        for b in benches
        if b.label.rsplit(" ", 1)[0] == bench.label.split(" ")[0]
        and b.model_config.dispatch == "capacity"
      ),
      None,
    )
    peak = bench.compiled_peak_bytes
    rows.append(
      dict(
        label=bench.label,
        compile_seconds=bench.compile_seconds,
        compiled_peak_bytes=peak,
        batch=bench.batch_shape[0],
        seq=bench.batch_shape[1],
        dtype=bench.model_config.dtype,
        num_layers=bench.model_config.num_layers,
        vocab_size=bench.model_config.vocab_size,
        peak_vs_capacity=(
          peak / base.compiled_peak_bytes if base and peak and base.compiled_peak_bytes else None
        ),
      )
    )
  return dict(backend=jax.default_backend(), jax_version=jax.__version__, memory_only=rows)


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
  buffer is too small for the next one (PERF.md 23). A program that takes the
  first past `available` less `HOST_MEMORY_MARGIN` stops the run with an error
  naming it (with `keep_going`: it is reported in `failures` and left out),
  where the kernel would otherwise kill the process and every result would be
  lost; the second only draws a warning. Where `available` or any program's
  sizes are unknown, every program is kept.
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
    error = (
      f"HostMemory: with it, the states of the {len(kept) + 1} programs kept "
      f"({_gib(states + state)}) and the largest temporary buffer "
      f"({_gib(max(largest_temp, temp))}) take {_gib(need)}, more than the {_gib(available)} "
      f"of host memory available less {_gib(HOST_MEMORY_MARGIN)} for the runtime; "
      + (
        "bench fewer programs per process (fewer configs or values of --dispatch, "
        "--dropless_impl, --dropless_tile, --dropless_tile_sizes, --attention_query_block, "
        "--scan_layers)"
        if kept
        else "it does not fit alone: use a smaller --batch or --seq"
      )
    )
    if not keep_going:
      raise SystemExit(f"bench: {bench.label}: {error}")
    failures.append(dict(label=bench.label, error=error))
    print(f"bench: {bench.label} left out: {error}", file=sys.stderr)
  peaks = sum(b.resident_bytes + b.temp_bytes for b in kept)
  if peaks > budget:
    print(
      f"bench: warning: the programs' compiled peaks sum to {_gib(peaks)}, more than the "
      f"{_gib(available)} of host memory available less {_gib(HOST_MEMORY_MARGIN)}; if the "
      "heap fragments, the kernel kills the process (PERF.md 23)",
      file=sys.stderr,
    )
  return kept


def _gib(n: int) -> str:
  return f"{n / 2**30:.1f} GiB"


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
    with routing_patch(args.routing):
      layer_programs = [
        layer_program(first.model_config, *first.batch_shape, identity)
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
  runs = results["runs"]
  if len(runs) > 1:
    base = runs[0]
    for r in runs[1:]:
      lines.append(
        f"step time {r['label']} / {base['label']}: "
        f"{r['step_seconds']['median'] / base['step_seconds']['median']:.2f}x"
      )
  for r in runs:  # each dropless step against the same config's capacity step
    config_name = r["label"].split(" capacity")[0].split(" dropless")[0]
    base = next(
      (
        b
        for b in runs
        if b["dispatch"] == "capacity" and b["label"].startswith(config_name + " capacity")
      ),
      None,
    )
    if r["dispatch"] == "dropless" and base is not None:
      lines.append(
        f"dropless/capacity {r['label']}: wall {r['step_seconds']['median'] / base['step_seconds']['median']:.2f}x, "
        f"CPU time {r['step_cpu_seconds']['median'] / base['step_cpu_seconds']['median']:.2f}x, "
        f"compiled peak {(r['compiled_peak_bytes'] or 0) / max(base['compiled_peak_bytes'] or 1, 1):.2f}x"
      )
  for r in runs:
    if r.get("faulted_steps"):
      lines.append(
        f"{r['label']}: {r['faulted_steps']} of {results['steps']} timed steps touched "
        f">= {FAULTED_CALL_BYTES >> 20} MiB of fresh memory (page faults; slow, PERF.md 22): "
        "its median and iqr include them"
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


def format_memory_table(results: dict[str, Any]) -> str:
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
