"""Evaluate a trained run: validation loss, GSM8K and MATH answer accuracy.

    python -m coe_jax.evaluate --workdir=RUN --task=val_loss [--data=FILE.jsonl]
    python -m coe_jax.evaluate --workdir=RUN --task=gsm8k [--data=...] [--limit=200] [--num_shots=0]
    python -m coe_jax.evaluate --workdir=RUN --task=math  [--data=...] [--limit=200]

* `val_loss`: mean token cross-entropy and perplexity, masked exactly as in
  training (`train.make_eval_step`, eval capacity). Without `--data` it uses
  the run's own validation split (same batches, so it reproduces the run's
  `val/loss`); with `--data` any jsonl of query/response rows (GSM8K
  question/answer and MATH problem/solution rows are converted to the
  training text first).
* `gsm8k`: prompts `query : {question} response :` (after `--num_shots`
  solved exemplars in the same format), greedy decoding by default, the
  prediction is the number after the first "The answer is:" (else after
  "####", else the last number), exact numeric match with the number after
  "#### " in the reference answer.
* `math`: the same, the prediction is the first "The answer is:" line (else
  the last `\\boxed{}`), compared after `normalize_math_answer` with the last
  `\\boxed{}` of the reference solution.

Writes `eval_<task>.json` (score, count, settings, checkpoint step, configs)
and `eval_<task>_samples.jsonl` (the first predictions) into the run
directory. Everything is deterministic given `--seed` (shots and sampling).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from coe_jax.run_dir import load_run

TASKS = ("val_loss", "gsm8k", "math")
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "math": 512}
DEFAULT_STOP_STRINGS = ("query :",)
_SHARED_DATA = {"gsm8k": "gsm8k/test.jsonl", "math": "math/test.jsonl"}


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------

def shared_data_dir() -> Optional[Path]:
  """`../shared/data` relative to the working directory, else beside the repository."""
  for root in (Path.cwd().parent, Path(__file__).resolve().parents[2]):
    path = root / "shared" / "data"
    if path.is_dir():
      return path
  return None


def default_data_path(task: str) -> str:
  """The task's test file under `../shared/data` (an error naming `--data` if absent)."""
  root = shared_data_dir()
  if root is None or not (root / _SHARED_DATA[task]).is_file():
    raise FileNotFoundError(f"--task={task}: no ../shared/data/{_SHARED_DATA[task]} here; "
                            "pass --data=PATH to a jsonl file")
  return str(root / _SHARED_DATA[task])


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


def to_problem(row: dict, task: str, query_column: str = "query",
               response_column: str = "response") -> Problem:
  """A jsonl row (GSM8K question/answer, MATH problem/solution, or query/response) as a Problem."""
  if "question" in row and "answer" in row:  # GSM8K
    response = gsm8k_response(row["answer"])
    return Problem(row["question"], response, gsm8k_target(row["answer"]))
  if "problem" in row and "solution" in row:  # MATH
    return Problem(row["problem"], math_response(row["solution"]), last_boxed(row["solution"]) or "")
  if query_column in row and response_column in row:
    response = row[response_column]
    answer = row.get("answer")
    if answer is None:
      extract = extract_gsm8k_answer if task == "gsm8k" else extract_math_answer
      answer = extract(response) or ""
    return Problem(row[query_column], response, str(answer))
  raise KeyError(f"row has none of question/answer, problem/solution, "
                 f"{query_column}/{response_column}: keys {sorted(row)}")


# ----------------------------------------------------------------------------
# Answers.
# ----------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"The answer is:[ \t]*([^\n]*)")


def normalize_number(text: str) -> str:
  """'1,000' -> '1000', '3.50' -> '3.5', '7.0' -> '7'; other text is returned stripped."""
  text = text.strip().replace(",", "").rstrip(".")
  try:
    value = float(text)
  except ValueError:
    return text
  if math.isfinite(value) and value == int(value):
    return str(int(value))
  return repr(value)


def gsm8k_target(answer: str) -> str:
  """The number after '####' in a GSM8K reference answer, normalised."""
  return normalize_number(answer.split("####")[-1])


