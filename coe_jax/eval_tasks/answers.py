"""Reading a final answer out of generated text, and comparing it with the reference.

GSM8K: the number after the first "The answer is:" (else after "####", else the
last number), compared numerically. MATH: the first "The answer is:" line
(else the last `\\boxed{}`), compared after `normalize_math_answer`.
"""

from __future__ import annotations

import math
import re
from typing import Optional

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
  rest = (
    text[start:].split("\\boxed", 1)[-1] if text.startswith("\\boxed", start) else text[start + 5 :]
  )
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
  for old, new in (
    ("\n", ""),
    ("\\!", ""),
    ("\\left", ""),
    ("\\right", ""),
    ("\\,", ""),
    ("\\;", ""),
    ("\\:", ""),
    ("dfrac", "frac"),
    ("tfrac", "frac"),
    ("^\\circ", ""),
    ("^{\\circ}", ""),
    ("\\%", ""),
    ("%", ""),
    ("\\$", ""),
    ("$", ""),
  ):
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
