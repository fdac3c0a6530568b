"""The paper's ablation suite: train a list of configs, tabulate and plot them beside the paper.

    python -m experiments.ablation --suite=paper --scale=tiny \
        --data=../shared/data/math_qa --tokenizer=../shared/data/tokenizer/olmoe/tokenizer.json \
        --seeds=2 --steps=200

Every run gets the same recipe (data, tokenizer, steps, batch, sequence length,
evaluation subset, seeds); the configs differ only in the model fields the
paper varies. Each (config, seed) trains in its own `python -m coe_jax.main`
process under `--runs_dir/<config>/seed<k>`, one after another. A run whose
workdir holds the final checkpoint is skipped; an unfinished one resumes from
its latest checkpoint, so the suite can be killed and restarted at will.

Results go to `--results_dir` (default `experiments/results/<scale>/`):
`table.md`, `table.csv` and one PNG per figure of the paper (`FIGURES`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import ml_collections
import numpy as np
from absl import app, flags

from coe_jax import config_lib
from coe_jax.nn.params import count_params

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"

SUITES: dict[str, tuple[str, ...]] = {
  "paper": (
    "moe_k8",
    "coe_c2",
    "coe_c2_k8",
    "moe_k16",
    "moe_k24",
    "coe_c2_n48",
    "moe_k8_n48",
    "moe_k8_l8",
    "moe_k8_l12",
    "coe_c2_k8_outer_residual",
    "coe_c2_k8_shared_gate",
    "dense_c1",
    "dense_c2",
  ),
  "main": ("moe_k8", "coe_c2"),
}

# The paper's figures: file stem -> (title, configs drawn).
FIGURES: dict[str, tuple[str, tuple[str, ...]]] = {
  "main": ("MoE(K=8) vs CoE(C=2,K=4)", ("moe_k8", "coe_c2")),
  "scaling": ("Wider top-K vs iteration", ("moe_k8", "moe_k16", "moe_k24", "coe_c2")),
  "layers": ("Deeper MoE vs iteration", ("moe_k8", "moe_k8_l8", "moe_k8_l12", "coe_c2")),
  "efficiency": ("Fewer experts: N=48 vs N=64", ("moe_k8", "moe_k8_n48", "coe_c2", "coe_c2_n48")),
  "ablation": (
    "Residual and gate ablations (C=2, K=8)",
    ("coe_c2_k8", "coe_c2_k8_outer_residual", "coe_c2_k8_shared_gate"),
  ),
  "dense": ("Dense-style layers (K=N)", ("dense_c1", "dense_c2")),
}

PAPER_MEMORY_SAVING_PERCENT = 17.6  # CoE(N=48) vs MoE(N=64) total parameters, paper section 4
MEMORY_PAIR = ("coe_c2_n48", "moe_k8")  # (smaller, reference)

_SUITE = flags.DEFINE_string(
  "suite", "paper", f"{', '.join(SUITES)} or a comma-separated list of config names."
)
_SCALE = flags.DEFINE_enum("scale", "tiny", list(config_lib.SCALES), "Config scale for every run.")
_DATA = flags.DEFINE_string(
  "data",
  "",
  "Directory with train.jsonl and validation.jsonl; '' = the "
  "config's default source (synthetic at tiny, MetaMathQA at paper scale).",
)
_TOKENIZER = flags.DEFINE_string(
  "tokenizer", "", "tokenizer.json path or hub name; '' = the config's."
)
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per config: 0 .. seeds-1.")
_FIRST_SEED = flags.DEFINE_integer(
  "first_seed",
  0,
  "Train only seeds first_seed .. seeds-1 (the table still reports every finished seed below "
  "--seeds): splits one suite's seeds between processes or machines sharing --runs_dir.",
)
_STEPS = flags.DEFINE_integer("steps", 0, "Optimizer steps per run; 0 = the config's.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Sequences per step; 0 = the config's.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 0, "Tokens per sequence; 0 = the config's.")
_PACKING = flags.DEFINE_bool("packing", False, "Pack several examples per row.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 0, "Validate every N steps; 0 = the config's.")
_EVAL_BATCHES = flags.DEFINE_integer(
  "eval_batches",
  0,
  "Validate on the first N batches (the same subset for every run); 0 = the whole validation set.",
)
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
  "eval_batch_size", 0, "Sequences per validation batch; 0 = the config's."
)
_OVERRIDES = flags.DEFINE_multi_string(
  "set",
  [],
  "Extra config override applied to every run, "
  "e.g. --set=train.lr=1e-3 (passed as --config.train.lr=1e-3).",
)
_RUNS_DIR = flags.DEFINE_string("runs_dir", "", "Run directories; '' = runs/ablation/<scale>.")
_RESULTS_DIR = flags.DEFINE_string(
  "results_dir", "", "Tables and figures; '' = experiments/results/<scale>."
)
_REPORT_ONLY = flags.DEFINE_bool(
  "report_only", False, "Only tabulate and plot the runs already there."
)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What every run of a suite shares. Zero / empty fields keep the config's value."""

  scale: str = "tiny"
  data_dir: str = ""
  tokenizer: str = ""
  steps: int = 0
  batch_size: int = 0
  max_length: int = 0
  packing: bool = False
  eval_every: int = 0
  eval_batches: int = 0
  eval_batch_size: int = 0
  overrides: tuple[str, ...] = ()

  def flags_for(self, cache_dir: str) -> list[str]:
    """`--config.*` overrides implementing the recipe (the tokenised data cache shared by all runs)."""
    out = [f"--config.data.cache_dir={cache_dir}", f"--config.data.packing={self.packing}"]
    if self.data_dir:
      out += [
        "--config.data.source=json",
        f"--config.data.train_files={os.path.join(self.data_dir, 'train.jsonl')}",
        f"--config.data.val_files={os.path.join(self.data_dir, 'validation.jsonl')}",
      ]
    if self.tokenizer:
      out.append(f"--config.data.tokenizer={self.tokenizer}")
    for field, value in (
      ("train.steps", self.steps),
      ("train.batch_size", self.batch_size),
      ("data.max_length", self.max_length),
      ("train.eval_every", self.eval_every),
      ("train.max_eval_batches", self.eval_batches),
      ("train.eval_batch_size", self.eval_batch_size),
    ):
      if value:
        out.append(f"--config.{field}={value}")
    out += [f"--config.{item}" for item in self.overrides]
    return out


