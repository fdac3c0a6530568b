"""Evaluating trained runs: `answers` (extracting and comparing final answers), `tasks`
(validation loss, GSM8K and MATH accuracy); the command line is `coe_jax.evaluate`."""

from coe_jax.evaluation.answers import (
  extract_gsm8k_answer,
  extract_math_answer,
  gsm8k_target,
  last_boxed,
  math_equal,
  normalize_math_answer,
  normalize_number,
  numbers_equal,
)
from coe_jax.evaluation.tasks import (
  DEFAULT_MAX_NEW_TOKENS,
  DEFAULT_STOP_STRINGS,
  TASKS,
  GenerationSettings,
  Problem,
  answer_accuracy,
  build_prompt,
  evaluate_run,
  load_problems,
  read_jsonl,
  split_shots,
  to_problem,
  validation_loss,
)

__all__ = [
  "DEFAULT_MAX_NEW_TOKENS",
  "DEFAULT_STOP_STRINGS",
  "GenerationSettings",
  "Problem",
  "TASKS",
  "answer_accuracy",
  "build_prompt",
  "evaluate_run",
  "extract_gsm8k_answer",
  "extract_math_answer",
  "gsm8k_target",
  "last_boxed",
  "load_problems",
  "math_equal",
  "normalize_math_answer",
  "normalize_number",
  "numbers_equal",
  "read_jsonl",
  "split_shots",
  "to_problem",
  "validation_loss",
]
