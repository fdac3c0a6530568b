"""The paper's ablation suite: train a list of configs, tabulate and plot them beside the paper.

    python -m experiments.ablation --suite=paper --scale=tiny \
        --data=../shared/data/math_qa --tokenizer=../shared/data/tokenizer/olmoe/tokenizer.json \
        --seeds=2 --steps=200

Every run gets the same recipe (data, tokenizer, steps, batch, sequence length,
evaluation subset, seeds); the configs differ only in the model fields the
paper varies. Each (config, seed) trains in its own `python -m coe_jax.main`
process under `--runs_dir/<config>/seed<k>`, one after another. A run whose
workdir holds the final checkpoint is skipped; an unfinished one resumes from
its latest checkpoint, so the suite can be killed and restarted at will.

Results go to `--results_dir` (default `experiments/results/<scale>/`):
`table.md`, `table.csv` and one PNG per figure of the paper (`FIGURES`).

The pieces: `ablation_runner` (recipe, locks, training processes),
`ablation_results` (a config's finished seeds), `ablation_verdict` (the
paper's claims, the pre-registered rule), `ablation_table`, `ablation_figures`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from absl import app, flags

from coe_jax import config_lib

# The pieces, re-exported: experiments/equal_time.py and the tests use them as `ablation.<name>`.
from experiments.ablation_figures import (  # noqa: F401
  FIGURES,
  paired_curve,
  plot_figure,
  write_figures,
)
from experiments.ablation_results import RunResult, collect, paired_differences  # noqa: F401
from experiments.ablation_runner import (  # noqa: F401
  CONFIG_DIR,
  LOCK_FILE,
  RECIPE_FILE,
  REPO,
  SUITES,
  Recipe,
  is_finished,
  load_config,
  load_recipe,
  record_recipe,
  run_dir,
  run_lock,
  run_suite,
  suite_configs,
  train_command,
)
from experiments.ablation_table import (  # noqa: F401
  BASELINE,
  COLUMNS,
  MEMORY_PAIR,
  PAPER_MEMORY_SAVING_PERCENT,
  memory_lines,
  memory_saving_percent,
  paper_scale_memory_saving,
  table_rows,
  write_table,
)
from experiments.ablation_verdict import (  # noqa: F401
  CLAIM_COLUMNS,
  CLAIMS,
  SMALLEST_EFFECT,
  claim_rows,
  paired_verdict,
  seed_sd,
  t_975,
)

_SUITE = flags.DEFINE_string(
  "suite", "paper", f"{', '.join(SUITES)} or a comma-separated list of config names."
)
_SCALE = flags.DEFINE_enum("scale", "tiny", list(config_lib.SCALES), "Config scale for every run.")
_DATA = flags.DEFINE_string(
  "data",
  "",
  "Directory with train.jsonl and validation.jsonl; '' = the "
  "config's default source (synthetic at tiny, MetaMathQA at paper scale).",
)
_TOKENIZER = flags.DEFINE_string(
  "tokenizer", "", "tokenizer.json path or hub name; '' = the config's."
)
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per config: 0 .. seeds-1.")
_FIRST_SEED = flags.DEFINE_integer(
  "first_seed",
  0,
  "Train only seeds first_seed .. seeds-1 (the table still reports every finished seed below "
  "--seeds): splits one suite's seeds between processes or machines sharing --runs_dir.",
)
_STEPS = flags.DEFINE_integer("steps", 0, "Optimizer steps per run; 0 = the config's.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Sequences per step; 0 = the config's.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 0, "Tokens per sequence; 0 = the config's.")
_PACKING = flags.DEFINE_bool("packing", False, "Pack several examples per row.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 0, "Validate every N steps; 0 = the config's.")
_EVAL_BATCHES = flags.DEFINE_integer(
  "eval_batches",
  0,
  "Validate on the first N batches (the same subset for every run); 0 = the whole validation set.",
)
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
  "eval_batch_size", 0, "Sequences per validation batch; 0 = the config's."
)
_OVERRIDES = flags.DEFINE_multi_string(
  "set",
  [],
  "Extra config override applied to every run, "
  "e.g. --set=train.lr=1e-3 (passed as --config.train.lr=1e-3).",
)
_CONCURRENT = flags.DEFINE_bool(
  "concurrent",
  False,
  "Train the configs of a seed at once, each pinned to its own share of the CPUs (the next seed "
  "starts when all are done); more progress than one run after another on a small CPU.",
)
_RUNS_DIR = flags.DEFINE_string("runs_dir", "", "Run directories; '' = runs/ablation/<scale>.")
_RESULTS_DIR = flags.DEFINE_string(
  "results_dir", "", "Tables and figures; '' = experiments/results/<scale>."
)
_REPORT_ONLY = flags.DEFINE_bool(
  "report_only", False, "Only tabulate and plot the runs already there."
)


def report(
  names: Sequence[str], scale: str, seeds: int, runs_dir: Path, results_dir: Path, recipe_line: str
) -> list[RunResult]:
  """Writes table.md, table.csv and the figures from the finished runs; returns their results."""
  results = [r for r in (collect(n, scale, runs_dir, seeds) for n in names) if r is not None]
  results_dir.mkdir(parents=True, exist_ok=True)
  write_table(results, results_dir, recipe_line)
  write_figures({r.name: r for r in results}, results_dir)
  return results


def main(argv):
  del argv
  scale = _SCALE.value
  recipe = Recipe(
    scale=scale,
    data_dir=_DATA.value,
    tokenizer=_TOKENIZER.value,
    steps=_STEPS.value,
    batch_size=_BATCH.value,
    max_length=_MAX_LENGTH.value,
    packing=_PACKING.value,
    eval_every=_EVAL_EVERY.value,
    eval_batches=_EVAL_BATCHES.value,
    eval_batch_size=_EVAL_BATCH_SIZE.value,
    overrides=tuple(_OVERRIDES.value),
  )
  names = suite_configs(_SUITE.value)
  if not 0 <= _FIRST_SEED.value < _SEEDS.value:
    raise ValueError(f"--first_seed={_FIRST_SEED.value}: must be in [0, --seeds={_SEEDS.value})")
  runs_dir = Path(_RUNS_DIR.value or REPO / "runs" / "ablation" / scale).resolve()
  results_dir = Path(_RESULTS_DIR.value or REPO / "experiments" / "results" / scale).resolve()
  log = lambda message: print(time.strftime("%H:%M:%S"), message, flush=True)
  if _REPORT_ONLY.value:
    recipe = load_recipe(runs_dir) or recipe
  else:
    record_recipe(runs_dir, recipe)
    run_suite(
      names,
      _SEEDS.value,
      recipe,
      runs_dir,
      log,
      first_seed=_FIRST_SEED.value,
      concurrent=_CONCURRENT.value,
    )
  recipe_line = " ".join(recipe.flags_for("<runs_dir>/data_cache")[1:]) or "the configs' defaults"
  results = report(
    names,
    scale,
    _SEEDS.value,
    runs_dir,
    results_dir,
    f"scale={scale}, seeds={_SEEDS.value}, {recipe_line}",
  )
  log(f"{len(results)} of {len(names)} configs finished; table and figures in {results_dir}")


if __name__ == "__main__":
  app.run(main)
