"""The headline pair at equal training time (pre-registered with the second study, experiments/README.md).

    python -m experiments.equal_time --time --scale=narrow \
        --out=experiments/results/headline/study2/step_seconds.json
    python -m experiments.equal_time --runs_dir=runs/headline2/pair --seeds=20 --scale=narrow \
        --step_seconds=experiments/results/headline/study2/step_seconds.json \
        --results_dir=experiments/results/headline/study2/equal_time

`--time` measures each config's train step at the study's shape (`SHAPES[--scale]`; `narrow`: 16 x
256 tokens, vocab 5,620, dropless) round-robin in one process with a pause before each call
(`versus_reference --settle`), each on one device, as the studies' runs train (pinned one run a
CPU: `host_devices` splits nothing), so the ratio of the two is taken under one load; a run's own logged
step time moves with whatever else shared the machine. The report puts every run's validation
curve on a time axis, seconds = step x its config's median step time, and reads each seed's
paired difference CoE - MoE at two times: when the faster config ends (the slower one is then
mid-schedule, its learning rate not yet annealed: a reading that favours the faster config) and
when the slower one ends (each run's final loss, and the seconds each took). Writes `table.md`,
`equal_time.json` and `curves.png`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import ablation, bench

FLAGS = flags.FLAGS
PAIR = ("moe_k8", "coe_c2")  # B, A of the paired difference A - B
SHAPES = {  # the shape each study trains at: `narrow` (CPU), `paper` (experiments/gpu_main_pair.sh)
  "narrow": bench.SHAPES["narrow"],
  "paper": dict(scale="paper", batch=64, seq=512, model=dict(vocab_size=50280)),  # olmoe, untrimmed
}


def _define_flags() -> None:
  flags.DEFINE_bool("time", False, "Measure the two configs' step times and write --out.")
  flags.DEFINE_string("out", "", "--time: where the step times go (JSON).")
  flags.DEFINE_integer("timed_steps", 10, "--time: timed steps of each config.")
  flags.DEFINE_float("settle", 0.3, "--time: pause (s) before each timed call.")
  flags.DEFINE_string("step_seconds", "", "The JSON `--time` wrote.")
  shared = dict(  # also experiments.ablation's flags (defined there when it is imported first)
    scale=lambda: flags.DEFINE_enum("scale", "narrow", sorted(SHAPES), "The study's scale."),
    runs_dir=lambda: flags.DEFINE_string(
      "runs_dir", "", "The pair's runs (<dir>/<config>/seed<k>)."
    ),
    seeds=lambda: flags.DEFINE_integer("seeds", 20, "Seeds below this that finished are read."),
    results_dir=lambda: flags.DEFINE_string("results_dir", "", "Where the report goes."),
  )
  for name, define in shared.items():
    if name not in FLAGS:
      define()


def measure_step_seconds(steps: int, settle: float, scale: str = "narrow") -> dict[str, float]:
  """Median train-step seconds of each config of `PAIR` at the study's shape, round-robin."""
  shape = SHAPES[scale]
  programs = []
  for name in PAIR:
    config = bench.load_config(f"configs/{name}.py:{shape['scale']}")
    cfg = bench.bench_model_config(config, config.model.dispatch, shape["model"])
    step = bench.build_step_bench(name, config, cfg, shape["batch"], shape["seq"])
    step.allocate()
    programs.append(step)
  bench.run_round_robin([p.timed for p in programs], 2, steps, settle)
  return {p.label: statistics.median(p.timed.seconds) for p in programs}


def loss_at_step(steps: np.ndarray, losses: np.ndarray, step: float) -> float:
  """The validation loss at `step`, linear between evaluations (the last one past the end)."""
  return float(np.interp(step, steps, losses))


def readings(
  curves: dict[str, tuple[np.ndarray, np.ndarray]], seconds: dict[str, float]
) -> dict[str, dict[str, float]]:
  """One seed's two equal-time readings from each config's (steps, val loss) curve."""
  ends = {name: float(curves[name][0][-1]) * seconds[name] for name in PAIR}
  fast, slow = sorted(PAIR, key=lambda name: ends[name])
  at_fast_end = {name: loss_at_step(*curves[name], ends[fast] / seconds[name]) for name in PAIR}
  at_slow_end = {name: float(curves[name][1][-1]) for name in PAIR}
  b, a = PAIR
  return dict(
    faster=fast,
    fast_end_seconds=ends[fast],
    slow_end_seconds=ends[slow],
    diff_at_fast_end=at_fast_end[a] - at_fast_end[b],
    diff_at_slow_end=at_slow_end[a] - at_slow_end[b],
    **{f"{name}_at_fast_end": at_fast_end[name] for name in PAIR},
    **{f"{name}_at_slow_end": at_slow_end[name] for name in PAIR},
  )