def extract_gsm8k_answer(text: str) -> Optional[str]:
  """The number after the first "The answer is:", else after "####", else the last number."""
  for pattern in (_ANSWER_IS, re.compile(r"####[ \t]*([^\n]*)")):
    found = pattern.search(text)
    if found:
      number = _NUMBER.search(found.group(1))
      if number:
        return normalize_number(number.group())
  numbers = _NUMBER.findall(text)
  return normalize_number(numbers[-1]) if numbers else None


def numbers_equal(prediction: Optional[str], target: str) -> bool:
  if prediction is None:
    return False
  try:
    return abs(float(prediction) - float(target)) <= 1e-6 * max(1.0, abs(float(target)))
  except ValueError:
    return prediction == target


def last_boxed(text: str) -> Optional[str]:
  """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed x`), braces matched."""
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if start < 0:
    return None
  rest = text[start:].split("\\boxed", 1)[-1] if text.startswith("\\boxed", start) else text[start + 5:]
  if rest.startswith(" "):
    return rest[1:].split("$")[0].split()[0] if rest[1:].strip() else None
  if not rest.startswith("{"):
    return None
  depth = 0
  for i, char in enumerate(rest):
    depth += {"{": 1, "}": -1}.get(char, 0)
    if depth == 0:
      return rest[1:i]
  return None


def extract_math_answer(text: str) -> Optional[str]:
  """The first "The answer is:" line, else the last `\\boxed{}` content."""
  found = _ANSWER_IS.search(text)
  if found and found.group(1).strip():
    line = found.group(1).strip()
    return last_boxed(line) or line
  return last_boxed(text)


def _fix_fracs(text: str) -> str:
  """\\frac12 -> \\frac{1}{2}, \\frac1{b} -> \\frac{1}{b}."""
  parts = text.split("\\frac")
  out = parts[0]
  for part in parts[1:]:
    if part.startswith("{") or len(part) < 2:
      out += "\\frac" + part
      continue
    a, rest = part[0], part[1:]
    if rest.startswith("{"):
      out += "\\frac{" + a + "}" + rest
    else:
      out += "\\frac{" + a + "}{" + rest[0] + "}" + rest[1:]
  return out


def normalize_math_answer(text: Optional[str]) -> str:
  """A MATH answer in a canonical spelling (in the spirit of Hendrycks et al.'s `is_equiv`).

  Drops $, spaces, \\left/\\right, \\!, units in \\text{}, degree and percent
  signs, a trailing period, a short `x =` prefix and a surrounding \\boxed{};
  unifies \\dfrac/\\tfrac to \\frac, braces \\frac12 and \\sqrt2, writes a/b as
  \\frac{a}{b}, adds a leading 0 to .5 and drops thousands separators.
  """
  if text is None:
    return ""
  s = text.strip()
  inner = last_boxed(s) if s.startswith("\\boxed") else None
  s = inner if inner is not None else s
  for old, new in (("\n", ""), ("\\!", ""), ("\\left", ""), ("\\right", ""), ("\\,", ""),
                   ("\\;", ""), ("\\:", ""), ("dfrac", "frac"), ("tfrac", "frac"),
                   ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", ""),
                   ("$", "")):
    s = s.replace(old, new)
  s = re.sub(r"(\d)\s*\\(?:text|mbox|mathrm)\{[^}]*\}\s*$", r"\1", s)  # trailing units
  s = re.sub(r"\\(?:text|mbox|mathrm)\{([^}]*)\}", r"\1", s)
  s = s.strip().rstrip(".").strip()
  if re.fullmatch(r"[A-Za-z]{1,2}\s*=.*", s):
    s = s.split("=", 1)[1]
  s = s.replace(" ", "")
  s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
  s = _fix_fracs(s)
  if re.fullmatch(r"-?\d+/\d+", s):
    a, b = s.split("/")
    s = f"\\frac{{{a}}}{{{b}}}"
  if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
    s = s.replace(",", "")
  if s.startswith("."):
    s = "0" + s
  if s.startswith("-."):
    s = "-0" + s[1:]
  return s


def math_equal(prediction: Optional[str], target: str) -> bool:
  a, b = normalize_math_answer(prediction), normalize_math_answer(target)
  if not a:
    return False
  if a == b:
    return True
  try:
    return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
  except ValueError:
    return False