RECIPE_FILE = "recipe.json"


def record_recipe(runs_dir: Path, recipe: Recipe) -> None:
  """Writes `runs_dir/recipe.json`, or checks the runs already there used the same recipe."""
  path = runs_dir / RECIPE_FILE
  wanted = json.loads(json.dumps(dataclasses.asdict(recipe)))
  if path.is_file():
    saved = json.loads(path.read_text())
    diffs = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if diffs:
      raise ValueError(
        f"{runs_dir} holds runs with another recipe (differs in {diffs}: saved "
        f"{ {k: saved.get(k) for k in diffs} }); use another --runs_dir"
      )
    return
  runs_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(wanted, indent=2) + "\n")


def load_recipe(runs_dir: Path) -> Optional[Recipe]:
  path = runs_dir / RECIPE_FILE
  if not path.is_file():
    return None
  values = json.loads(path.read_text())
  return Recipe(**{**values, "overrides": tuple(values["overrides"])})


def suite_configs(suite: str) -> tuple[str, ...]:
  """Config names of a named suite or of a comma-separated list; unknown names raise."""
  names = SUITES.get(suite) or tuple(n.strip() for n in suite.split(",") if n.strip())
  missing = [n for n in names if not (CONFIG_DIR / f"{n}.py").is_file()]
  if missing or not names:
    raise ValueError(
      f"--suite={suite!r}: unknown config(s) {missing}; named suites: {', '.join(SUITES)}"
    )
  return names


def load_config(name: str, scale: str) -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s `get_config(scale)`."""
  return config_lib.load_config_file(f"{CONFIG_DIR / name}.py:{scale}")


def run_dir(runs_dir: Path, name: str, seed: int) -> Path:
  return runs_dir / name / f"seed{seed}"


def is_finished(workdir: Path) -> bool:
  """True if the run's summary says completed and its final-step checkpoint exists."""
  summary = workdir / "summary.json"
  if not summary.is_file():
    return False
  with open(summary) as f:
    values = json.load(f)
  return bool(values.get("completed")) and (workdir / "checkpoints" / str(values["step"])).is_dir()


