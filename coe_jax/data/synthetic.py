"""An embedded, procedurally generated corpus of grade-school math word problems.

Every example is a MetaMathQA-style record `{"query": str, "response": str}`
whose response is a short worked solution, one step per line, ending in
`\\nThe answer is: N`. The templates (shopping, rates, ages, fractions and
percentages, multi-step arithmetic, plain addition) draw names, objects and
numbers at random, so a small language model has real structure to learn:
the numbers in each step follow from the query by arithmetic.

Everything is deterministic given the seed (`random.Random` with an integer
seed produces the same stream on every platform and Python 3 version).
Bump `SYNTHETIC_VERSION` whenever a template changes: it is part of the
input pipeline's cache key.
"""

from __future__ import annotations

import random

from coe_jax.data.word_problems import TEMPLATES, Example, addition_pair

SYNTHETIC_VERSION = 1


def generate_examples(num_examples: int, seed: int) -> list[Example]:
  """`num_examples` distinct-query word problems drawn from all templates, fixed by `seed`."""
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}")
  rng = random.Random(seed)
  names = sorted(TEMPLATES)
  weights = [TEMPLATES[name][1] for name in names]
  examples: list[Example] = []
  seen: set[str] = set()
  attempts = 0
  while len(examples) < num_examples:
    attempts += 1
    if attempts > 50 * num_examples + 1000:
      raise ValueError(f"could not draw {num_examples} distinct problems; use fewer")
    template = TEMPLATES[rng.choices(names, weights)[0]][0]
    query, response = template(rng)
    if query not in seen:
      seen.add(query)
      examples.append({"query": query, "response": response})
  return examples


def addition_examples(num: int, seed: int, digits: int = 2) -> list[Example]:
  """Pure `digits`-digit additions, e.g. "What is 23 + 45?" -> "23 + 45 = 68\\nThe answer is: 68".

  Pairs are distinct while `num` does not exceed the number of possible pairs.
  """
  if digits < 1:
    raise ValueError(f"digits must be >= 1, got {digits}")
  low, high = 10 ** (digits - 1), 10**digits - 1
  span = high - low + 1
  rng = random.Random(seed)
  if num <= span * span:
    codes = rng.sample(range(span * span), num)
  else:
    codes = [rng.randrange(span * span) for _ in range(num)]
  return [addition_pair(low + code // span, low + code % span) for code in codes]


def template_names() -> list[str]:
  """The names of all templates, sorted."""
  return sorted(TEMPLATES)
