"""The word-problem templates of the synthetic corpus, and the names and things they draw.

Each template maps a `random.Random` to a `(query, response)` pair: a MetaMathQA-style
question and its worked solution, one arithmetic step a line, ending in
`\\nThe answer is: N`. `synthetic.generate_examples` draws from `TEMPLATES` by weight.
Changing a template changes the corpus: bump `synthetic.SYNTHETIC_VERSION` with it (the
tokenised-data cache is keyed by it).
"""

from __future__ import annotations

import random
from typing import Callable

Example = dict[str, str]
Template = Callable[[random.Random], tuple[str, str]]

_NAMES = (
  "Ava Ben Carla Dev Elena Farid Grace Hiro Ines Jamal Keiko Liam Maya Nikolai Olivia Pablo Quinn "
  "Rafael Sofia Tomas Uma Victor Wen Xavier Yara Zane Amara Bilal Chloe Diego"
)
# (name, subject pronoun): the names alternate she, he.
_PEOPLE = tuple(zip(_NAMES.split(), ("she", "he") * 15))
# (plural noun, lowest price, highest price) in whole dollars.
_GOODS = (
  ("apples", 1, 3),
  ("notebooks", 2, 6),
  ("pencils", 1, 2),
  ("books", 5, 15),
  ("toy cars", 3, 9),
  ("shirts", 8, 25),
  ("cupcakes", 2, 5),
  ("bags of rice", 4, 12),
  ("movie tickets", 7, 14),
  ("plants", 3, 11),
  ("puzzles", 6, 18),
  ("scarves", 9, 20),
)
_COUNTABLES = (
  "marbles",
  "stickers",
  "stamps",
  "seashells",
  "baseball cards",
  "coins",
  "beads",
  "crayons",
  "balloons",
  "cookies",
  "candies",
  "buttons",
)
_ITEMS_FOR_SALE = (
  "jacket",
  "bicycle",
  "lamp",
  "backpack",
  "video game",
  "pair of shoes",
  "tent",
  "watch",
  "guitar",
  "desk",
)
_VEHICLES = ("car", "train", "bus", "truck", "motorcycle")
_PRODUCTS = ("bottles", "boxes", "toys", "cans", "bricks", "bags")
_PLANTS = ("apple trees", "orange trees", "rose bushes", "corn plants", "pine trees")
_GROUPS = (
  ("students", "a class", "girls", "boys"),
  ("animals", "a farm", "cows", "other animals"),
  ("books", "a library shelf", "novels", "other books"),
  ("cars", "a parking lot", "red cars", "cars of other colors"),
)


def _person(rng: random.Random, exclude: str = "") -> tuple[str, str, str]:
  """A (name, subject pronoun, possessive pronoun) triple, not named `exclude`."""
  while True:
    name, he = rng.choice(_PEOPLE)
    if name != exclude:
      return name, he, "his" if he == "he" else "her"


def _answer(lines: list[str], answer: int) -> str:
  """Joins solution steps and appends the MetaMathQA final-answer line."""
  return "\n".join(lines + [f"The answer is: {answer}"])


def _shopping_total(rng: random.Random) -> tuple[str, str]:
  name, he, _ = _person(rng)
  (goods_a, lo_a, hi_a), (goods_b, lo_b, hi_b) = rng.sample(_GOODS, 2)
  a, b = rng.randint(2, 9), rng.randint(2, 9)
  p, q = rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b)
  x, y = a * p, b * q
  query = (
    f"{name} buys {a} {goods_a} at ${p} each and {b} {goods_b} at ${q} each. "
    f"How much money does {he} spend in total?"
  )
  lines = [
    f"{name} spends {a} * ${p} = ${x} on {goods_a}.",
    f"{he.capitalize()} spends {b} * ${q} = ${y} on {goods_b}.",
    f"In total {he} spends ${x} + ${y} = ${x + y}.",
  ]
  return query, _answer(lines, x + y)