def train_command(
  name: str, seed: int, recipe: Recipe, workdir: Path, cache_dir: Path
) -> list[str]:
  """The `python -m coe_jax.main` command line of one run."""
  return [
    sys.executable,
    "-m",
    "coe_jax.main",
    f"--config={CONFIG_DIR / name}.py:{recipe.scale}",
    f"--workdir={workdir}",
    f"--config.seed={seed}",
    *recipe.flags_for(str(cache_dir)),
  ]


LOCK_FILE = "runner.lock"


def _lock_holder_alive(text: str) -> bool:
  """Whether the 'host pid' in a lock file names a live process of this host (other hosts: yes)."""
  host, _, pid = text.partition(" ")
  if host != socket.gethostname():
    return True
  try:
    os.kill(int(pid), 0)  # PermissionError: alive, another user's
  except (ValueError, ProcessLookupError):
    return False
  except PermissionError:
    pass
  return True


@contextlib.contextmanager
def run_lock(workdir: Path):
  """Holds `workdir/runner.lock` while one runner trains the run; a second runner is refused.

  A lock left by a process that is gone (a killed runner) is taken over.
  """
  path = workdir / LOCK_FILE
  mine = f"{socket.gethostname()} {os.getpid()}"
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      holder = path.read_text()
      if _lock_holder_alive(holder):
        raise RuntimeError(
          f"{workdir} is being trained by another runner ({LOCK_FILE}: host pid = {holder!r}); "
          "give runners sharing --runs_dir disjoint seeds (--first_seed / --seeds)"
        ) from None
      path.unlink(missing_ok=True)  # stale: its runner is gone
  with os.fdopen(fd, "w") as f:
    f.write(mine)
  try:
    yield
  finally:
    path.unlink(missing_ok=True)


def run_suite(
  names: Sequence[str],
  seeds: int,
  recipe: Recipe,
  runs_dir: Path,
  log=print,
  first_seed: int = 0,
) -> list[Path]:
  """Trains every (config, seed) not yet finished, sequentially; returns the workdirs.

  Seeds first_seed .. seeds-1; seed s of every config runs before seed s+1 of
  any, so a partial suite already has a whole table.
  """
  cache_dir = runs_dir / "data_cache"
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(runs_dir / "jax_cache"))  # seeds share programs
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
  workdirs = []
  for seed in range(first_seed, seeds):
    for name in names:
      workdir = run_dir(runs_dir, name, seed)
      workdirs.append(workdir)
      if is_finished(workdir):
        log(f"[skip] {name} seed {seed}: finished in {workdir}")
        continue
      command = train_command(name, seed, recipe, workdir, cache_dir)
      log(f"[run ] {name} seed {seed}: {' '.join(command)}")
      start = time.perf_counter()
      workdir.mkdir(parents=True, exist_ok=True)
      with run_lock(workdir), open(workdir / "train.log", "a") as out:
        result = subprocess.run(
          command, cwd=os.getcwd(), env=env, stdout=out, stderr=subprocess.STDOUT
        )
      if result.returncode != 0:
        raise RuntimeError(
          f"{name} seed {seed} failed (exit {result.returncode}); see {workdir / 'train.log'}"
        )
      log(f"[done] {name} seed {seed} in {time.perf_counter() - start:.0f} s")
  return workdirs


# ---------------------------------------------------------------------------
# Collecting results
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
  """One config's measurements over its finished seeds."""

  name: str
  paper_name: str
  c: int
  k: int
  n: int
  layers: int
  paper_val_loss: float
  seeds: list[int]
  val_losses: list[float]  # final validation loss per seed in `seeds`
  params_total: int
  params_active: int
  peak_bytes: Optional[int]
  step_seconds: float
  tokens_per_sec: float
  curves: list[tuple[np.ndarray, np.ndarray]]  # per seed: (steps, val loss)

  @property
  def val_mean(self) -> float:
    return float(np.mean(self.val_losses))

  @property
  def val_spread(self) -> float:
    """Sample standard deviation over seeds (0 with one seed)."""
    return float(np.std(self.val_losses, ddof=1)) if len(self.val_losses) > 1 else 0.0


def _val_curve(workdir: Path) -> tuple[np.ndarray, np.ndarray]:
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl") if line.strip()]
  points = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
  steps, losses = zip(*points) if points else ((), ())
  return np.asarray(steps), np.asarray(losses)