# ----------------------------------------------------------------------------
# Prompts.
# ----------------------------------------------------------------------------

def build_prompt(query: str, shots: Sequence[Problem] = ()) -> str:
  """`query : Q response :`, after solved exemplars in the training format, "\\n\\n" apart."""
  from coe_jax.data.tokenized import format_example, format_prompt
  parts = [format_example(s.query, s.response) for s in shots] + [format_prompt(query)]
  return "\n\n".join(parts)


def split_shots(problems: list[Problem], num_shots: int, seed: int,
                shots_from: Optional[list[Problem]] = None) -> tuple[list[Problem], list[Problem]]:
  """(exemplars, problems to score): `num_shots` exemplars drawn with `seed` from `shots_from`,
  or, without it, from the evaluation problems themselves (then not scored)."""
  if num_shots <= 0:
    return [], problems
  pool = problems if shots_from is None else shots_from
  if num_shots > len(pool):
    raise ValueError(f"--num_shots={num_shots} but only {len(pool)} exemplars are available")
  picked = sorted(random.Random(seed).sample(range(len(pool)), num_shots))
  shots = [pool[i] for i in picked]
  if shots_from is None:
    taken = set(picked)
    problems = [p for i, p in enumerate(problems) if i not in taken]
  return shots, problems


# ----------------------------------------------------------------------------
# The tasks.
# ----------------------------------------------------------------------------

def _bar(iterable: Iterable, enabled: bool, **kwargs):
  if not enabled:
    return iterable
  from tqdm import tqdm
  return tqdm(iterable, dynamic_ncols=True, **kwargs)


def validation_loss(run, problems: Optional[list[Problem]] = None, *, batch_size: int = 0,
                    max_length: int = 0, progress: bool = False) -> dict[str, float]:
  """Token cross-entropy and perplexity of `run` (a `run_dir.Run`).

  Without `problems`: the run's own validation split and eval batch size.
  """
  import jax
  from coe_jax import train
  from coe_jax.data import tokenizer as tokenizer_lib
  from coe_jax.data.tokenized import build_split, format_example
  batch_size = batch_size or int(run.config.train.get("eval_batch_size", 32))
  max_length = max_length or int(run.config.data.max_length)
  if problems is None:
    from coe_jax.data.input_pipeline import build_datasets
    datasets = build_datasets(run.config.data, workdir=run.workdir, seed=int(run.config.seed))
    split = datasets.val
  else:
    if run.tokenizer is None:
      raise FileNotFoundError(f"{run.workdir}: no tokenizer.json; cannot tokenise --data")
    texts = [format_example(p.query, p.response) for p in problems]
    eos = tokenizer_lib.eos_id(run.tokenizer) if run.config.data.get("eos_target", False) else None
    split = build_split(run.tokenizer, texts, max_length, tokenizer_lib.pad_id(run.tokenizer), False,
                        eos_id=eos)  # the run's own targets: with EOS iff it trained with them
  eval_step = jax.jit(train.make_eval_step(run.model))
  batches = (split.batch(range(start, min(start + batch_size, split.num_rows)),
                         pad_rows=max(0, start + batch_size - split.num_rows))
             for start in _bar(range(0, split.num_rows, batch_size), progress, desc="val_loss",
                               unit="batch"))
  loss, count = train.evaluate(eval_step, run.params, batches, with_count=True)
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count,
          "examples": split.num_examples}


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


