"""Command line: complete questions with a trained run (see `coe_jax.inference.decoding`).

python -m coe_jax.generate --workdir=RUN --query="What is 12 + 30?" [--query=...]
"""

from __future__ import annotations

from absl import app, flags

from coe_jax import cli, host_memory
from coe_jax.data.tokenized import format_prompt
from coe_jax.inference.completion import complete
from coe_jax.inference.run_dir import load_run

# ----------------------------------------------------------------------------
# Command line: python -m coe_jax.generate --workdir=RUN --query="What is 12 + 30?"
# ----------------------------------------------------------------------------


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if not f.query:
    raise app.UsageError("--query: missing ; at least one --query='a question'")
  run = load_run(f.workdir, f.step)
  if run.tokenizer is None:
    raise SystemExit(f"{f.workdir}: no tokenizer.json; cannot turn text into tokens")
  prompts = [format_prompt(q) for q in f.query]
  outputs = complete(
    run.params,
    run.model_config,
    run.tokenizer,
    prompts,
    max_new_tokens=f.max_new_tokens,
    batch_size=max(1, min(len(prompts), 8)),
    temperature=f.temperature,
    top_p=f.top_p,
    seed=f.seed,
    stop_strings=f.stop,
  )
  for prompt, out in zip(prompts, outputs):
    print(f"{prompt}{out.text}\n{'-' * 40}")


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/, tokenizer.json).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_multi_string("query", [], "A question; prompted as 'query : Q response :'.")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_multi_string("stop", ["query :"], "Stop strings.")
  flags.mark_flags_as_required(["workdir"])  # --query is checked in main (a multi-flag)


if __name__ == "__main__":
  host_memory.reexec_keeping_host_memory()  # CPU: reuse the step's memory (PERF.md 19)
  _define_flags()
  cli.run(main)  # one-line user errors, --verbose, quiet Orbax logs