def collect(name: str, scale: str, runs_dir: Path, seeds: int) -> Optional[RunResult]:
  """The finished seeds of `name`, or None if none finished."""
  finished = [s for s in range(seeds) if is_finished(run_dir(runs_dir, name, s))]
  if not finished:
    return None
  done = [run_dir(runs_dir, name, s) for s in finished]
  summaries = [json.load(open(w / "summary.json")) for w in done]
  paper = load_config(name, scale).paper
  peaks = [s.get("device_peak_bytes") or s.get("train_step_peak_bytes") for s in summaries]
  return RunResult(
    name=name,
    paper_name=paper.name,
    c=paper.c,
    k=paper.k,
    n=paper.n,
    layers=paper.layers,
    paper_val_loss=paper.val_loss,
    seeds=finished,
    val_losses=[s["final_val_loss"] for s in summaries],
    params_total=summaries[0]["params_total"],
    params_active=summaries[0]["params_active"],
    peak_bytes=max(peaks) if all(p is not None for p in peaks) else None,
    step_seconds=float(np.median([s["step_seconds_median"] for s in summaries])),
    tokens_per_sec=float(np.median([s["tokens_per_sec"] for s in summaries])),
    curves=[_val_curve(w) for w in done],
  )


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------

BASELINE = "moe_k8"  # the paired differences are taken against this run
COLUMNS = (
  "config",
  "paper run",
  "C",
  "K",
  "N",
  "layers",
  "seeds",
  "val loss mean",
  "val loss sd",
  f"paired diff vs {BASELINE}",
  "paired diff sd",
  "paper val loss",
  f"paper diff vs {BASELINE}",
  "params total",
  "params active/token",
  "param MB fp32",
  "param MB bf16",
  "train step peak MB",
  "step s",
  "tokens/s",
)


def paired_differences(result: RunResult, baseline: RunResult) -> np.ndarray:
  """`result`'s final val loss minus `baseline`'s, per seed both finished.

  Runs with the same seed see the same batches in the same order, so the
  difference cancels the data-order noise the two share.
  """
  base = dict(zip(baseline.seeds, baseline.val_losses))
  return np.asarray(
    [loss - base[s] for s, loss in zip(result.seeds, result.val_losses) if s in base]
  )


def _mean_sd(values: np.ndarray) -> tuple[str, str]:
  if values.size == 0:
    return "n/a", "n/a"
  sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
  return f"{float(np.mean(values)):+.4f}", f"{sd:.4f}"


def table_rows(results: Sequence[RunResult]) -> list[list[str]]:
  baseline = next((r for r in results if r.name == BASELINE), None)
  rows = []
  for r in results:
    peak = f"{r.peak_bytes / 2**20:.1f}" if r.peak_bytes is not None else "n/a"
    paper = "" if math.isnan(r.paper_val_loss) else f"{r.paper_val_loss:.3f}"
    diff, diff_sd = _mean_sd(paired_differences(r, baseline) if baseline else np.zeros(0))
    paper_diff = (
      ""
      if math.isnan(r.paper_val_loss) or baseline is None
      else f"{r.paper_val_loss - baseline.paper_val_loss:+.3f}"
    )
    rows.append(
      [
        r.name,
        r.paper_name,
        str(r.c),
        str(r.k),
        str(r.n),
        str(r.layers),
        str(len(r.val_losses)),
        f"{r.val_mean:.4f}",
        f"{r.val_spread:.4f}",
        diff,
        diff_sd,
        paper,
        paper_diff,
        str(r.params_total),
        str(r.params_active),
        f"{4 * r.params_total / 2**20:.2f}",
        f"{2 * r.params_total / 2**20:.2f}",
        peak,
        f"{r.step_seconds:.3f}",
        f"{r.tokens_per_sec:.0f}",
      ]
    )
  return rows


def memory_saving_percent(smaller_params: int, reference_params: int) -> float:
  """How much smaller `smaller_params` is than `reference_params`, in percent."""
  return 100.0 * (1.0 - smaller_params / reference_params)


def paper_scale_memory_saving() -> float:
  """CoE(N=48) vs MoE(N=64) total-parameter saving at the paper's scale (analytic, vocab 102400)."""
  small, ref = (
    count_params(config_lib.model_config_from(load_config(n, "paper"))) for n in MEMORY_PAIR
  )
  return memory_saving_percent(small.total, ref.total)


