"""The programs `experiments.bench` times: train steps over a grid of configs, and one CoE layer.

`build_benches` compiles one train step per (config, dispatch mode, dropless
implementation, tile, tile sizes, attention query block, layer layout) the
flags ask for, from abstract state: no train state exists until
`StepBench.allocate()`. Each program keeps the structured description of its
variant (`config_name` and its `ModelConfig`), by which the report pairs it
with its capacity baseline. `layer_program` is one CoE layer's forward and
backward, as is or with the experts replaced by the identity.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from coe_jax import config_lib
from coe_jax.nn import dispatch, router
from coe_jax.nn.coe_layer import CoELayer
from coe_jax.nn.layers import compute_dtype
from coe_jax.nn.model import CoECausalLM
from coe_jax.nn.model_config import ModelConfig
from coe_jax.nn.params import param_axes
from coe_jax.training import metrics as metrics_lib
from coe_jax.training import sharding, train_step
from experiments.bench_timing import Timed, xla_flops

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


# --routing: the router every CoE layer runs (`CoELayer.router_fn`)
ROUTERS: dict[str, Callable[..., router.RouterOutput]] = {
  "model": router.route,
  "balanced": balanced_route,
}
ROUTINGS = tuple(ROUTERS)


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
  """A [batch, seq] batch of uniform token ids, unpadded and unpacked."""
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
  it (then `timed` can run). `config_name` names the config (a suite label or
  config spec): with `model_config`, the structured key of the variant.
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
  # the compiled program (op names for `experiments.profile_step --by=component`)
  hlo_text: str = ""
  config_name: str = ""

  def allocate(self) -> None:
    self.last_metrics["state"] = jax.block_until_ready(self.make_state())


def build_step_bench(
  label: str,
  config: ml_collections.ConfigDict,
  model_config: ModelConfig,
  batch: int,
  seq: int,
  router_fn: Callable[..., router.RouterOutput] = router.route,
  config_name: Optional[str] = None,
  devices: int = 1,
) -> StepBench:
  """Compiles the train step from abstract state: no train state until `allocate()`.

  `router_fn`: every CoE layer's router; `config_name` defaults to `label`;
  `devices` > 1: data-parallel over the first `devices` devices, laid out as the
  train loop lays out a default mesh (`sharding.Parallelism`).
  """
  if devices > jax.device_count():
    raise ValueError(f"build_step_bench: {devices} devices asked for, {jax.device_count()} exist")
  parallel = sharding.Parallelism()
  if devices > 1:
    mesh = sharding.make_mesh(devices=jax.devices()[:devices])
    parallel = sharding.Parallelism(mesh, param_axes(model_config))
  model = CoECausalLM(model_config, router_fn=router_fn, expert_parallel=parallel.expert_parallel())
  make_state = lambda: train_step.init_train_state(model, config.train, config.seed, seq)
  data = parallel.shard_batch(random_batch(batch, seq, model_config.vocab_size))
  rng = jax.random.key(1)
  abstract_state = jax.eval_shape(make_state)
  if parallel.mesh is not None:
    layouts = sharding.state_shardings(abstract_state, parallel.mesh, parallel.axes_tree)
    abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, layouts
    )
  step = train_step.make_train_step(model, 1, log_routing_stats=False)
  step_fn = parallel.jit_train_step(step, abstract_state)
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
    # the compiled pytree's `tx`
    make_state=lambda: parallel.init_state(make_state).replace(tx=abstract_state.tx),
    resident_bytes=resident,
    temp_bytes=temp,
    hlo_text=compiled.as_text() or "",
    config_name=label if config_name is None else config_name,
  )


def identity_expert(weights, x):
  """An expert that returns its input: the layer then costs routing and dispatch only."""
  del weights
  return x


def layer_program(
  cfg: ModelConfig,
  batch: int,
  seq: int,
  experts_as_identity: bool,
  router_fn: Callable[..., router.RouterOutput] = router.route,
) -> Timed:
  """One CoE layer's forward + backward (params and input), compiled, in train mode."""
  coe = cfg.coe
  expert_fn = {}
  if experts_as_identity:
    expert_fn = dict(expert_fn=identity_expert)
    if coe.dispatch == "dropless":
      coe = coe.replace(dropless_impl="gather")  # the generic path a custom expert_fn takes
  layer = CoELayer(coe, router_fn=router_fn, **expert_fn)
  dtype = compute_dtype(coe.dtype)
  h = jax.random.normal(jax.random.key(0), (batch, seq, coe.hidden_size), jnp.float32).astype(dtype)
  params = layer.init(jax.random.key(1), h)["params"]
  probe = jax.random.normal(jax.random.key(2), h.shape, jnp.float32).astype(dtype)

  def loss(params_, h_):
    out, aux = layer.apply({"params": params_}, h_, train=True)
    return jnp.sum((out * probe).astype(jnp.float32)) + aux.aux_loss

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, h).compile()
  name = f"layer{'[identity experts]' if experts_as_identity else ''}"
  return Timed(name, lambda: compiled(params, h), xla_flops=xla_flops(compiled))


def build_benches(args: argparse.Namespace) -> list[StepBench]:
  """Every (config, dispatch mode[, dropless impl], query block) train step, compiled only.

  With `--keep_going` a program that fails to compile is reported in `args.failures`
  (which this sets) and the others are built.
  """
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
  blocks = (args.attention_query_block or "").split(",")
  layouts = [_parse_bool(v, "--scan_layers") for v in (args.scan_layers or "").split(",") if v]
  benches = []
  args.failures = []
  for label, spec in specs:
    config = load_config(spec)
    if args.optimizer != "config":
      config.train.fused_optimizer = args.optimizer == "fused"
    batch = args.batch or preset.get("batch") or config.train.batch_size
    seq = args.seq or preset.get("seq") or config.data.max_length
    for mode in args.dispatch.split(","):
      for impl, tile, count in _dropless_variants(mode, impls, tiles, sizes):
        for block, scan in itertools.product(blocks, layouts or [None]):
          changes = dict(overrides, attention_query_block=int(block) if block else None)
          changes.update(scan_layers=scan, dropless_impl=impl)
          changes.update(dropless_tile=tile, dropless_tile_sizes=count)
          model_config = bench_model_config(config, mode, changes)
          name = f"{label} {mode}"
          if impl is not None and args.dropless_impl:
            name += f"[{dispatch.resolve_dropless_impl(impl)}]"
          name += f" tile={tile}" if tile is not None and len(tiles) > 1 else ""
          name += f" sizes={count}" if count is not None and len(sizes) > 1 else ""
          name += f" qb={block}" if len(blocks) > 1 else ""
          name += f" {'stacked' if scan else 'per-layer'}" if len(layouts) > 1 else ""
          router_fn = ROUTERS[args.routing]
          try:
            benches.append(
              build_step_bench(name, config, model_config, batch, seq, router_fn, label)
            )
          except Exception as error:  # e.g. a dense lowering out of memory: report it, run the rest
            if not args.keep_going:
              raise
            args.failures.append(
              dict(label=name, error=f"{type(error).__name__}: {str(error)[:500]}")
            )
            print(f"bench: {name} failed to compile: {args.failures[-1]['error']}", file=sys.stderr)
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
