"""Command line: evaluate a trained run on one task (the tasks: `coe_jax.eval_tasks.scoring`).

    python -m coe_jax.evaluate --workdir=RUN --task=val_loss [--data=FILE.jsonl]
    python -m coe_jax.evaluate --workdir=RUN --task=gsm8k --data=../shared/data/gsm8k/test.jsonl
    python -m coe_jax.evaluate --workdir=RUN --task=math --data=../shared/data/math/test.jsonl

`--data` is required for gsm8k/math (a jsonl of GSM8K question/answer, MATH
problem/solution or query/response rows); val_loss defaults to the run's own
validation split. Writes `eval_<task>.json` and `eval_<task>_samples.jsonl`
into the run directory.
"""

from __future__ import annotations

import json
import os

from absl import flags

from coe_jax import cli, host_memory
from coe_jax.eval_tasks.scoring import (
  DEFAULT_MAX_NEW_TOKENS,
  DEFAULT_STOP_STRINGS,
  TASKS,
  GenerationSettings,
  evaluate_run,
)

# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/, tokenizer.json).")
  flags.DEFINE_enum("task", "val_loss", TASKS, "What to evaluate.")
  flags.DEFINE_string(
    "data",
    None,
    "jsonl file of problems; required for gsm8k/math (e.g. "
    "../shared/data/gsm8k/test.jsonl); val_loss: default the run's validation split.",
  )
  flags.DEFINE_integer("limit", 0, "Score only the first N problems (0 = all).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer("num_shots", 0, "Solved exemplars before each question (0 = zero-shot).")
  flags.DEFINE_string(
    "shots_data",
    None,
    "jsonl to draw exemplars from (default: the eval file, exemplars then not scored).",
  )
  flags.DEFINE_integer(
    "batch_size",
    0,
    "Prompts per batch (0 = 16), or val_loss rows per batch (0 = the run's eval_batch_size).",
  )
  flags.DEFINE_integer("max_new_tokens", 0, "Generated tokens at most (0 = 256 gsm8k, 512 math).")
  flags.DEFINE_integer("max_prompt_length", 0, "Keep the last N prompt tokens (0 = all).")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Seed for exemplars and sampling.")
  flags.DEFINE_multi_string("stop", list(DEFAULT_STOP_STRINGS), "Stop strings.")
  flags.DEFINE_string("query_column", "query", "Query field of a query/response jsonl.")
  flags.DEFINE_string("response_column", "response", "Response field of a query/response jsonl.")
  flags.DEFINE_integer("num_samples", 20, "Predictions written to eval_<task>_samples.jsonl.")
  flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  settings = GenerationSettings(
    num_shots=f.num_shots,
    max_new_tokens=f.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(f.task, 256),
    batch_size=f.batch_size or 16,
    temperature=f.temperature,
    top_p=f.top_p,
    seed=f.seed,
    max_prompt_length=f.max_prompt_length,
    stop_strings=tuple(f.stop),
  )
  result = evaluate_run(
    f.workdir,
    f.task,
    data=f.data,
    limit=f.limit,
    step=f.step,
    settings=settings,
    shots_data=f.shots_data,
    query_column=f.query_column,
    response_column=f.response_column,
    batch_size=f.batch_size,
    num_samples=f.num_samples,
    progress=True,
  )
  keys = ("task", "metric", "score", "count", "checkpoint_step", "perplexity", "correct", "seconds")
  print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
  print(f"Wrote {os.path.join(result['workdir'], f'eval_{f.task}.json')}")


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # CPU: reuse the step's memory (PERF.md 19)
  _define_flags()
  cli.run(main)  # one-line user errors, --verbose, quiet Orbax logs
