"""The training loop (DESIGN.md 6): `train_and_evaluate(config, workdir)`, and config validation.

The steps it runs are in `coe_jax.training.train_step` (pure train and eval steps), the
optimiser in `coe_jax.training.optimizer`. The loop resumes from the workdir's latest
checkpoint, evaluates, logs (process 0), checkpoints and stops on SIGTERM/SIGINT
at a step every process agrees on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from coe_jax import config_lib, storage
from coe_jax.data.input_pipeline import build_datasets
from coe_jax.errors import ConfigError
from coe_jax.nn.flops import flops_per_token, peak_tflops_per_device
from coe_jax.nn.model import CoECausalLM
from coe_jax.nn.params import count_params, format_counts
from coe_jax.training import multihost, run_guard, sharding
from coe_jax.training.checkpoint import (
  Checkpointer,
  check_resumable,
  keep_saved_layout_and_optimizer,
  load_run_config,
  save_run_config,
)
from coe_jax.training.metrics import (
  MetricWriter,
  TrainLog,
  compiled_memory_bytes,
  device_peak_bytes,
  plot_losses,
)
from coe_jax.training.train_config import profile_window, validate_config
from coe_jax.training.train_step import (
  evaluate,
  evaluate_batch_means,
  init_train_state,
  make_eval_step,
  make_train_step,
)

# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves a checkpoint at the next step and exits.

  With several processes the flag is this process's request only: the loop
  stops where `multihost.StopVote` shows that some process asked, which every
  process sees at the same step.
  """

  def __init__(self):
    self.signal: Optional[int] = None
    self._previous = {}

  def install(self) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside a notebook worker)
        pass

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


