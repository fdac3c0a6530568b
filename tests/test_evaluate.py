"""Tests for coe_jax.eval_tasks: answer extraction, prompts, the shared problem files.

A trained model evaluated end to end (`evaluate_run`, python -m coe_jax.evaluate) is in
test_evaluate_trained.py.
"""

from __future__ import annotations

import pytest
from data_helpers import SHARED_DATA, needs_shared_data

from coe_jax import eval_tasks

# ----------------------------------------------------------------------------
# Answers and prompts.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "text,expected",
  [
    ("5 + 7 = 12\nThe answer is: 1,234.\nquery : more 99", "1234"),
    ("The answer is: $18.50 per day", "18.5"),
    ("The answer is: -3", "-3"),
    ("so 4 * 2 = 8\n#### 8\nThen 17 more", "8"),
    ("first 3 then 4 and finally 5.0", "5"),
    ("no digits at all", None),
  ],
)
def test_extract_gsm8k_answer(text, expected):
  assert eval_tasks.extract_gsm8k_answer(text) == expected


def test_gsm8k_target_and_numeric_match():
  assert eval_tasks.gsm8k_target("She pays 2*500=<<2*500=1000>>1000.\n#### 1,000") == "1000"
  assert eval_tasks.numbers_equal("3.50", "3.5") and eval_tasks.numbers_equal("1000", "1000")
  assert not eval_tasks.numbers_equal(None, "3") and not eval_tasks.numbers_equal("31", "3")


def test_gsm8k_rows_become_training_style_responses():
  row = {"question": "Q?", "answer": "2*3=<<2*3=6>>6 apples.\n#### 1,006"}
  problem = eval_tasks.to_problem(row, "gsm8k")
  assert problem == eval_tasks.Problem(
    "Q?", "2*3=6 apples.\n#### 1,006\nThe answer is: 1006", "1006"
  )


@pytest.mark.parametrize(
  "text,expected",
  [
    ("so \\boxed{\\frac{1}{2}} and then \\boxed{x^{2}+1}.", "x^{2}+1"),
    ("$\\boxed 5$", "5"),
    ("\\fbox{7}", "7"),
    ("\\boxed{unbalanced", None),
    ("nothing", None),
  ],
)
def test_last_boxed(text, expected):
  assert eval_tasks.last_boxed(text) == expected


def test_math_rows_and_extraction():
  row = {"problem": "P", "solution": "Thus $x = \\boxed{\\dfrac{3}{4}}$.", "level": "Level 2"}
  problem = eval_tasks.to_problem(row, "math")
  assert problem.answer == "\\dfrac{3}{4}"
  assert problem.response.endswith("\nThe answer is: \\dfrac{3}{4}")
  assert eval_tasks.extract_math_answer("... \\boxed{3}.\nThe answer is: 3\nquery : x") == "3"
  assert eval_tasks.extract_math_answer("we get $\\boxed{(1,2)}$ done") == "(1,2)"


@pytest.mark.parametrize(
  "a,b",
  [
    ("\\dfrac{1}{2}", "\\frac12"),
    ("1/2", "\\frac{1}{2}"),
    ("x = 5", "5"),
    ("10\\%", "10"),
    ("5 \\text{ cm}", "5"),
    ("\\$1,000", "1000"),
    (".5", "0.5"),
    ("90^\\circ", "90"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("\\boxed{7}", "7"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\text{(A)}", "(A)"),
    ("2.50", "2.5"),
  ],
)
def test_math_answers_that_are_equal(a, b):
  assert eval_tasks.math_equal(a, b)


@pytest.mark.parametrize(
  "a,b",
  [("\\frac{1}{3}", "\\frac{1}{2}"), ("(1,2)", "(2,1)"), ("", "0"), (None, "1"), ("12", "1,2")],
)
def test_math_answers_that_differ(a, b):
  assert not eval_tasks.math_equal(a, b)


def test_prompts_and_shots():
  problems = [eval_tasks.Problem(f"q{i}", f"r{i}", str(i)) for i in range(6)]
  assert eval_tasks.build_prompt("Q") == "query : Q response :"
  shots, rest = eval_tasks.split_shots(problems, 2, seed=5)
  assert len(shots) == 2 and len(rest) == 4 and not set(shots) & set(rest)
  assert eval_tasks.split_shots(problems, 2, seed=5) == (shots, rest)  # deterministic
  prompt = eval_tasks.build_prompt("Q", shots)
  assert prompt.startswith(f"query : {shots[0].query} response : {shots[0].response}\n\n")
  assert prompt.endswith("\n\nquery : Q response :")
  shots2, rest2 = eval_tasks.split_shots(problems, 2, seed=5, shots_from=problems[:3])
  assert rest2 == problems and set(shots2) <= set(problems[:3])


@needs_shared_data
def test_shared_gsm8k_and_math_files_parse():
  gsm8k = eval_tasks.load_problems("gsm8k", str(SHARED_DATA / "gsm8k" / "test.jsonl"))
  assert len(gsm8k) == 1319 and all(
    eval_tasks.normalize_number(p.answer) == p.answer for p in gsm8k
  )
  math_problems = eval_tasks.load_problems("math", str(SHARED_DATA / "math" / "test.jsonl"))
  assert len(math_problems) == 5000
  assert sum(bool(p.answer) for p in math_problems) >= 4990
  # Extracting from the training-style response gives back the reference answer (one MATH
  # answer, "90\\text{ square\\nunits}", spans two lines).
  assert all(
    eval_tasks.numbers_equal(eval_tasks.extract_gsm8k_answer(p.response), p.answer) for p in gsm8k
  )
  misses = [
    p.answer
    for p in math_problems
    if p.answer and not eval_tasks.math_equal(eval_tasks.extract_math_answer(p.response), p.answer)
  ]
  assert len(misses) <= 1, misses[:5]


def test_answer_tasks_need_a_data_path_not_a_guessed_layout():
  with pytest.raises(ValueError, match=r"--task=gsm8k: pass --data=PATH"):
    eval_tasks.load_problems("gsm8k", None)
