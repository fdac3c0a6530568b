"""The training loop (DESIGN.md 6): `train_and_evaluate(config, workdir)`.

`_train` reads top to bottom: agree on the config (and on resuming the workdir's run),
build the data, the model and its state, resume, then run the steps and write the
summary. Each concern of the step loop is a small named piece in its own module:

* `train_step`, `optimizer`: the pure train and eval steps;
* `metric_pipeline.MetricPipeline`: each step's metrics are read one step late,
  checked finite, then logged (`metrics.TrainLog`);
* `stop.StopRequest`: SIGTERM/SIGINT, agreed on by every process at the same step;
* `profiling.ProfileWindow`: the profiler trace of `train.profile_steps`;
* `schedule.StepSchedule`: which steps evaluate, checkpoint or stop;
* `validation.Validation`: the validation numbers;
* `checkpoint.Checkpointer`: saves and resumes; `run_summary`: summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
from tqdm import tqdm

from coe_jax import config_lib
from coe_jax.data.input_pipeline import Datasets, TrainIterator, build_datasets, resolve_data_spec
from coe_jax.errors import ConfigError
from coe_jax.nn.flops import flops_per_token, peak_tflops_per_device
from coe_jax.nn.model import CoECausalLM
from coe_jax.nn.model_config import ModelConfig
from coe_jax.nn.params import count_params, format_counts
from coe_jax.training import multihost, run_guard, sharding
from coe_jax.training.checkpoint import (
  Checkpointer,
  check_resumable,
  keep_saved_layout_and_optimizer,
  load_run_config,
  save_run_config,
)
from coe_jax.training.metric_pipeline import LaunchedStep, MetricPipeline
from coe_jax.training.metrics import MetricWriter, TrainLog, compiled_memory_bytes
from coe_jax.training.profiling import ProfileWindow
from coe_jax.training.run_summary import finish_summary, start_summary, write_run_outputs
from coe_jax.training.schedule import StepSchedule
from coe_jax.training.stop import StopRequest
from coe_jax.training.train_config import profile_window, validate_config
from coe_jax.training.train_step import init_train_state, make_eval_step, make_train_step
from coe_jax.training.validation import Validation


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
  reaches any process stops all of them after the same step (`StopRequest`),
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
  requested = _agreed_config(config, workdir, primary)  # may keep fields of the saved run
  train_cfg, max_length = config.train, config.data.max_length
  datasets = _datasets(config, workdir, primary)
  model_config = _model_config(config, datasets.vocab_size, show=primary and progress)
  parallel = sharding.Parallelism.for_run(config, model_config)  # config.mesh; no mesh on 1 device
  model = CoECausalLM(model_config, expert_parallel=parallel.expert_parallel())
  state = parallel.init_state(lambda: init_train_state(model, train_cfg, config.seed, max_length))
  checkpointer = Checkpointer(workdir, keep=train_cfg.keep_checkpoints)
  iterator = datasets.train_iterator(
    train_cfg.batch_size, config.seed, parallel.process_rows(train_cfg.batch_size)
  )
  state, start = _resume(checkpointer, state, iterator, primary)
  if primary:
    save_run_config(workdir, requested)  # only once the workdir's checkpoint fits this config

  flops = flops_per_token(model_config, max_length)
  peak = peak_tflops_per_device(
    train_cfg.get("peak_tflops_per_device", -1.0), jax.devices()[0].device_kind, model_config.dtype
  )
  steps = _Steps(
    batch_size=train_cfg.batch_size,
    schedule=StepSchedule.of(train_cfg, stop_at_step),
    parallel=parallel,
    iterator=iterator,
    step_fn=parallel.jit_train_step(
      make_train_step(model, train_cfg.grad_accum_steps, train_cfg.log_routing_stats), state
    ),
    validation=Validation.for_run(
      parallel.jit_eval_step(make_eval_step(model)), datasets, train_cfg
    ),
    checkpointer=checkpointer,
    base_rng=jax.random.key(config.seed + 1),
    summary=start_summary(model_config, flops, peak),
  )
  writer = _metric_writer(workdir, start, train_cfg, requested) if primary else None
  tokens_per_step = train_cfg.batch_size * max_length
  profile = ProfileWindow(profile_window(train_cfg), workdir)
  log, bar = None, None
  with StopRequest(parallel.stop_vote()) as stop:
    try:
      end = steps.schedule.end(start)
      bar = _progress(range(start, end), progress and primary, initial=start, total=train_cfg.steps)
      log = TrainLog(writer, bar, train_cfg, tokens_per_step, flops.train, jax.device_count(), peak)
      pipeline = MetricPipeline(log, workdir, last_checkpoint=start if start else None)
      state, val_loss = _run_steps(steps, state, bar, pipeline, stop, profile)
    except BaseException:
      if isinstance(bar, tqdm):
        bar.close()  # the error's line goes below the bar, not onto it
      run_guard.close_all(writer, checkpointer, quiet=True)  # the loop's error is the one to report
      raise
    finally:
      profile.close()
  run_guard.close_all(writer, checkpointer, quiet=False)

  summary = steps.summary
  if profile.written:
    summary["profile_dir"] = profile.written
  finish_summary(
    summary,
    final_step=int(jax.device_get(state.step)),
    steps=train_cfg.steps,
    losses=pipeline.losses,
    val_loss=val_loss,
    log=log,
    tokens_per_step=tokens_per_step,
  )
  if primary:
    write_run_outputs(workdir, summary, progress)
  return summary


# --- setting up ----------------------------------------------------------------------------------


def _agreed_config(config: ml_collections.ConfigDict, workdir: str, primary: bool) -> dict:
  """The requested config as JSON, checked the same on every process and resumable in
  `workdir`; fields a resumed run keeps from its saved config are set in `config`."""
  requested = json.loads(config.to_json_best_effort())
  mesh = {k: v for k, v in requested.get("mesh", {}).items() if k != "process_id"}
  multihost.check_same_on_all_processes(
    json.dumps({**requested, "mesh": mesh}, sort_keys=True), "the config"
  )
  saved = load_run_config(workdir)
  if saved is not None:
    check_resumable(saved, requested)
    keep_saved_layout_and_optimizer(config, requested, saved, note=print if primary else None)
  return requested


def _datasets(config: ml_collections.ConfigDict, workdir: str, primary: bool) -> Datasets:
  """`config.data` resolved once; process 0 reads, tokenises and caches the data first, then
  the others load that cache (or build their own where the cache directory is not shared)."""
  spec = resolve_data_spec(config.data, workdir)
  reference_padding = config.model.get("pad_semantics", "reference") == "reference"
  if primary:
    datasets = build_datasets(spec, workdir=workdir, reference_padding=reference_padding)
  multihost.barrier("coe_jax:data_cached")
  if not primary:
    datasets = build_datasets(
      spec, workdir=workdir, save_tokenizer=False, reference_padding=reference_padding
    )
  return datasets


def _model_config(config: ml_collections.ConfigDict, vocab_size: int, show: bool) -> ModelConfig:
  """The model of `config` over the tokenizer's `vocab_size`; `show` prints its parameters."""
  model_config = config_lib.model_config_from(config, vocab_size)
  if vocab_size > model_config.vocab_size:
    raise ConfigError(
      f"model.vocab_size: got {model_config.vocab_size}, smaller than the "
      f"tokenizer's {vocab_size}; use >= {vocab_size} or 0 (= tokenizer's)"
    )
  if show:
    source = "from tokenizer" if config.model.vocab_size == 0 else "fixed"
    print(f"Model (vocab {source}: {model_config.vocab_size}):")
    print(format_counts(count_params(model_config)), flush=True)
  return model_config


