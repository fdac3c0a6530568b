"""Pre-registered studies of one claim read together: each on its own, then pooled (secondary).

    python -m experiments.pool_studies \
        --study="first (seeds 0-4)=experiments/results/headline/pair_5seeds/table.md" \
        --study="second (seeds 10-19)=experiments/results/headline/study2/pair/table.md" \
        --claim="coe_c2 - moe_k8" --out=experiments/results/headline/pooled

Each study's per-seed paired differences are read from the claims table its
`experiments.ablation` run wrote (the values it reported, to 4 decimals), so
the reading needs only committed files. Every study gets `paired_verdict` on
its own seeds; the pooled row applies the same statistic to all of them at
once (the second headline protocol's secondary reading: it never replaces a
study's own verdict). The studies must have disjoint seeds (the tables do not
say which seeds they hold, so this is not checked). Writes `table.md` and `pooled.json` under --out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import app, flags

from experiments.ablation_verdict import CLAIM_COLUMNS, paired_verdict

FLAGS = flags.FLAGS
POOLED = "pooled (secondary)"


def _define_flags() -> None:
  flags.DEFINE_multi_string(
    "study", [], "label=path of a study's ablation table.md; repeat once per study, in order."
  )
  flags.DEFINE_string("claim", "coe_c2 - moe_k8", "The claims table's 'A - B' cell to read.")
  flags.DEFINE_string("out", "", "Directory for table.md and pooled.json ('' = print only).")


def claim_row(table: Path, claim: str) -> dict[str, str]:
  """The claims-table row of `table` whose 'A - B' cell is `claim`, keyed by column name."""
  if not table.is_file():
    raise app.UsageError(f"--study: no file {table}")
  header = "| " + " | ".join(CLAIM_COLUMNS) + " |"
  lines = table.read_text().splitlines()
  if header not in lines:
    raise app.UsageError(f"--study: {table} has no claims table (written by experiments.ablation)")
  found = []
  for line in lines[lines.index(header) + 2 :]:
    if not line.startswith("|"):
      break
    cells = dict(zip(CLAIM_COLUMNS, (c.strip() for c in line.strip("|").split("|"))))
    if cells["A - B"] == claim:
      return cells
    found.append(cells["A - B"])
  raise app.UsageError(f"--claim: {table} has no row {claim!r}; it has {found}")


def _per_seed(cell: str, table: Path) -> np.ndarray:
  try:
    return np.asarray([float(d) for d in cell.split(" / ")])
  except ValueError:
    raise app.UsageError(
      f"--study: {table}: 'ours per seed' is {cell!r}; expected numbers joined by ' / '"
    ) from None


def reading(label: str, diffs: np.ndarray, paper: float) -> dict:
  """`paired_verdict` of one set of per-seed differences, with what the table reports."""
  low, high, verdict = paired_verdict(diffs, paper)
  return dict(
    reading=label,
    n=int(diffs.size),
    diffs=[float(d) for d in diffs],
    mean=float(np.mean(diffs)),
    sd=float(np.std(diffs, ddof=1)) if diffs.size > 1 else 0.0,
    ci95=[low, high],
    verdict=verdict,
    same_sign_seeds=int(np.sum(np.sign(diffs) == np.sign(paper))),
  )


def pool(studies: Sequence[tuple[str, Path]], claim: str) -> dict:
  """Each study's reading of `claim`, then all their seeds pooled."""
  if len(studies) < 2:
    raise app.UsageError(f"--study: need two or more studies to pool; got {len(studies)}")
  rows = [claim_row(path, claim) for _, path in studies]
  papers = {row["paper"] for row in rows}
  if len(papers) != 1:
    raise app.UsageError(f"--study: the tables disagree on the paper's difference: {papers}")
  paper = float(papers.pop())
  per_study = [_per_seed(row["ours per seed"], path) for row, (_, path) in zip(rows, studies)]
  readings = [reading(label, d, paper) for (label, _), d in zip(studies, per_study)]
  readings.append(reading(POOLED, np.concatenate(per_study), paper))
  return dict(claim=claim, paper=paper, readings=readings)


def format_table(out: dict) -> str:
  lines = [
    f"Claim {out['claim']} (paper: {out['paper']:+.3f}); per-seed paired differences as each study "
    "reported them; 95% t intervals; verdicts by the pre-registered rule (paired_verdict). Each "
    "study decides on its own; the pooled row is a secondary reading.",
    "",
    "| reading | seeds | mean | sd | 95% CI | seeds with the paper's sign | verdict |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in out["readings"]:
    lines.append(
      f"| {r['reading']} | {r['n']} | {r['mean']:+.4f} | {r['sd']:.4f} "
      f"| [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {r['same_sign_seeds']} of {r['n']} "
      f"| {r['verdict']} |"
    )
  return "\n".join(lines) + "\n"


def _parse_study(flag: str) -> tuple[str, Path]:
  label, sep, path = flag.partition("=")
  if not sep or not label or not path:
    raise app.UsageError(f"--study={flag!r}: expected label=path/to/table.md")
  return label, Path(path)


def main(argv) -> None:
  del argv
  out = pool([_parse_study(s) for s in FLAGS.study], FLAGS.claim)
  text = format_table(out)
  print(text)
  if FLAGS.out:
    out_dir = Path(FLAGS.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(text)
    (out_dir / "pooled.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
