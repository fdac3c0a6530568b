"""The matmul rate of expert tiles: every matmul of a SwiGLU tile's forward and backward, by rows.

    python -m experiments.tile_matmuls [--experts=63] [--hidden=1024] [--inter=704] \
        [--rows=32,64,128,256] [--steps=8] [--json=runs/bench/tile_matmuls.json]

'blocked' dropless dispatch (`coe_jax/nn/blocked.py`) runs each expert's rows as
tiles of a few dozen to a few hundred rows against that expert's [hidden, inter]
weights; at paper width the tiles' matmuls run at about half the machine's matmul
rate (experiments/PERF.md 37). This times each of a tile's matmuls on `--experts`
tiles at once (one batched einsum per form, the weights as the model stores
them: gate/up [E, hidden, inter], down [E, inter, hidden]) for every tile height
in `--rows`, beside the feature-major forms (activations stored [features,
rows], the weights unchanged) and a square matmul probe, all round-robin in one
process, so the GFLOP/s and fractions of the probe compare under one load. Each
form runs twice: as one batched einsum over the tiles, and as 'blocked' runs it,
a loop over the tiles with each tile's weights taken by dynamic index.
Prints a table; writes JSON with `--json`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import bench_timing

FLAGS = flags.FLAGS

# (name, einsum, operand shapes as names): x [r, d], h [r, f], gate [d, f], down [f, d];
# a trailing T marks an activation stored feature-major ([d, r] or [f, r]).
FORMS = (
  ("fwd x @ gate", "erd,edf->erf", ("x", "gate")),
  ("fwd h @ down", "erf,efd->erd", ("h", "down")),
  ("bwd d_h = dy @ down^T", "erd,efd->erf", ("x", "down")),
  ("bwd d_x = d_g @ gate^T", "erf,edf->erd", ("h", "gate")),
  ("bwd d_gate = x^T @ d_g", "erd,erf->edf", ("x", "h")),
  ("bwd d_gate^T = d_g^T @ x", "erf,erd->efd", ("h", "x")),
  ("feature-major d_gate = x^T @ d_g", "edr,efr->edf", ("xT", "hT")),
  ("feature-major d_h^T = down @ dy^T", "efd,edr->efr", ("down", "xT")),
  ("feature-major d_x^T = gate @ d_g^T", "edf,efr->edr", ("gate", "hT")),
  ("feature-major fwd h^T = gate^T @ x^T", "edf,edr->efr", ("gate", "xT")),
)


def _define_flags() -> None:
  flags.DEFINE_integer("experts", 63, "Tiles per call: one per routed expert.")
  flags.DEFINE_integer("hidden", 1024, "Model width d (paper: 1024).")
  flags.DEFINE_integer("inter", 704, "Expert intermediate size f (paper: 704).")
  flags.DEFINE_list("rows", ["32", "64", "128", "256"], "Tile heights r.")
  flags.DEFINE_integer("probe", 2048, "Size of the square matmul probe.")
  flags.DEFINE_integer("steps", 8, "Timed calls of every program.")
  flags.DEFINE_integer("warmup", 2, "Untimed calls of every program first.")
  flags.DEFINE_string("json", "", "Also write the results here.")


def operands(experts: int, hidden: int, inter: int, rows: int) -> dict[str, jax.Array]:
  keys = iter(jax.random.split(jax.random.key(0), 4))
  x = jax.random.normal(next(keys), (experts, rows, hidden))
  h = jax.random.normal(next(keys), (experts, rows, inter))
  return dict(
    x=x,
    h=h,
    gate=jax.random.normal(next(keys), (experts, hidden, inter)),
    down=jax.random.normal(next(keys), (experts, inter, hidden)),
    xT=jnp.swapaxes(x, 1, 2).copy(),
    hT=jnp.swapaxes(h, 1, 2).copy(),
  )


def _batched(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b)


def _tile_loop(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """The tiles one at a time in a loop, each operand's tile by dynamic index (as 'blocked')."""
  spec_2d = spec.replace("e", "")
  out = jax.eval_shape(functools.partial(_batched, spec), a, b)

  def body(e, acc):
    tile = jnp.einsum(spec_2d, *(jax.lax.dynamic_index_in_dim(x, e, 0, False) for x in (a, b)))
    return jax.lax.dynamic_update_index_in_dim(acc, tile, e, 0)

  return jax.lax.fori_loop(0, a.shape[0], body, jnp.zeros(out.shape, out.dtype))


def programs(experts: int, hidden: int, inter: int, rows: list[int]) -> list[dict]:
  """One compiled einsum per (form, tile height), with its FLOPs."""
  out = []
  for r in rows:
    arrays = operands(experts, hidden, inter, r)
    for name, spec, names in FORMS:
      args = tuple(arrays[n] for n in names)
      for batched in (True, False):
        fn = jax.jit(functools.partial(_batched if batched else _tile_loop, spec))
        compiled = fn.lower(*args).compile()
        timed = bench_timing.Timed(f"{name} r={r}", lambda c=compiled, a=args: c(*a))
        flops = 2.0 * experts * r * hidden * inter
        out.append(dict(form=name, rows=r, batched=batched, flops=flops, timed=timed))
  return out


def format_table(results: dict) -> str:
  probe = results["probe_gflops"]
  lines = [
    f"{results['experts']} tiles of [r, {results['hidden']}] x [{results['hidden']}, "
    f"{results['inter']}]; probe {probe:.0f} GFLOP/s (GFLOP/s, fraction of the probe)",
    "",
    "| form | " + " | ".join(f"r={r}" for r in results["rows"]) + " |",
    "|---|" + "---|" * len(results["rows"]),
  ]
  for batched, label in ((False, "tile loop"), (True, "batched")):
    for name, _, _ in FORMS:
      cells = [
        f"{row['gflops']:.0f} ({row['gflops'] / probe:.2f})"
        for row in results["table"]
        if row["form"] == name and row["batched"] == batched
      ]
      lines.append(f"| {label}: {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  try:
    rows = [int(r) for r in FLAGS.rows]
  except ValueError:
    raise app.UsageError(f"--rows: got {FLAGS.rows}; expected positive integers") from None
  if min(rows) < 1:
    raise app.UsageError(f"--rows: got {FLAGS.rows}; expected positive integers")
  progs = programs(FLAGS.experts, FLAGS.hidden, FLAGS.inter, rows)
  probe, probe_flops = bench_timing.matmul_probe(jnp.float32, FLAGS.probe)
  bench_timing.run_round_robin([p["timed"] for p in progs] + [probe], FLAGS.warmup, FLAGS.steps)
  median = lambda t: bench_timing.spread(t.seconds)["median"]
  results = dict(
    experts=FLAGS.experts,
    hidden=FLAGS.hidden,
    inter=FLAGS.inter,
    rows=rows,
    probe_gflops=probe_flops / median(probe) / 1e9,
    table=[
      dict(
        form=p["form"],
        rows=p["rows"],
        batched=p["batched"],
        gflops=p["flops"] / median(p["timed"]) / 1e9,
      )
      for p in progs
    ],
  )
  print(format_table(results))
  if FLAGS.json:
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