def _shopping_change(rng: random.Random) -> tuple[str, str]:
  name, he, _ = _person(rng)
  goods, lo, hi = rng.choice(_GOODS)
  a, p = rng.randint(2, 8), rng.randint(lo, hi)
  cost = a * p
  budget = rng.choice([b for b in (20, 50, 100, 200, 300, 500) if b > cost])
  query = (
    f"{name} has ${budget}. {he.capitalize()} buys {a} {goods} that cost ${p} each. "
    f"How much money does {he} have left?"
  )
  lines = [
    f"The {goods} cost {a} * ${p} = ${cost}.",
    f"{name} has ${budget} - ${cost} = ${budget - cost} left.",
  ]
  return query, _answer(lines, budget - cost)


def _rate_distance(rng: random.Random) -> tuple[str, str]:
  name, he, _ = _person(rng)
  s1, s2 = rng.randint(3, 14) * 5, rng.randint(3, 14) * 5
  t1, t2 = rng.randint(1, 5), rng.randint(1, 5)
  d1, d2 = s1 * t1, s2 * t2
  query = (
    f"{name} drives at {s1} miles per hour for {t1} hours and then at {s2} miles per "
    f"hour for {t2} hours. How many miles does {he} drive in total?"
  )
  lines = [
    f"In the first part {he} drives {s1} * {t1} = {d1} miles.",
    f"In the second part {he} drives {s2} * {t2} = {d2} miles.",
    f"Altogether {he} drives {d1} + {d2} = {d1 + d2} miles.",
  ]
  return query, _answer(lines, d1 + d2)


def _rate_wage(rng: random.Random) -> tuple[str, str]:
  name, he, _ = _person(rng)
  wage, hours = rng.randint(8, 30), rng.randint(2, 8)
  days, weeks = rng.randint(2, 6), rng.randint(2, 4)
  daily = wage * hours
  weekly = daily * days
  query = (
    f"{name} earns ${wage} per hour. {he.capitalize()} works {hours} hours a day, "
    f"{days} days a week. How much does {he} earn in {weeks} weeks?"
  )
  lines = [
    f"In one day {he} earns {hours} * ${wage} = ${daily}.",
    f"In one week {he} earns {days} * ${daily} = ${weekly}.",
    f"In {weeks} weeks {he} earns {weeks} * ${weekly} = ${weekly * weeks}.",
  ]
  return query, _answer(lines, weekly * weeks)


def _rate_time(rng: random.Random) -> tuple[str, str]:
  name, he, _ = _person(rng)
  rate, hours_left, done = rng.randint(5, 40), rng.randint(2, 9), rng.randint(10, 120)
  remaining = rate * hours_left
  total = remaining + done
  query = (
    f"{name} reads {rate} pages per hour. {he.capitalize()} is reading a book with "
    f"{total} pages and has already read {done} pages. How many more hours does "
    f"{he} need to finish the book?"
  )
  lines = [
    f"{name} still has {total} - {done} = {remaining} pages to read.",
    f"At {rate} pages per hour that takes {remaining} / {rate} = {hours_left} hours.",
  ]
  return query, _answer(lines, hours_left)


def _rate_machine(rng: random.Random) -> tuple[str, str]:
  product, vehicle = rng.choice(_PRODUCTS), rng.choice(_VEHICLES)
  rate, hours = rng.randint(2, 12), rng.randint(2, 6)
  minutes = hours * 60
  made = rate * minutes
  per_load = rng.choice([d for d in (10, 20, 30, 40, 60, 80, 120) if made % d == 0])
  loads = made // per_load
  query = (
    f"A machine makes {rate} {product} per minute. It runs for {hours} hours, and a "
    f"{vehicle} can carry {per_load} {product}. How many {vehicle} loads are needed "
    f"to carry all the {product}?"
  )
  lines = [
    f"{hours} hours is {hours} * 60 = {minutes} minutes.",
    f"The machine makes {rate} * {minutes} = {made} {product}.",
    f"That needs {made} / {per_load} = {loads} loads.",
  ]
  return query, _answer(lines, loads)


