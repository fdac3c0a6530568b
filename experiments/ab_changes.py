"""A train step against itself with one of PERF.md 30, 31 and 35's changes undone, in one process.

    python -m experiments.ab_changes --shapes=narrow --runs=moe_k8,coe_c2 \
        --variants=current,logits_loss,logits_loss+plain_head+optax_loss [--steps=8]

Variants (joined with '+'): `current`; `logits_loss` (the train step's loss
through the model's logits, `train_step.logits_loss_terms`, PERF.md 35's before);
`optax_loss` (optax's cross-entropy on `logits[:, :-1]`, PERF.md 30's before:
on the logits path, so with `logits_loss`); `plain_head` (the head's Dense with
`lax.dot_general`: also on the logits path); `unchained` ('blocked' returns no weights, so every CoE pass
accumulates its own weight gradient and the passes' gradients are summed, PERF.md
31's before); `undeferred` (each CoE pass's weight gradient in its own tile loop, PERF.md
39's before). Each variant's programs are traced with the change undone, then
every program runs round-robin (`bench.run_round_robin`), so the ratios share
one load. Prints median seconds and writes JSON with `--json`; `--profile=N` then
traces N more steps of each and prints `experiments.profile_step`'s table by component.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from coe_jax import host_memory
from coe_jax.nn import blocked, dispatch, model
from coe_jax.training import train_step
from experiments import bench, profile_step

FLAGS = flags.FLAGS
UNDO = ("optax_loss", "plain_head", "unchained", "logits_loss", "undeferred")


def _define_flags() -> None:
  flags.DEFINE_string("shapes", "narrow", f"One of {sorted(bench.SHAPES)}.")
  flags.DEFINE_list("runs", ["moe_k8", "coe_c2"], "Paper runs (configs/<run>.py).")
  flags.DEFINE_list("variants", ["current", "logits_loss"], f"current or '+' of {UNDO}.")
  flags.DEFINE_integer("steps", 8, "Timed steps of every program.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps of every program first.")
  flags.DEFINE_string("json", "", "Also write the results here.")
  flags.DEFINE_integer(
    "profile", 0, "Also trace this many steps of every program: ms by op kind and component."
  )


def optax_cross_entropy_sum(logits, batch):
  """PERF.md 30's before: optax's loss on the sliced logits."""
  targets, weights = train_step.next_token_targets(batch)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def undone(variant: str) -> contextlib.ExitStack:
  """The patches that undo `variant`'s changes while its programs are traced."""
  parts = [p for p in variant.split("+") if p != "current"]
  unknown = sorted(set(parts) - set(UNDO))
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; allowed: current, {', '.join(UNDO)}")
  stack = contextlib.ExitStack()
  if "optax_loss" in parts:
    stack.enter_context(mock.patch.object(train_step, "cross_entropy_sum", optax_cross_entropy_sum))
  if "plain_head" in parts:
    stack.enter_context(mock.patch.object(model, "head_dot_general", jax.lax.dot_general))
  if "unchained" in parts:
    original = blocked.blocked_dispatch
    unchained = lambda *a, **k: original(*a, **k).replace(weights=None)
    stack.enter_context(mock.patch.object(dispatch, "blocked_dispatch", unchained))
  if "undeferred" in parts:
    stack.enter_context(
      mock.patch.object(dispatch, "chain_weights", lambda weights, *a, **k: weights)
    )
  if "logits_loss" in parts:
    logits_terms = train_step.logits_loss_terms
    stack.enter_context(mock.patch.object(train_step, "training_loss_terms", logits_terms))
  return stack


def build(run: str, variant: str, shape: dict) -> bench.StepBench:
  config = bench.load_config(f"configs/{run}.py:{shape['scale']}")
  cfg = bench.bench_model_config(config, config.model.dispatch, shape["model"])
  with undone(variant):
    step = bench.build_step_bench(f"{run} {variant}", config, cfg, shape["batch"], shape["seq"])
  step.allocate()
  return step


def main(argv) -> None:
  del argv
  shape = bench.SHAPES[FLAGS.shapes]
  steps = [build(run, variant, shape) for variant in FLAGS.variants for run in FLAGS.runs]
  bench.run_round_robin([s.timed for s in steps], FLAGS.warmup, FLAGS.steps)
  rows = [dict(label=s.label, seconds=bench.spread(s.timed.seconds)) for s in steps]
  for row in rows:
    print(f"{row['label']:<40} {row['seconds']['median']:.3f} s")
  base = {run: statistics.median(s.timed.seconds) for run, s in zip(FLAGS.runs, steps)}
  for s in steps[len(FLAGS.runs) :]:
    run = s.label.split()[0]
    print(
      f"{s.label} / {run} {FLAGS.variants[0]}: {statistics.median(s.timed.seconds) / base[run]:.2f}x"
    )
  if FLAGS.profile:
    profiles = [profile_step.trace_op_times(s.timed.call, FLAGS.profile) for s in steps]
    for profile, s in zip(profiles, steps):
      profile["components"] = profile_step.by_component(profile["ops"], s.hlo_text)
    labels = [s.label for s in steps]
    print(profile_step.format_kinds(labels, profiles, 20, key="components"))
    for row, profile in zip(rows, profiles):
      row["profile"] = profile
  if FLAGS.json:
    Path(FLAGS.json).write_text(json.dumps(dict(shape=FLAGS.shapes, rows=rows), indent=1))


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()
  _define_flags()
  app.run(main)