@dataclasses.dataclass
class _Launched:
  """A train step dispatched to the device whose metrics the host has not read yet."""

  done: int  # steps completed once it has run
  metrics: Any  # device arrays
  vote: Any  # the processes' agreed stop request (device scalar), None in one process


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  stop_at_step: Optional[int] = None,
  progress: bool = True,
) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns a summary.

  `stop_at_step` simulates an interruption: the run checkpoints there and
  returns, as it does on SIGTERM/SIGINT.

  Several processes (`config.mesh`, `jax.distributed`): each builds only its
  rows of every batch; process 0 alone writes metrics, TensorBoard, W&B,
  summary.json, loss.png, config.json, the tokenizer copy and the progress
  bar, and every process writes its checkpoint shards. A SIGTERM/SIGINT that
  reaches any process stops all of them after the same step (`StopVote`),
  where they save the same checkpoint and return.

  The metrics of step N are fetched once step N+1 has been dispatched, so the
  host never waits on the device just to log; steps that evaluate or
  checkpoint wait for their own step, as they must.
  """

  validate_config(config)
  run_guard.check_workdir(workdir)
  if config.get("mesh") is not None:
    multihost.initialize_distributed(config.mesh)  # before anything asks for the process index
  with run_guard.held_workdir(workdir, lock=multihost.is_primary()):
    return _train(config, workdir, stop_at_step, progress)


def _train(
  config: ml_collections.ConfigDict, workdir: str, stop_at_step: Optional[int], progress: bool
) -> dict:
  """`train_and_evaluate` once the workdir is held."""
  primary = multihost.is_primary()
  requested = _config_dict(config)
  multihost.check_same_on_all_processes(
    json.dumps(
      {
        **requested,
        "mesh": {k: v for k, v in requested.get("mesh", {}).items() if k != "process_id"},
      },
      sort_keys=True,
    ),
    "the config",
  )
  saved = load_run_config(workdir)
  if saved is not None:
    check_resumable(saved, requested)
    keep_saved_layout_and_optimizer(config, requested, saved, note=print if primary else None)
  train_cfg = config.train

  # Process 0 reads, tokenises and caches the data first; the others then load that cache (or
  # build their own where the cache directory is not shared).
  layout = dict(reference_padding=config.model.get("pad_semantics", "reference") == "reference")
  if primary:
    datasets = build_datasets(config.data, workdir=workdir, seed=config.seed, **layout)
  multihost.barrier("coe_jax:data_cached")
  if not primary:
    datasets = build_datasets(
      config.data, workdir=workdir, seed=config.seed, save_tokenizer=False, **layout
    )
  model_config = config_lib.model_config_from(config, datasets.vocab_size)
  if datasets.vocab_size > model_config.vocab_size:
    raise ConfigError(
      f"model.vocab_size: got {model_config.vocab_size}, smaller than the "
      f"tokenizer's {datasets.vocab_size}; use >= {datasets.vocab_size} or 0 (= tokenizer's)"
    )
  if primary and progress:
    source = "from tokenizer" if config.model.vocab_size == 0 else "fixed"
    print(f"Model (vocab {source}: {model_config.vocab_size}):")
    print(format_counts(count_params(model_config)), flush=True)
  parallel = sharding.Parallelism.for_run(config, model_config)  # config.mesh; no mesh on 1 device
  model = CoECausalLM(model_config, expert_parallel=parallel.expert_parallel())

  state = parallel.init_state(
    lambda: init_train_state(model, train_cfg, config.seed, config.data.max_length)
  )
  checkpointer = Checkpointer(workdir, keep=train_cfg.keep_checkpoints)
  iterator = datasets.train_iterator(
    train_cfg.batch_size, config.seed, parallel.process_rows(train_cfg.batch_size)
  )
  start = 0
  try:
    restored = checkpointer.restore_newest(state, note=_stderr if primary else lambda line: None)
  except Exception:
    checkpointer.close()
    raise
  if restored is not None:
    state, data_state, start = restored
    iterator.set_state(data_state)
    if primary:
      print(f"Resumed from {checkpointer.directory} at step {start}.")
  if primary:
    save_run_config(workdir, requested)  # only once the workdir's checkpoint fits this config

  step_fn = parallel.jit_train_step(
    make_train_step(model, train_cfg.grad_accum_steps, train_cfg.log_routing_stats), state
  )
  eval_step = parallel.jit_eval_step(make_eval_step(model))
  val_batches = datasets.val_batches(train_cfg.eval_batch_size)
  if train_cfg.max_eval_batches:
    val_batches = val_batches[: train_cfg.max_eval_batches]
  paper_val_batches = (
    datasets.reference_val_batches(train_cfg.paper_val_batch_size, train_cfg.paper_val_batches)
    if train_cfg.paper_val
    else []
  )
  base_rng = jax.random.key(config.seed + 1)

  counts = count_params(model_config)
  tokens_per_step = train_cfg.batch_size * config.data.max_length
  flops = flops_per_token(model_config, config.data.max_length)
  peak = peak_tflops_per_device(
    train_cfg.get("peak_tflops_per_device", -1.0), jax.devices()[0].device_kind, model_config.dtype
  )
  summary: dict[str, Any] = dict(
    params_total=counts.total,
    params_active=counts.active_per_token,
    params_non_embedding=counts.non_embedding,
    vocab_size=model_config.vocab_size,
    train_flops_per_token=flops.train,
    peak_tflops_per_device=peak,
    processes=jax.process_count(),
    devices=jax.device_count(),
  )
  writer = (
    MetricWriter(
      workdir,
      resume_step=start,
      wandb_project=train_cfg.get("wandb_project", ""),
      wandb_config=requested,
    )
    if primary
    else None
  )
  stop = _StopFlag()
  stop.install()
  vote = parallel.stop_vote()  # None in one process: the local flag is the decision
  window = profile_window(train_cfg)
  trace_dir = os.path.join(
    workdir, "tensorboard", *(() if primary else (f"process_{jax.process_index()}",))
  )
  tracing = False
  last_checkpoint = start if start else None
  train_losses: list[float] = []
  val_loss = None
  log = None
  bar = None
  try:
    compiled = None
    end = (
      train_cfg.steps if stop_at_step is None else max(start, min(train_cfg.steps, stop_at_step))
    )
    bar = _progress(range(start, end), progress and primary, initial=start, total=train_cfg.steps)
    log = TrainLog(writer, bar, train_cfg, tokens_per_step, flops.train, jax.device_count(), peak)
    pending: Optional[_Launched] = None

    def fetch(launched: _Launched) -> tuple[dict, bool]:
      """The step's metrics on the host (checked finite) and whether a stop was agreed."""
      metrics = jax.device_get(launched.metrics)
      agreed = launched.vote is not None and bool(jax.device_get(launched.vote))
      loss = float(metrics["loss"])
      run_guard.check_finite(
        launched.done, loss, float(metrics["grad_norm"]), last_checkpoint, workdir
      )
      train_losses.append(loss)
      return metrics, agreed

    for step in bar:
      batch = parallel.global_batch(next(iterator), train_cfg.batch_size)
      rng = jax.random.fold_in(base_rng, step)
      if compiled is None:
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch, rng).compile()
        summary["compile_seconds"] = time.perf_counter() - t0
        summary["train_step_peak_bytes"] = compiled_memory_bytes(compiled)
        log.restart_clock()
      if window is not None and not tracing and window[0] <= step < window[1]:
        jax.profiler.start_trace(trace_dir)
        tracing = True
      state, metrics = compiled(state, batch, rng)
      done = step + 1
      launched = _Launched(
        done, metrics, None if vote is None else vote.cast(stop.signal is not None)
      )
      if tracing and done >= window[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False
        summary["profile_dir"] = trace_dir
      stop_agreed = False
      if pending is not None:  # the previous step has run by now; this one keeps the device busy
        previous_metrics, stop_agreed = fetch(pending)
        log.step(pending.done, previous_metrics)
        pending = None
      is_last = done == train_cfg.steps
      checkpoint_due = is_last or (
        train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0
      )
      eval_due = is_last or (train_cfg.eval_every and done % train_cfg.eval_every == 0)
      interrupted = (
        stop_agreed
        or (vote is None and stop.signal is not None)
        or (stop_at_step is not None and done >= stop_at_step)
      )
      if not (checkpoint_due or eval_due or interrupted):
        pending = launched
        continue
      # A boundary, the same on every process: wait for this step, evaluate, checkpoint.
      metrics, agreed_now = fetch(launched)
      interrupted = interrupted or agreed_now
      extra = {}
      if eval_due:
        val_loss = evaluate(eval_step, state.params, val_batches)
        extra["val/loss"] = val_loss
        if paper_val_batches:
          extra["val/loss_paper"] = evaluate_batch_means(eval_step, state.params, paper_val_batches)
          summary["final_val_loss_paper"] = extra["val/loss_paper"]
      log.step(done, metrics, force=True, extra=extra)
      if checkpoint_due or interrupted:
        checkpointer.save(done, state, iterator.get_state())
        last_checkpoint = done
      log.restart_clock()
      if interrupted:
        summary["interrupted_at"] = done
        break
  except BaseException:
    if isinstance(bar, tqdm):
      bar.close()  # the error's line goes below the bar, not onto it
    run_guard.close_all(writer, checkpointer, quiet=True)  # the loop's error is the one to report
    raise
  finally:
    if tracing:
      jax.profiler.stop_trace()
      summary["profile_dir"] = trace_dir
    stop.restore()
  run_guard.close_all(writer, checkpointer, quiet=False)

  final_step = int(jax.device_get(state.step))
  step_times = log.step_times if log is not None else []
  steady = step_times[1:] or step_times
  summary.update(
    step=final_step,
    first_train_loss=train_losses[0] if train_losses else None,
    last_train_loss=train_losses[-1] if train_losses else None,
    final_val_loss=val_loss,
    step_seconds_median=float(np.median(steady)) if steady else None,
    tokens_per_sec=float(tokens_per_step / np.median(steady)) if steady else None,
    completed=final_step >= train_cfg.steps,
    device_peak_bytes=device_peak_bytes(),
  )
  if steady:
    summary.update(
      {
        key.split("/")[-1]: value
        for key, value in log.throughput(float(np.median(steady))).items()
        if key in ("train/tflops_per_sec_per_device", "train/mfu")
      }
    )
  if not primary:
    return summary
  summary["loss_png"] = plot_losses(workdir, title=os.path.basename(os.path.abspath(workdir)))
  storage.write_text_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  if progress:
    print(
      f"\nRun directory: {os.path.abspath(workdir)}\n"
      f"  metrics:     {os.path.join(workdir, 'metrics.jsonl')}\n"
      f"  tensorboard: {os.path.join(workdir, 'tensorboard')}\n"
      f"  loss curve:  {summary['loss_png']}\n"
      f"  checkpoint:  {os.path.join(workdir, 'checkpoints')} (step {final_step})"
    )
  return summary


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _progress(iterable, enabled: bool, **kwargs):
  if not enabled:
    return iterable
  return tqdm(iterable, dynamic_ncols=True, **kwargs)
