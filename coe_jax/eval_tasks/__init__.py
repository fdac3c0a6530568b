"""The tasks a trained run is evaluated on: `scoring` (validation loss, GSM8K and MATH accuracy,
`evaluate_run`) and `answers` (extracting and comparing final answers). The command line that
runs them is `python -m coe_jax.evaluate`."""

from coe_jax.eval_tasks.answers import (
  extract_gsm8k_answer,
  extract_math_answer,
  gsm8k_target,
  last_boxed,
  math_equal,
  normalize_math_answer,
  normalize_number,
  numbers_equal,
)
from coe_jax.eval_tasks.scoring import (
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
