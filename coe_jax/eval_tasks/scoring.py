"""Scoring a trained run on one task: validation loss, GSM8K and MATH answer accuracy.

* `val_loss`: mean token cross-entropy and perplexity with the training loss
  (`train_step.make_eval_step`, `train_step.pooled_eval_loss`, the run's own targets). Without
  `data` it uses the run's validation split (reproducing the run's `val/loss`);
  with `data`, any jsonl of query/response rows (GSM8K question/answer and MATH
  problem/solution rows are converted to the training text first).
* `gsm8k` / `math`: prompts `query : {question} response :` (after `num_shots`
  solved exemplars in the same format), decodes (greedy by default) and
  exact-matches the extracted answer (`eval_tasks.answers`).

`evaluate_run` writes `eval_<task>.json` (score, count, settings, checkpoint
step, configs) and `eval_<task>_samples.jsonl` into the run directory.
Everything is deterministic given the seed (shots and sampling).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
from typing import Any, Iterable, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.data.input_pipeline import build_datasets
from coe_jax.data.tokenized import build_split, format_example, format_prompt
from coe_jax.errors import ConfigError, DataError
from coe_jax.eval_tasks.answers import (
  extract_gsm8k_answer,
  extract_math_answer,
  gsm8k_target,
  last_boxed,
  math_equal,
  numbers_equal,
)
from coe_jax.inference.completion import complete
from coe_jax.inference.run_dir import Run, load_run
from coe_jax.training import train_step

TASKS = ("val_loss", "gsm8k", "math")
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "math": 512}
DEFAULT_STOP_STRINGS = ("query :",)


def read_jsonl(path: str) -> list[dict]:
  with open(os.path.expanduser(path), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k_response(answer: str) -> str:
  """A GSM8K answer in the training style: calculator notes removed, "The answer is: N" appended."""
  final = answer.split("####")[-1].strip().replace(",", "")
  return f"{_CALCULATOR.sub('', answer)}\nThe answer is: {final}"


def math_response(solution: str) -> str:
  """A MATH solution in the training style: "The answer is: <last boxed>" appended."""
  boxed = last_boxed(solution)
  return solution if boxed is None else f"{solution}\nThe answer is: {boxed}"


@dataclasses.dataclass(frozen=True)
class Problem:
  """One evaluation item: the query, its training-style response and the reference answer."""

  query: str
  response: str
  answer: str


def to_problem(
  row: dict, task: str, query_column: str = "query", response_column: str = "response"
) -> Problem:
  """A jsonl row (GSM8K question/answer, MATH problem/solution, or query/response) as a Problem."""
  if "question" in row and "answer" in row:  # GSM8K
    response = gsm8k_response(row["answer"])
    return Problem(row["question"], response, gsm8k_target(row["answer"]))
  if "problem" in row and "solution" in row:  # MATH
    return Problem(
      row["problem"], math_response(row["solution"]), last_boxed(row["solution"]) or ""
    )
  if query_column in row and response_column in row:
    response = row[response_column]
    answer = row.get("answer")
    if answer is None:
      extract = extract_gsm8k_answer if task == "gsm8k" else extract_math_answer
      answer = extract(response) or ""
    return Problem(row[query_column], response, str(answer))
  raise KeyError(
    f"row has none of question/answer, problem/solution, "
    f"{query_column}/{response_column}: keys {sorted(row)}"
  )


def build_prompt(query: str, shots: Sequence[Problem] = ()) -> str:
  """`query : Q response :`, after solved exemplars in the training format, "\\n\\n" apart."""
  parts = [format_example(s.query, s.response) for s in shots] + [format_prompt(query)]
  return "\n\n".join(parts)


def split_shots(
  problems: list[Problem], num_shots: int, seed: int, shots_from: Optional[list[Problem]] = None
) -> tuple[list[Problem], list[Problem]]:
  """(exemplars, problems to score): `num_shots` exemplars drawn with `seed` from `shots_from`,
  or, without it, from the evaluation problems themselves (then not scored)."""
  if num_shots <= 0:
    return [], problems
  pool = problems if shots_from is None else shots_from
  if num_shots > len(pool):
    raise ConfigError(
      f"--num_shots: got {num_shots}; only {len(pool)} exemplars are available ; at most "
      f"{len(pool)}"
    )
  picked = sorted(random.Random(seed).sample(range(len(pool)), num_shots))
  shots = [pool[i] for i in picked]
  if shots_from is None:
    taken = set(picked)
    problems = [p for i, p in enumerate(problems) if i not in taken]
  return shots, problems


def _bar(iterable: Iterable, enabled: bool, **kwargs):
  if not enabled:
    return iterable
  return tqdm(iterable, dynamic_ncols=True, **kwargs)


def validation_loss(
  run: Run,
  problems: Optional[list[Problem]] = None,
  *,
  batch_size: int = 0,
  max_length: int = 0,
  progress: bool = False,
) -> dict[str, float]:
  """Token cross-entropy and perplexity of `run` (a `run_dir.Run`).

  Without `problems`: the run's own validation split and eval batch size.
  """
  batch_size = batch_size or int(run.config.train.get("eval_batch_size", 32))
  max_length = max_length or int(run.config.data.max_length)
  if problems is None:
    datasets = build_datasets(
      run.config.data,
      workdir=run.workdir,
      seed=int(run.config.seed),
      reference_padding=run.model_config.pad_semantics == "reference",
    )
    split = datasets.val
  else:
    if run.tokenizer is None:
      raise FileNotFoundError(f"{run.workdir}: no tokenizer.json; cannot tokenise --data")
    texts = [format_example(p.query, p.response) for p in problems]
    eos = tokenizer_lib.eos_id(run.tokenizer) if run.config.data.get("eos_target", False) else None
    split = build_split(
      run.tokenizer, texts, max_length, tokenizer_lib.pad_id(run.tokenizer), False, eos_id=eos
    )  # the run's own targets: with EOS iff it trained with them
  eval_step = jax.jit(train_step.make_eval_step(run.model))
  batches = (
    split.batch(
      range(start, min(start + batch_size, split.num_rows)),
      pad_rows=max(0, start + batch_size - split.num_rows),
    )
    for start in _bar(range(0, split.num_rows, batch_size), progress, desc="val_loss", unit="batch")
  )
  loss, count = train_step.pooled_eval_loss(eval_step, run.params, batches, with_count=True)
  return {
    "loss": loss,
    "perplexity": math.exp(min(loss, 700.0)),
    "tokens": count,
    "examples": split.num_examples,
  }


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """How `answer_accuracy` prompts and decodes."""

  num_shots: int = 0
  max_new_tokens: int = 256
  batch_size: int = 16
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  max_prompt_length: int = 0  # 0 = no cut; else keep the last N prompt tokens
  stop_strings: tuple[str, ...] = DEFAULT_STOP_STRINGS


def answer_accuracy(
  run: Run,
  problems: list[Problem],
  task: str,
  settings: GenerationSettings,
  *,
  shots: Sequence[Problem] = (),
  progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Exact-match accuracy of greedy (or sampled) answers to `problems` after `shots`.

  Returns (scores, one dict per problem with the generation and the verdict).
  """
  extract, equal = (
    (extract_gsm8k_answer, numbers_equal) if task == "gsm8k" else (extract_math_answer, math_equal)
  )
  prompts = [build_prompt(p.query, shots) for p in problems]
  outputs = complete(
    run.params,
    run.model_config,
    run.tokenizer,
    prompts,
    max_new_tokens=settings.max_new_tokens,
    batch_size=settings.batch_size,
    max_prompt_length=settings.max_prompt_length or None,
    temperature=settings.temperature,
    top_p=settings.top_p,
    seed=settings.seed,
    stop_strings=settings.stop_strings,
    progress=progress,
  )
  predictions = []
  for problem, out in zip(problems, outputs):
    predicted = extract(out.text)
    predictions.append(
      {
        "query": problem.query,
        "generation": out.text,
        "prediction": predicted,
        "answer": problem.answer,
        "correct": bool(equal(predicted, problem.answer)),
        "stopped": out.finished,
        "generated_tokens": len(out.token_ids),
      }
    )
  correct = sum(p["correct"] for p in predictions)
  scores = {
    "accuracy": correct / max(len(predictions), 1),
    "correct": correct,
    "count": len(predictions),
    "num_shots": len(shots),
    "mean_generated_tokens": float(np.mean([p["generated_tokens"] for p in predictions]))
    if predictions
    else 0.0,
  }
  return scores, predictions


