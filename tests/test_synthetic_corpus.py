"""Tests for coe_jax.data.synthetic: the embedded word-problem corpus is deterministic and correct."""

from __future__ import annotations

import operator
import re
from fractions import Fraction

from coe_jax.data import synthetic

ANSWER_LINE = re.compile(r"\nThe answer is: (-?\d+)$")
STEP = re.compile(r"(\d+(?: ?[-+*/] ?\d+)+) = (\d+)")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


# --- synthetic corpus -----------------------------------------------------------------------------


def _check_steps(response: str) -> None:
  """Every `a op b ... = c` step is correct and the last one is the final answer."""
  steps = STEP.findall(response.replace("$", ""))
  assert steps, response
  for lhs, rhs in steps:
    tokens = re.findall(r"\d+|[-+*/]", lhs)
    value = Fraction(int(tokens[0]))
    for op, x in zip(tokens[1::2], tokens[2::2]):
      value = OPS[op](value, Fraction(int(x)))
    assert value == int(rhs), (lhs, rhs, response)
  assert ANSWER_LINE.search(response).group(1) == steps[-1][1]


def test_synthetic_is_deterministic_varied_and_correct():
  a = synthetic.generate_examples(600, seed=3)
  assert a == synthetic.generate_examples(600, seed=3)
  assert a != synthetic.generate_examples(600, seed=4)
  assert synthetic.generate_examples(50, seed=3) == a[:50]
  assert len({e["query"] for e in a}) == 600
  for example in a:
    assert set(example) == {"query", "response"}
    assert ANSWER_LINE.search(example["response"]), example
    _check_steps(example["response"])
  joined = " ".join(e["query"] for e in a)
  for marker in ("$", "years old", "%", "per hour", "/", "rows of", "What is", "cookies"):
    assert marker in joined, marker
  assert len({e["query"].split()[0] for e in a}) >= 20  # many names and openings
  assert len(synthetic.template_names()) >= 6


def test_addition_examples_format():
  examples = synthetic.addition_examples(200, seed=7)
  assert examples == synthetic.addition_examples(200, seed=7)
  assert len({e["query"] for e in examples}) == 200
  for e in examples:
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", e["query"]).groups())
    assert 10 <= a <= 99 and 10 <= b <= 99
    assert e["response"] == f"{a} + {b} = {a + b}\nThe answer is: {a + b}"
  three = synthetic.addition_examples(5, seed=0, digits=3)
  assert all(len(e["query"].split()[2]) == 3 for e in three)