def memory_lines(results: dict[str, RunResult]) -> list[str]:
  lines = [
    f"Parameter-memory saving of CoE(C=2,K=4,N=48) against MoE(K=8,N=64) (total parameters, "
    f"embeddings and head included; the paper: {PAPER_MEMORY_SAVING_PERCENT}%):",
    f"- paper scale, analytic count: {paper_scale_memory_saving():.1f}%",
  ]
  small, ref = (results.get(n) for n in MEMORY_PAIR)
  if small and ref:
    lines.append(
      f"- this table's scale: {memory_saving_percent(small.params_total, ref.params_total):.1f}% "
      f"({small.params_total:,} vs {ref.params_total:,} parameters)"
    )
  return lines


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

# Two-sided 95% critical values of Student's t by degrees of freedom (standard table).
_T_975 = {
  1: 12.706,
  2: 4.303,
  3: 3.182,
  4: 2.776,
  5: 2.571,
  6: 2.447,
  7: 2.365,
  8: 2.306,
  9: 2.262,
  10: 2.228,
}
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
  half = _T_975.get(n - 1, 1.96) * float(np.std(diffs, ddof=1)) / math.sqrt(n)
  low, high = float(np.mean(diffs)) - half, float(np.mean(diffs)) + half
  if low * high > 0:
    verdict = "reproduced" if np.sign(low) == np.sign(paper_sign) else "reversed"
  elif -smallest_effect < low and high < smallest_effect:
    verdict = "no effect of interest"
  else:
    verdict = "undecided"
  return low, high, verdict