def _ages_older(rng: random.Random) -> tuple[str, str]:
  a, _, _ = _person(rng)
  b, _, _ = _person(rng, exclude=a)
  gap, years, future = rng.randint(2, 30), rng.randint(2, 15), rng.randint(18, 60)
  b_now = future - years
  query = (
    f"{a} is {gap} years older than {b}. In {years} years, {b} will be {future} years "
    f"old. How old is {a} now?"
  )
  lines = [
    f"{b} is {future} - {years} = {b_now} years old now.",
    f"So {a} is {b_now} + {gap} = {b_now + gap} years old.",
  ]
  return query, _answer(lines, b_now + gap)


def _ages_times(rng: random.Random) -> tuple[str, str]:
  a, _, _ = _person(rng)
  b, _, _ = _person(rng, exclude=a)
  times, b_age = rng.randint(2, 5), rng.randint(3, 15)
  a_age = times * b_age
  query = (
    f"{a} is {times} times as old as {b}. If {b} is {b_age} years old, what is the sum "
    f"of their ages?"
  )
  lines = [
    f"{a} is {times} * {b_age} = {a_age} years old.",
    f"The sum of their ages is {a_age} + {b_age} = {a_age + b_age}.",
  ]
  return query, _answer(lines, a_age + b_age)


def _ages_past(rng: random.Random) -> tuple[str, str]:
  a, _, _ = _person(rng)
  b, _, _ = _person(rng, exclude=a)
  b_then, ago = rng.randint(3, 20), rng.randint(2, 12)
  a_then = 2 * b_then
  a_now = a_then + ago
  query = (
    f"{a} is {a_now} years old. {ago} years ago, {a} was twice as old as {b} was then. "
    f"How old is {b} now?"
  )
  lines = [
    f"{ago} years ago {a} was {a_now} - {ago} = {a_then} years old.",
    f"Then {b} was {a_then} / 2 = {b_then} years old.",
    f"Now {b} is {b_then} + {ago} = {b_then + ago} years old.",
  ]
  return query, _answer(lines, b_then + ago)


def _fraction_give(rng: random.Random) -> tuple[str, str]:
  name, he, _ = _person(rng)
  friend, _, _ = _person(rng, exclude=name)
  things = rng.choice(_COUNTABLES)
  den = rng.randint(2, 6)
  num = rng.randint(1, den - 1)
  total = den * rng.randint(3, 15)
  given = total * num // den
  left = total - given
  lost = rng.randint(1, left)
  query = (
    f"{name} has {total} {things}. {he.capitalize()} gives {num}/{den} of them to "
    f"{friend} and then loses {lost}. How many {things} does {name} have left?"
  )
  lines = [
    f"{name} gives away {total} * {num}/{den} = {given} {things}.",
    f"That leaves {total} - {given} = {left} {things}.",
    f"After losing {lost}, {he} has {left} - {lost} = {left - lost} {things}.",
  ]
  return query, _answer(lines, left - lost)


def _percent_discount(rng: random.Random) -> tuple[str, str]:
  item = rng.choice(_ITEMS_FOR_SALE)
  price, pct = 20 * rng.randint(1, 25), 5 * rng.randint(1, 15)
  off = price * pct // 100
  query = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price?"
  lines = [
    f"The discount is {pct}% of ${price}, which is {pct}/100 * ${price} = ${off}.",
    f"The sale price is ${price} - ${off} = ${price - off}.",
  ]
  return query, _answer(lines, price - off)


def _percent_group(rng: random.Random) -> tuple[str, str]:
  members, place, part, rest = rng.choice(_GROUPS)
  total, pct = 20 * rng.randint(1, 10), 5 * rng.randint(1, 19)
  part_n = total * pct // 100
  query = (
    f"There are {total} {members} in {place}. {pct}% of them are {part}. How many {rest} are there?"
  )
  lines = [
    f"There are {pct}/100 * {total} = {part_n} {part}.",
    f"So there are {total} - {part_n} = {total - part_n} {rest}.",
  ]
  return query, _answer(lines, total - part_n)