def load_problems(
  task: str, data: Optional[str], query_column: str = "query", response_column: str = "response"
) -> list[Problem]:
  """Every row of `data` (default: the task's shared test file) as a Problem."""
  if not data:
    raise ConfigError(
      f"--task={task}: pass --data=PATH to a jsonl of its problems "
      "(e.g. ../shared/data/gsm8k/test.jsonl or ../shared/data/math/test.jsonl)"
    )
  try:
    rows = read_jsonl(data)
  except (OSError, ValueError) as error:  # a missing file, invalid JSON or UTF-8
    raise DataError(f"--data: {data}: {error}") from None
  if not rows:
    raise DataError(f"--data: {data}: empty (no rows) ; a jsonl of problems, one a line")
  problems = []
  for number, row in enumerate(rows, start=1):
    try:
      problems.append(to_problem(row, task, query_column, response_column))
    except (KeyError, AttributeError, TypeError) as error:
      raise DataError(f"--data: {data}, row {number}: {error}") from None
  return problems


def evaluate_run(
  workdir: str,
  task: str,
  *,
  data: Optional[str] = None,
  limit: int = 0,
  step: Optional[int] = None,
  settings: Optional[GenerationSettings] = None,
  shots_data: Optional[str] = None,
  query_column: str = "query",
  response_column: str = "response",
  batch_size: int = 0,
  num_samples: int = 20,
  progress: bool = False,
  write: bool = True,
) -> dict[str, Any]:
  """Runs `task` on the run in `workdir`; writes eval_<task>.json and samples; returns the result.

  `limit` keeps the first N problems (after few-shot exemplars are set aside).
  """
  if task not in TASKS:
    raise ConfigError(f"--task: got {task!r}; allowed values: {', '.join(TASKS)}")
  start = time.perf_counter()
  run = load_run(workdir, step)
  settings = settings or GenerationSettings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS.get(task, 256))
  result: dict[str, Any] = {
    "task": task,
    "workdir": run.workdir,
    "checkpoint_step": run.step,
    "data": data or "validation split of the run",
  }
  predictions: list[dict] = []
  if task == "val_loss":
    problems = None
    if data:
      problems = load_problems(task, data, query_column, response_column)
      problems = problems[:limit] if limit else problems
    scores = validation_loss(run, problems, batch_size=batch_size, progress=progress)
    result.update(scores, score=scores["loss"], metric="loss", count=scores["examples"])
  else:
    if run.tokenizer is None:
      raise FileNotFoundError(f"{workdir}: no tokenizer.json; cannot prompt the model")
    problems = load_problems(task, data, query_column, response_column)
    shots_from = load_problems(task, shots_data) if shots_data else None
    shots, problems = split_shots(problems, settings.num_shots, settings.seed, shots_from)
    problems = problems[:limit] if limit else problems
    scores, predictions = answer_accuracy(
      run, problems, task, settings, shots=shots, progress=progress
    )
    result.update(
      scores, score=scores["accuracy"], metric="accuracy", settings=dataclasses.asdict(settings)
    )
  result.update(
    limit=limit,
    seconds=time.perf_counter() - start,
    model=run.model_config.to_dict(),
    config=run.config.to_dict(),
  )
  if write:
    _write(run.workdir, task, result, predictions[:num_samples])
  return result


def _write(workdir: str, task: str, result: dict, samples: list[dict]) -> None:
  with open(os.path.join(workdir, f"eval_{task}.json"), "w") as f:
    json.dump(result, f, indent=2, default=str)
  if samples:
    with open(os.path.join(workdir, f"eval_{task}_samples.jsonl"), "w") as f:
      for row in samples:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
