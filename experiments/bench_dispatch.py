"""Routed experts alone (dispatch + SwiGLU, forward + backward): capacity vs dropless implementations.

    python -m experiments.bench_dispatch --k=8 --tiles=16,32,64 --skew=1.0 [--gather]

Paper width by default (T=512 tokens, d=1024, f=704, 63 routed experts). Expert
ids: each token draws K distinct experts with probabilities from a Dirichlet(skew)
(skew=0: uniform), to mimic an untrained router's imbalance. Every program runs
round-robin in one process; wall and CPU time are reported as ratios to the
capacity program (capacity factor 1.25). PERF.md, change 11.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from coe_jax import host_memory
from coe_jax.nn import blocked, tuning
from coe_jax.nn.blocked import blocked_dispatch
from coe_jax.nn.dispatch import assignment_slots, dispatch_to_experts, expert_capacity
from coe_jax.nn.experts import SwiGLUWeights
from experiments.bench import Timed, run_round_robin

# Stand-ins for `blocked._add_to_experts` (one tile per step): wrong gradients, timing only.
WEIGHT_GRAD_VARIANTS = {
  "dW written": lambda acc, e, u: jax.lax.dynamic_update_slice_in_dim(acc, u, e[0], axis=0),
  "no dW": lambda acc, e, u: acc,
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--inter", type=int, default=704)
  parser.add_argument("--experts", type=int, default=63)
  parser.add_argument("--k", type=int, default=8)
  parser.add_argument("--tiles", default="16,32,64", help="blocked tile sizes (one program each)")
  parser.add_argument("--tiles_per_step", type=int, default=1)
  parser.add_argument(
    "--tile_sizes",
    default="0",
    help="comma-separated counts of tile sizes per tile (one program each; 1 = whole tiles only, "
    "0 = the backend's default, tuning.default_tiling: on CPU at the paper width last tiles "
    "every 8 rows, PERF.md 22)",
  )
  parser.add_argument(
    "--skew", type=float, default=1.0, help="Dirichlet concentration; 0 = uniform"
  )
  parser.add_argument("--gather", action="store_true", help="also dropless_impl='gather'")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument(
    "--weight_grad_ablation",
    action="store_true",
    help="per tile also: weight-gradient slices written instead of accumulated, and no weight "
    "gradients at all (what the in-place accumulation and the dW matmuls cost; PERF.md 14)",
  )
  args = parser.parse_args(argv)
  if args.weight_grad_ablation and args.tiles_per_step != 1:
    parser.error("--weight_grad_ablation stands in for the one-tile-per-step update only")
  t, d, f, e, k = args.tokens, args.hidden, args.inter, args.experts, args.k
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.full(e, args.skew)) if args.skew > 0 else np.full(e, 1.0 / e)
  ids = jnp.asarray(np.stack([rng.choice(e, k, replace=False, p=p) for _ in range(t)]), jnp.int32)
  capacity = expert_capacity(t, k, e, 1.25, 4)
  _, kept = assignment_slots(ids, e, capacity)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  cw = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
  weights = SwiGLUWeights(
    *(
      jnp.asarray(0.02 * rng.normal(size=s), jnp.float32) for s in [(e, d, f), (e, d, f), (e, f, d)]
    )
  )
  probe = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  programs = []

  def add(name, routed):
    grad = jax.jit(
      jax.grad(lambda x_, cw_, w_: jnp.sum(routed(x_, cw_, w_) * probe), argnums=(0, 1, 2))
    )
    compiled = grad.lower(x, cw, weights).compile()
    programs.append(Timed(name, lambda: compiled(x, cw, weights)))

  add(
    f"capacity (cap {capacity})",
    lambda x_, cw_, w_: (
      dispatch_to_experts(x_, ids, cw_, w_, mode="capacity", capacity=capacity).output
    ),
  )
  if args.gather:
    add(
      "dropless gather",
      lambda x_, cw_, w_: (
        dispatch_to_experts(
          x_, ids, cw_, w_, mode="dropless", capacity=1, dropless_impl="gather"
        ).output
      ),
    )
  for tile in (int(s) for s in args.tiles.split(",")):
    for count in (int(c) for c in args.tile_sizes.split(",")):
      sizes = tuning.default_tiling(t * k, e, tuning.expert_weight_bytes(weights), tile, count)
      routed = lambda x_, cw_, w_, sizes=sizes: (
        blocked_dispatch(x_, ids, cw_, w_, sizes, args.tiles_per_step).output
      )
      name = f"blocked tile={tile}" + (f" sizes={len(sizes)}" if len(sizes) > 1 else "")
      add(name, routed)
      if args.weight_grad_ablation:
        for label, update in WEIGHT_GRAD_VARIANTS.items():
          with mock.patch.object(blocked, "_add_to_experts", update):  # read while tracing
            add(f"{name}, {label}", routed)
  run_round_robin(programs, 1, args.steps)
  print(
    f"T={t} K={k} N={e} d={d} f={f} skew={args.skew}: {1 - float(kept.mean()):.0%} of assignments "
    f"over capacity at cf 1.25; max load {int(np.bincount(np.asarray(ids).ravel(), minlength=e).max())}"
  )
  wall0 = statistics.median(programs[0].seconds)
  cpu0 = statistics.median(programs[0].cpu_seconds)
  for prog in programs:
    wall, cpu = statistics.median(prog.seconds), statistics.median(prog.cpu_seconds)
    print(
      f"{prog.name:48s} {1e3 * wall:8.1f} ms wall ({wall / wall0:.2f}x) "
      f"{1e3 * cpu:8.1f} ms CPU ({cpu / cpu0:.2f}x)"
    )


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # CPU: reuse the step's memory (PERF.md 19)
  main(sys.argv[1:])