def _metric_writer(
  workdir: str, start: int, train: ml_collections.ConfigDict, requested: dict
) -> MetricWriter:
  """Process 0's metrics.jsonl, TensorBoard and W&B writer, dropping rows after `start`."""
  return MetricWriter(
    workdir,
    resume_step=start,
    wandb_project=train.get("wandb_project", ""),
    wandb_config=requested,
  )


def _resume(
  checkpointer: Checkpointer, state: Any, iterator: TrainIterator, primary: bool
) -> tuple[Any, int]:
  """(state, first step): the newest checkpoint that restores, with the iterator's position,
  or the fresh `state` at step 0."""
  try:
    restored = checkpointer.restore_newest(state, note=_stderr if primary else lambda line: None)
  except Exception:
    checkpointer.close()
    raise
  if restored is None:
    return state, 0
  state, data_state, start = restored
  iterator.set_state(data_state)
  if primary:
    print(f"Resumed from {checkpointer.directory} at step {start}.")
  return state, start


# --- the steps -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Steps:
  """What the step loop uses, built once by `_train`."""

  batch_size: int
  schedule: StepSchedule
  parallel: sharding.Parallelism
  iterator: TrainIterator
  step_fn: Any  # the jitted train step (`Parallelism.jit_train_step`), compiled on first use
  validation: Validation
  checkpointer: Checkpointer
  base_rng: jax.Array
  summary: dict[str, Any]