def write_table(results: Sequence[RunResult], results_dir: Path, recipe_line: str) -> None:
  rows = table_rows(results)
  with open(results_dir / "table.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    writer.writerows(rows)
  lines = [
    f"Recipe: {recipe_line}",
    "",
    "| " + " | ".join(COLUMNS) + " |",
    "|" + "---|" * len(COLUMNS),
  ]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  lines += [""] + memory_lines({r.name: r for r in results})
  claims = claim_rows({r.name: r for r in results})
  if claims:
    lines += [
      "",
      "Validation-loss differences A - B behind the paper's claims (negative: A lower; "
      "ours paired by seed):",
      "",
      "| " + " | ".join(CLAIM_COLUMNS) + " |",
      "|" + "---|" * len(CLAIM_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in claims]
  (results_dir / "table.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _seed_curves(result: RunResult) -> tuple[np.ndarray, dict[int, np.ndarray]]:
  """(steps, {seed: val losses}) over the validation steps every seed of `result` reached."""
  length = min(len(steps) for steps, _ in result.curves)
  steps = result.curves[0][0][:length]
  return steps, {seed: losses[:length] for seed, (_, losses) in zip(result.seeds, result.curves)}


def paired_curve(result: RunResult, reference: RunResult) -> tuple[np.ndarray, np.ndarray]:
  """(steps, [seeds, steps] val-loss differences to `reference`) over seeds and steps both have."""
  steps, curves = _seed_curves(result)
  ref_steps, ref_curves = _seed_curves(reference)
  length = min(len(steps), len(ref_steps))
  seeds = [s for s in curves if s in ref_curves]
  diffs = np.stack([curves[s][:length] - ref_curves[s][:length] for s in seeds]) if seeds else None
  return steps[:length], diffs


def _band(ax, steps: np.ndarray, values: np.ndarray, label: str, **style) -> str:
  """Mean over the first axis, shaded between its min and max; returns the line's colour."""
  (line,) = ax.plot(steps, values.mean(0), label=label, **style)
  ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
  return line.get_color()


def _seed_lines(
  ax, steps: np.ndarray, values: np.ndarray, seeds: Sequence[int], color: str
) -> None:
  """One thin line per seed (row of `values`), its seed written at its last point."""
  for seed, row in zip(seeds, values):
    ax.plot(steps, row, color=color, linewidth=0.7, alpha=0.8, linestyle=":")
    ax.annotate(f"s{seed}", (steps[-1], row[-1]), fontsize=6, color=color)


def plot_figure(stem: str, title: str, results: Sequence[RunResult], results_dir: Path) -> Path:
  """Two panels against step: validation loss, and its paired difference to the first config.

  Each thick line is the mean over seeds, shaded between the seeds' min and max; the difference
  panel also draws every seed's own paired difference (dotted, labelled s<seed>).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (loss_ax, diff_ax) = plt.subplots(1, 2, figsize=(11, 4))
  reference = results[0]
  for r in results:
    steps, curves = _seed_curves(r)
    label = f"{r.paper_name}: {r.val_mean:.3f}" + (
      "" if math.isnan(r.paper_val_loss) else f" (paper {r.paper_val_loss:.3f})"
    )
    _band(loss_ax, steps, np.stack(list(curves.values())), label)
    diff_steps, diffs = paired_curve(r, reference)
    if diffs is not None:
      color = _band(diff_ax, diff_steps, diffs, r.paper_name)
      if r is not reference:
        paired_seeds = [s for s in r.seeds if s in reference.seeds]
        _seed_lines(diff_ax, diff_steps, diffs, paired_seeds, color)
  loss_ax.set(xlabel="step", ylabel="validation loss", title=title)
  loss_ax.legend(fontsize=8)
  diff_ax.axhline(0.0, color="black", linewidth=0.5)
  diff_ax.set(
    xlabel="step",
    ylabel=f"val loss minus {reference.paper_name}'s (same seed)",
    title=f"Paired difference to {reference.paper_name}",
  )
  diff_ax.legend(fontsize=8)
  fig.tight_layout()
  path = results_dir / f"{stem}.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_figures(results: dict[str, RunResult], results_dir: Path) -> list[Path]:
  """One PNG per figure of `FIGURES` with at least one finished config."""
  paths = []
  for stem, (title, names) in FIGURES.items():
    drawn = [results[n] for n in names if n in results]
    if drawn:
      paths.append(plot_figure(stem, title, drawn, results_dir))
  return paths


def report(
  names: Sequence[str], scale: str, seeds: int, runs_dir: Path, results_dir: Path, recipe_line: str
) -> list[RunResult]:
  """Writes table.md, table.csv and the figures from the finished runs; returns their results."""
  results = [r for r in (collect(n, scale, runs_dir, seeds) for n in names) if r is not None]
  results_dir.mkdir(parents=True, exist_ok=True)
  write_table(results, results_dir, recipe_line)
  write_figures({r.name: r for r in results}, results_dir)
  return results


def main(argv):
  del argv
  scale = _SCALE.value
  recipe = Recipe(
    scale=scale,
    data_dir=_DATA.value,
    tokenizer=_TOKENIZER.value,
    steps=_STEPS.value,
    batch_size=_BATCH.value,
    max_length=_MAX_LENGTH.value,
    packing=_PACKING.value,
    eval_every=_EVAL_EVERY.value,
    eval_batches=_EVAL_BATCHES.value,
    eval_batch_size=_EVAL_BATCH_SIZE.value,
    overrides=tuple(_OVERRIDES.value),
  )
  names = suite_configs(_SUITE.value)
  if not 0 <= _FIRST_SEED.value < _SEEDS.value:
    raise ValueError(f"--first_seed={_FIRST_SEED.value}: must be in [0, --seeds={_SEEDS.value})")
  runs_dir = Path(_RUNS_DIR.value or REPO / "runs" / "ablation" / scale).resolve()
  results_dir = Path(_RESULTS_DIR.value or REPO / "experiments" / "results" / scale).resolve()
  log = lambda message: print(time.strftime("%H:%M:%S"), message, flush=True)
  if _REPORT_ONLY.value:
    recipe = load_recipe(runs_dir) or recipe
  else:
    record_recipe(runs_dir, recipe)
    run_suite(names, _SEEDS.value, recipe, runs_dir, log, first_seed=_FIRST_SEED.value)
  recipe_line = " ".join(recipe.flags_for("<runs_dir>/data_cache")[1:]) or "the configs' defaults"
  results = report(
    names,
    scale,
    _SEEDS.value,
    runs_dir,
    results_dir,
    f"scale={scale}, seeds={_SEEDS.value}, {recipe_line}",
  )
  log(f"{len(results)} of {len(names)} configs finished; table and figures in {results_dir}")


if __name__ == "__main__":
  app.run(main)
