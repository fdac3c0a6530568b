"""Seeds for a paired study: the smallest n whose 95% t interval is at most a given half-width.

    python -m experiments.power --paired_sd=0.016 --half_width=0.012

The interval is `paired_verdict`'s (experiments/ablation.py): mean +- t(0.975, n - 1) sd / sqrt(n),
with sd the paired differences' sample standard deviation, taken here as known from an earlier
study. Prints the half-width for each n up to the answer and the answer.
"""

from __future__ import annotations

import math

from absl import app, flags
from scipy import stats

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_float("paired_sd", 0.016, "Standard deviation of the paired differences.")
  flags.DEFINE_float("half_width", 0.012, "Largest acceptable 95% interval half-width.")
  flags.DEFINE_float("confidence", 0.95, "Two-sided confidence of the interval.")


def half_width(paired_sd: float, n: int, confidence: float = 0.95) -> float:
  """t(1 - (1 - confidence) / 2, n - 1) * sd / sqrt(n)."""
  if n < 2:
    return math.inf
  return float(stats.t.ppf(1 - (1 - confidence) / 2, n - 1)) * paired_sd / math.sqrt(n)


def seeds_for_half_width(paired_sd: float, target: float, confidence: float = 0.95) -> int:
  """The smallest n >= 2 with `half_width(paired_sd, n) <= target`."""
  if paired_sd < 0 or target <= 0:
    raise ValueError(f"need paired_sd >= 0 and half_width > 0; got {paired_sd}, {target}")
  n = 2
  while half_width(paired_sd, n, confidence) > target:
    n += 1
  return n


def main(argv) -> None:
  del argv
  n = seeds_for_half_width(FLAGS.paired_sd, FLAGS.half_width, FLAGS.confidence)
  for k in range(2, n + 1):
    print(f"n = {k:2d}: half-width {half_width(FLAGS.paired_sd, k, FLAGS.confidence):.5f}")
  print(f"seeds needed: {n} (paired sd {FLAGS.paired_sd}, half-width <= {FLAGS.half_width})")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