def summarize(per_seed: dict[int, dict], key: str) -> dict:
  diffs = np.asarray([r[key] for r in per_seed.values()])
  low, high, verdict = ablation.paired_verdict(diffs, paper_sign=-1.0)
  return dict(mean=float(diffs.mean()), ci95=[low, high], verdict=verdict, n=int(diffs.size))


def report(
  runs_dir: Path, seeds: int, seconds: dict[str, float], results_dir: Path, scale: str = "narrow"
) -> dict:
  results = {name: ablation.collect(name, scale, runs_dir, seeds) for name in PAIR}
  missing = [name for name, r in results.items() if r is None]
  if missing:
    raise app.UsageError(f"--runs_dir {runs_dir}: no finished seed of {missing}")
  curves = {name: dict(zip(r.seeds, r.curves)) for name, r in results.items()}
  both = sorted(set(curves[PAIR[0]]) & set(curves[PAIR[1]]))
  per_seed = {s: readings({n: curves[n][s] for n in PAIR}, seconds) for s in both}
  out = dict(
    step_seconds=seconds,
    seeds=both,
    per_seed=per_seed,
    at_fast_end=summarize(per_seed, "diff_at_fast_end"),
    at_slow_end=summarize(per_seed, "diff_at_slow_end"),
  )
  results_dir.mkdir(parents=True, exist_ok=True)
  (results_dir / "equal_time.json").write_text(json.dumps(out, indent=1))
  (results_dir / "table.md").write_text(format_table(out))
  plot_curves(curves, seconds, both, results_dir / "curves.png")
  return out


def format_table(out: dict) -> str:
  b, a = PAIR
  lines = [
    f"Step seconds (side by side): {b} {out['step_seconds'][b]:.3f}, "
    f"{a} {out['step_seconds'][a]:.3f} (ratio {out['step_seconds'][a] / out['step_seconds'][b]:.3f}).",
    "",
    f"| seed | faster | its end s | {a} - {b} there | slower's end s | {a} - {b} at the ends |",
    "|---|---|---|---|---|---|",
  ]
  for seed, r in out["per_seed"].items():
    lines.append(
      f"| {seed} | {r['faster']} | {r['fast_end_seconds']:.0f} | {r['diff_at_fast_end']:+.4f} "
      f"| {r['slow_end_seconds']:.0f} | {r['diff_at_slow_end']:+.4f} |"
    )
  for key, label in (("at_fast_end", "the faster's end"), ("at_slow_end", "the slower's end")):
    s = out[key]
    lines.append(
      f"\nAt {label}: mean {s['mean']:+.4f}, 95% CI [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}] "
      f"over {s['n']} seeds: {s['verdict']} (paired_verdict, a secondary reading)."
    )
  return "\n".join(lines) + "\n"


def plot_curves(curves: dict, seconds: dict[str, float], seeds: list[int], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, color in zip(PAIR, ("tab:blue", "tab:red")):
    for i, seed in enumerate(seeds):
      steps, losses = curves[name][seed]
      ax.plot(
        steps * seconds[name],
        losses,
        color=color,
        alpha=0.35,
        lw=0.8,
        label=f"{name} ({seconds[name]:.3f} s/step)" if i == 0 else None,
      )
  ax.set_xlabel("training seconds (step x side-by-side step time)")
  ax.set_ylabel("pooled validation loss")
  ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv) -> None:
  del argv
  if FLAGS.scale not in SHAPES:
    raise app.UsageError(f"--scale: got {FLAGS.scale!r}; allowed: {', '.join(sorted(SHAPES))}")
  if FLAGS.time:
    if not FLAGS.out:
      raise app.UsageError("--time needs --out")
    seconds = measure_step_seconds(FLAGS.timed_steps, FLAGS.settle, FLAGS.scale)
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(seconds, indent=1))
    print(json.dumps(seconds))
    return
  if not (FLAGS.runs_dir and FLAGS.step_seconds and FLAGS.results_dir):
    raise app.UsageError("give --runs_dir, --step_seconds and --results_dir (or --time)")
  seconds = json.loads(Path(FLAGS.step_seconds).read_text())
  out = report(Path(FLAGS.runs_dir), FLAGS.seeds, seconds, Path(FLAGS.results_dir), FLAGS.scale)
  print(format_table(out))


if __name__ == "__main__":
  from coe_jax import host_memory

  host_memory.reexec_keeping_host_memory()
  _define_flags()
  app.run(main)