def _run_steps(
  steps: _Steps,
  state: Any,
  bar: Any,
  pipeline: MetricPipeline,
  stop: StopRequest,
  profile: ProfileWindow,
) -> tuple[Any, Optional[float]]:
  """Runs the steps `bar` yields; returns (state, the last validation loss or None).

  Each step is dispatched before the previous one's metrics are read. At a
  boundary (an evaluation, a checkpoint or an agreed stop, the same on every
  process) the loop waits for its own step, evaluates, logs and saves.
  """
  compiled, val_loss = None, None
  for step in bar:
    batch = steps.parallel.global_batch(next(steps.iterator), steps.batch_size)
    rng = jax.random.fold_in(steps.base_rng, step)
    if compiled is None:
      compiled = _compile(steps.step_fn, state, batch, rng, steps.summary)
      pipeline.log.restart_clock()
    profile.before_step(step)
    state, metrics = compiled(state, batch, rng)
    launched = LaunchedStep(step + 1, metrics, stop.cast())
    profile.after_step(launched.done, state)
    stop_agreed = pipeline.read_deferred()  # the previous step has run by now
    done = launched.done
    evaluates, checkpoints = steps.schedule.evaluates(done), steps.schedule.checkpoints(done)
    interrupted = stop_agreed or stop.requested_here() or steps.schedule.interrupts(done)
    if not (evaluates or checkpoints or interrupted):
      pipeline.defer(launched)  # this step keeps the device busy while the host goes on
      continue
    metrics, agreed_now = pipeline.read(launched)
    interrupted = interrupted or agreed_now
    extra = steps.validation(state.params) if evaluates else {}
    if evaluates:
      val_loss = extra["val/loss"]
      if "val/loss_paper" in extra:
        steps.summary["final_val_loss_paper"] = extra["val/loss_paper"]
    pipeline.log.step(done, metrics, force=True, extra=extra)
    if checkpoints or interrupted:
      steps.checkpointer.save(done, state, steps.iterator.get_state())
      pipeline.checkpointed(done)
    pipeline.log.restart_clock()
    if interrupted:
      steps.summary["interrupted_at"] = done
      break
  return state, val_loss


def _compile(step_fn: Any, state: Any, batch: Any, rng: jax.Array, summary: dict) -> Any:
  """The train step compiled for these shapes; its compile time and peak memory go in `summary`."""
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  summary["compile_seconds"] = time.perf_counter() - start
  summary["train_step_peak_bytes"] = compiled_memory_bytes(compiled)
  return compiled


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _progress(iterable, enabled: bool, **kwargs):
  if not enabled:
    return iterable
  return tqdm(iterable, dynamic_ncols=True, **kwargs)