def _multistep_farm(rng: random.Random) -> tuple[str, str]:
  plants = rng.choice(_PLANTS)
  rows, per_row = rng.randint(3, 12), rng.randint(4, 15)
  total = rows * per_row
  cut, planted = rng.randint(1, total - 1), rng.randint(1, 30)
  final = total - cut + planted
  query = (
    f"A farm has {rows} rows of {per_row} {plants}. {cut} of them are removed and then "
    f"{planted} new ones are planted. How many {plants} does the farm have now?"
  )
  lines = [
    f"At first there are {rows} * {per_row} = {total} {plants}.",
    f"After removing {cut} there are {total} - {cut} = {total - cut}.",
    f"After planting {planted} more there are {total - cut} + {planted} = {final}.",
  ]
  return query, _answer(lines, final)


def _multistep_share(rng: random.Random) -> tuple[str, str]:
  name, he, _ = _person(rng)
  batches, per_batch = rng.randint(2, 6), rng.randint(6, 24)
  total = batches * per_batch
  friends = rng.randint(2, 6)
  each = rng.randint(1, total // friends)
  shared = friends * each
  query = (
    f"{name} bakes {batches} batches of {per_batch} cookies. {he.capitalize()} gives "
    f"{each} cookies to each of {friends} friends. How many cookies are left?"
  )
  lines = [
    f"{name} bakes {batches} * {per_batch} = {total} cookies.",
    f"{he.capitalize()} gives away {friends} * {each} = {shared} cookies.",
    f"There are {total} - {shared} = {total - shared} cookies left.",
  ]
  return query, _answer(lines, total - shared)


def _word_addition(rng: random.Random) -> tuple[str, str]:
  name, he, _ = _person(rng)
  friend, _, _ = _person(rng, exclude=name)
  things = rng.choice(_COUNTABLES)
  had, got = rng.randint(10, 99), rng.randint(10, 99)
  query = (
    f"{name} had {had} {things}. {friend} gave {name} {got} more. How many {things} "
    f"does {name} have now?"
  )
  lines = [f"{name} has {had} + {got} = {had + got} {things} now."]
  return query, _answer(lines, had + got)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
  a, b = rng.randint(10, 99), rng.randint(10, 99)
  op = rng.choice(("+", "-", "*"))
  if op == "-" and b > a:
    a, b = b, a
  if op == "*":
    b = rng.randint(2, 9)
  value = {"+": a + b, "-": a - b, "*": a * b}[op]
  return f"What is {a} {op} {b}?", _answer([f"{a} {op} {b} = {value}"], value)


def addition_pair(a: int, b: int) -> Example:
  return {"query": f"What is {a} + {b}?", "response": _answer([f"{a} + {b} = {a + b}"], a + b)}


def _addition(rng: random.Random) -> tuple[str, str]:
  example = addition_pair(rng.randint(10, 99), rng.randint(10, 99))
  return example["query"], example["response"]


# Template name -> (function, relative weight).
TEMPLATES: dict[str, tuple[Template, int]] = {
  "shopping_total": (_shopping_total, 3),
  "shopping_change": (_shopping_change, 2),
  "rate_distance": (_rate_distance, 2),
  "rate_wage": (_rate_wage, 2),
  "rate_time": (_rate_time, 2),
  "rate_machine": (_rate_machine, 1),
  "ages_older": (_ages_older, 2),
  "ages_times": (_ages_times, 1),
  "ages_past": (_ages_past, 1),
  "fraction_give": (_fraction_give, 2),
  "percent_discount": (_percent_discount, 2),
  "percent_group": (_percent_group, 1),
  "multistep_farm": (_multistep_farm, 2),
  "multistep_share": (_multistep_share, 2),
  "word_addition": (_word_addition, 2),
  "arithmetic": (_arithmetic, 2),
  "addition": (_addition, 3),
}
