"""Training the ablation suite: one `python -m coe_jax.main` process per (config, seed).

Every run gets the same recipe (data, tokenizer, steps, batch, sequence length,
evaluation subset, seeds), written to `<runs_dir>/recipe.json` and checked on
every restart; the configs differ only in the model fields the paper varies. A
run whose workdir holds the final checkpoint is skipped, an unfinished one
resumes from its latest checkpoint, and a lock file keeps two runners sharing
`--runs_dir` off the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import ml_collections

from coe_jax import config_lib

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
    """`--config.*` overrides implementing the recipe (the tokenised data cache shared by all
    runs)."""
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


def core_groups(count: int, cpus: Optional[Sequence[int]] = None) -> list[set[int]]:
  """This process's CPUs dealt into `count` disjoint, near-equal groups (one per concurrent run)."""
  cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
  if count > len(cpus):
    raise ValueError(f"{count} concurrent runs need as many CPUs; this process has {len(cpus)}")
  return [set(cpus[i::count]) for i in range(count)]


def run_suite(
  names: Sequence[str],
  seeds: int,
  recipe: Recipe,
  runs_dir: Path,
  log=print,
  first_seed: int = 0,
  concurrent: bool = False,
) -> list[Path]:
  """Trains every (config, seed) not yet finished; returns the workdirs.

  Seeds first_seed .. seeds-1; seed s of every config runs before seed s+1 of
  any, so a partial suite already has a whole table. With `concurrent`, the
  unfinished configs of a seed train at once (at most one per CPU; more go in
  turns), each process pinned to its own share of this process's CPUs
  (`core_groups`), and the next seed starts when all of them are done: on a 2-core CPU two single-core runs of `narrow` make
  about 1.4x the progress of one two-core run after the other (experiments/README.md).
  """
  cache_dir = runs_dir / "data_cache"
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(runs_dir / "jax_cache"))  # seeds share programs
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
  workdirs = []
  for seed in range(first_seed, seeds):
    todo = []
    for name in names:
      workdir = run_dir(runs_dir, name, seed)
      workdirs.append(workdir)
      if is_finished(workdir):
        log(f"[skip] {name} seed {seed}: finished in {workdir}")
      else:
        todo.append((name, workdir))
    width = len(os.sched_getaffinity(0)) if concurrent else 1  # at most one run a CPU
    for start in range(0, len(todo), width):
      _train_together(todo[start : start + width], seed, recipe, cache_dir, env, log)
  return workdirs


POLL_SECONDS = 1.0


def _train_together(runs, seed: int, recipe: Recipe, cache_dir: Path, env, log) -> None:
  """Trains `runs` [(config name, workdir)] of one seed at once (pinned apart when > 1).

  Each run's end (or failure) is logged as it happens; after a failure the others
  go on to their end (their runs stay valid) and then this raises. If the runner
  itself stops (an exception, Ctrl-C), every run it started is killed before its
  lock is released, so no trainer outlives the lock that guards its workdir.
  """
  groups = core_groups(len(runs)) if len(runs) > 1 else [None]
  failed = []
  with contextlib.ExitStack() as stack:
    running = []
    for (name, workdir), cpus in zip(runs, groups):
      command = train_command(name, seed, recipe, workdir, cache_dir)
      where = f" on CPUs {sorted(cpus)}" if cpus else ""
      log(f"[run ] {name} seed {seed}{where}: {' '.join(command)}")
      workdir.mkdir(parents=True, exist_ok=True)
      stack.enter_context(run_lock(workdir))
      out = stack.enter_context(open(workdir / "train.log", "a"))
      process = subprocess.Popen(
        command, cwd=os.getcwd(), env=env, stdout=out, stderr=subprocess.STDOUT
      )
      stack.callback(_stop, process)  # runs before the lock above is released
      # pinned from here (no preexec_fn: forking a threaded process); the run reads its CPUs
      # (JAX's threads, `host_devices.usable_cores`) after its re-exec and imports, seconds later
      if cpus:
        os.sched_setaffinity(process.pid, cpus)
      running.append((name, workdir, process, time.perf_counter()))
    while running:
      for run in [r for r in running if r[2].poll() is not None]:
        running.remove(run)
        name, workdir, process, start = run
        if process.returncode != 0:
          failed.append(
            f"{name} seed {seed} (exit {process.returncode}; see {workdir / 'train.log'})"
          )
          log(f"[fail] {failed[-1]}")
        else:
          log(f"[done] {name} seed {seed} in {time.perf_counter() - start:.0f} s")
      if running:
        time.sleep(POLL_SECONDS)
  if failed:
    raise RuntimeError(f"failed: {'; '.join(failed)}")


def _stop(process: subprocess.Popen) -> None:
  """Kills `process` if it is still running, and reaps it."""
  if process.poll() is None:
    process.kill()
  process.wait()