def answer_accuracy(run, problems: list[Problem], task: str, settings: GenerationSettings, *,
                    shots: Sequence[Problem] = (), progress: bool = False
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Exact-match accuracy of greedy (or sampled) answers to `problems` after `shots`.

  Returns (scores, one dict per problem with the generation and the verdict).
  """
  from coe_jax.generate import complete
  extract, equal = ((extract_gsm8k_answer, numbers_equal) if task == "gsm8k"
                    else (extract_math_answer, math_equal))
  prompts = [build_prompt(p.query, shots) for p in problems]
  outputs = complete(run.params, run.model_config, run.tokenizer, prompts,
                     max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                     max_prompt_length=settings.max_prompt_length or None,
                     temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
                     stop_strings=settings.stop_strings, progress=progress)
  predictions = []
  for problem, out in zip(problems, outputs):
    predicted = extract(out.text)
    predictions.append({"query": problem.query, "generation": out.text, "prediction": predicted,
                        "answer": problem.answer, "correct": bool(equal(predicted, problem.answer)),
                        "stopped": out.finished, "generated_tokens": len(out.token_ids)})
  correct = sum(p["correct"] for p in predictions)
  scores = {"accuracy": correct / max(len(predictions), 1), "correct": correct,
            "count": len(predictions), "num_shots": len(shots),
            "mean_generated_tokens": float(np.mean([p["generated_tokens"] for p in predictions]))
            if predictions else 0.0}
  return scores, predictions


def load_problems(task: str, data: Optional[str], query_column: str = "query",
                  response_column: str = "response") -> list[Problem]:
  """Every row of `data` (default: the task's shared test file) as a Problem."""
  path = data or default_data_path(task)
  return [to_problem(row, task, query_column, response_column) for row in read_jsonl(path)]


def evaluate_run(workdir: str, task: str, *, data: Optional[str] = None, limit: int = 0,
                 step: Optional[int] = None, settings: Optional[GenerationSettings] = None,
                 shots_data: Optional[str] = None, query_column: str = "query",
                 response_column: str = "response", batch_size: int = 0,
                 num_samples: int = 20, progress: bool = False, write: bool = True
                 ) -> dict[str, Any]:
  """Runs `task` on the run in `workdir`; writes eval_<task>.json and samples; returns the result.

  `limit` keeps the first N problems (after few-shot exemplars are set aside).
  """
  if task not in TASKS:
    raise ValueError(f"--task: got {task!r}; allowed values: {', '.join(TASKS)}")
  start = time.perf_counter()
  run = load_run(workdir, step)
  settings = settings or GenerationSettings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS.get(task, 256))
  result: dict[str, Any] = {"task": task, "workdir": run.workdir, "checkpoint_step": run.step,
                            "data": data or ("validation split of the run" if task == "val_loss"
                                             else default_data_path(task))}
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
    scores, predictions = answer_accuracy(run, problems, task, settings, shots=shots,
                                          progress=progress)
    result.update(scores, score=scores["accuracy"], metric="accuracy",
                  settings=dataclasses.asdict(settings))
  result.update(limit=limit, seconds=time.perf_counter() - start,
                model=run.model_config.to_dict(), config=run.config.to_dict())
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


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------

def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/, tokenizer.json).")
  flags.DEFINE_enum("task", "val_loss", TASKS, "What to evaluate.")
  flags.DEFINE_string("data", None, "jsonl file (default: the run's validation split for val_loss, "
                      "../shared/data/{gsm8k,math}/test.jsonl otherwise).")
  flags.DEFINE_integer("limit", 0, "Score only the first N problems (0 = all).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer("num_shots", 0, "Solved exemplars before each question (0 = zero-shot).")
  flags.DEFINE_string("shots_data", None, "jsonl to draw exemplars from (default: the eval file, "
                      "exemplars then not scored).")
  flags.DEFINE_integer("batch_size", 0, "Prompts per batch (0 = 16), or val_loss rows per batch "
                       "(0 = the run's eval_batch_size).")
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
  from absl import flags
  del argv
  f = flags.FLAGS
  settings = GenerationSettings(
      num_shots=f.num_shots, max_new_tokens=f.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(f.task, 256),
      batch_size=f.batch_size or 16, temperature=f.temperature, top_p=f.top_p, seed=f.seed,
      max_prompt_length=f.max_prompt_length, stop_strings=tuple(f.stop))
  result = evaluate_run(f.workdir, f.task, data=f.data, limit=f.limit, step=f.step,
                        settings=settings, shots_data=f.shots_data, query_column=f.query_column,
                        response_column=f.response_column,
                        batch_size=f.batch_size,
                        num_samples=f.num_samples, progress=True)
  keys = ("task", "metric", "score", "count", "checkpoint_step", "perplexity", "correct", "seconds")
  print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
  print(f"Wrote {os.path.join(result['workdir'], f'eval_{f.task}.json')}")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
