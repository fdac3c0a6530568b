"""The paper's claims as paired differences between runs, and the pre-registered verdict rule.

Runs with the same seed see the same batches in the same order, so each claim
A < B is judged on the per-seed differences A - B (`paired_differences`): a
95% t interval of their mean and the rule of experiments/README.md.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from experiments.ablation_results import RunResult, paired_differences

# The paper's orderings: (claim, run A, run B); the paper's numbers say which of A and B is lower.
CLAIMS: tuple[tuple[str, str, str], ...] = (
  ("CoE(C=2,K=4) beats MoE(K=8) at equal compute", "coe_c2", "moe_k8"),
  ("C=2 beats 2x wider top-K", "coe_c2", "moe_k16"),
  ("C=2 beats 3x wider top-K", "coe_c2", "moe_k24"),
  ("more compute per iteration adds little (K=8 vs K=4 at C=2)", "coe_c2_k8", "coe_c2"),
  ("8 layers beat C=2 (iteration approaches depth)", "moe_k8_l8", "coe_c2"),
  ("12 layers beat C=2 (iteration approaches depth)", "moe_k8_l12", "coe_c2"),
  ("CoE with N=48 stays near MoE with N=64", "coe_c2_n48", "moe_k8"),
  ("inner residual beats outer residual", "coe_c2_k8", "coe_c2_k8_outer_residual"),
  (
    "independent gates beat a shared gate (both outer residual)",
    "coe_c2_k8_outer_residual",
    "coe_c2_k8_shared_gate",
  ),
  ("iteration does not help dense-style layers (K=N)", "dense_c1", "dense_c2"),
)


def seed_sd(result: RunResult) -> float:
  """Sample standard deviation of `result`'s final val loss over its seeds (0 with one seed)."""
  values = np.asarray(result.val_losses)
  return float(np.std(values, ddof=1)) if values.size > 1 else 0.0


def claim_rows(results: dict[str, RunResult]) -> list[list[str]]:
  """Per claim with both runs finished: the paper's A-B difference, ours per seed, and agreement.

  'same sign, every seed' means every seed's paired difference has the paper's sign;
  'opposite, every seed' the reverse; 'mixed' otherwise. 'beyond seed spread' compares the
  mean difference with the seed-to-seed spread of the two runs' losses (their pooled sd).
  """
  rows = []
  for claim, a, b in CLAIMS:
    if a not in results or b not in results:
      continue
    paper = results[a].paper_val_loss - results[b].paper_val_loss
    diffs = paired_differences(results[a], results[b])
    if diffs.size == 0:
      continue
    signs = np.sign(diffs) * np.sign(paper)
    verdict = (
      "same sign, every seed"
      if np.all(signs > 0)
      else "opposite, every seed"
      if np.all(signs < 0)
      else "mixed"
    )
    mean = float(np.mean(diffs))
    spread = float(np.sqrt((seed_sd(results[a]) ** 2 + seed_sd(results[b]) ** 2) / 2))
    if diffs.size < 2:
      beyond = "n/a (1 seed)"
    elif spread == 0:
      beyond = "yes" if mean else "no"
    else:
      beyond = f"{'yes' if abs(mean) > spread else 'no'} ({abs(mean) / spread:.1f} sd)"
    low, high, decision = paired_verdict(diffs, paper)
    interval = "n/a" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"
    rows.append(
      [
        claim,
        f"{a} - {b}",
        f"{paper:+.3f}",
        " / ".join(f"{d:+.4f}" for d in diffs),
        f"{mean:+.4f}",
        verdict,
        beyond,
        interval,
        decision,
      ]
    )
  return rows


CLAIM_COLUMNS = (
  "paper's claim",
  "A - B",
  "paper",
  "ours per seed",
  "ours mean",
  "ours vs paper",
  "beyond seed spread",
  "95% CI",
  "verdict (pre-registered rule)",
)


def t_975(df: int) -> float:
  """The two-sided 95% critical value of Student's t with `df` degrees of freedom."""
  return float(stats.t.ppf(0.975, df))


SMALLEST_EFFECT = 0.01  # nats: the smallest A - B difference of interest (experiments/README.md)


def paired_verdict(
  diffs: np.ndarray, paper_sign: float, smallest_effect: float = SMALLEST_EFFECT
) -> tuple[float, float, str]:
  """(CI low, CI high, verdict) of the mean paired difference A - B (t interval, 95%).

  The pre-registered rule (experiments/README.md): 'reproduced' when the whole
  interval has the paper's sign, 'reversed' when it has the other, 'no effect
  of interest' when it lies inside (-smallest_effect, +smallest_effect),
  'undecided' otherwise (and with fewer than 2 seeds).
  """
  n = diffs.size
  if n < 2:
    return float("nan"), float("nan"), "undecided (1 seed)"
  half = t_975(n - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(n)
  low, high = float(np.mean(diffs)) - half, float(np.mean(diffs)) + half
  if low * high > 0:
    verdict = "reproduced" if np.sign(low) == np.sign(paper_sign) else "reversed"
  elif -smallest_effect < low and high < smallest_effect:
    verdict = "no effect of interest"
  else:
    verdict = "undecided"
  return low, high, verdict
