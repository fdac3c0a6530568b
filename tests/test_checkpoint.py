"""Tests for coe_jax.training.checkpoint and resumption: exact resume, refusals, the NaN stop.

Uses the shrunk config of `run_helpers` and the compilation settings of `fast_compilation`.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from run_helpers import (
  STEPS,
  abstract_state,
  max_abs_diff,
  metric_rows,
  small_config,
  tensorboard_scalars,
)

from coe_jax.data import input_pipeline
from coe_jax.inference.run_dir import load_run
from coe_jax.nn import model_config
from coe_jax.nn.model_config import EXECUTION, FIELD_KINDS, FUNCTION, ConfigError, ModelConfig
from coe_jax.training import train
from coe_jax.training.checkpoint import (
  FUNCTION_MODEL_FIELDS,
  Checkpointer,
  check_resumable,
  restore_params,
)
from coe_jax.training.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_compilation")]  # training runs


def checkpoint_steps(workdir: Path) -> list[int]:
  checkpointer = Checkpointer(str(workdir))
  try:
    return list(checkpointer.manager.all_steps())
  finally:
    checkpointer.close()


def test_resume_gives_the_metrics_and_params_of_an_uninterrupted_run(reference_run, tmp_path):
  first = train.train_and_evaluate(small_config(), str(tmp_path), stop_at_step=13, progress=False)
  assert first["interrupted_at"] == 13 and not first["completed"]
  assert checkpoint_steps(tmp_path) == [10, 13]  # the interruption saved off the 5-step schedule
  second = train.train_and_evaluate(small_config(), str(tmp_path), progress=False)
  assert second["completed"] and second["step"] == STEPS

  assert [row["step"] for row in read_metrics(str(tmp_path))] == list(range(1, STEPS + 1))
  expected, resumed = metric_rows(reference_run), metric_rows(tmp_path)
  assert all(resumed[step].keys() == expected[step].keys() for step in expected)
  diff = max(abs(resumed[s][k] - expected[s][k]) for s in expected for k in expected[s])
  assert diff == 0.0, f"metrics differ by up to {diff}"
  abstract = abstract_state(small_config()).params
  params_diff = max_abs_diff(
    restore_params(str(tmp_path), abstract)[0], restore_params(str(reference_run), abstract)[0]
  )
  assert params_diff == 0.0, f"final params differ by up to {params_diff}"


def test_checkpoint_holds_state_and_iterator_position_and_keeps_the_last_two(reference_run):
  assert checkpoint_steps(reference_run) == [25, STEPS]
  config = small_config()
  checkpointer = Checkpointer(str(reference_run))
  try:
    state, data_state, step = checkpointer.restore(abstract_state(config))
  finally:
    checkpointer.close()
  rows_seen = STEPS * config.train.batch_size  # 240 of the 400 training rows: still epoch 0
  assert step == STEPS and data_state == {"epoch": rows_seen // 400, "index": rows_seen % 400}
  assert int(state.step) == STEPS and int(state.opt_state[1][0].count) == STEPS
  params, params_step = restore_params(str(reference_run), abstract_state(config).params)
  assert params_step == STEPS and max_abs_diff(params, state.params) == 0.0


def snapshot(workdir: Path) -> tuple[str, list[int], str]:
  return (
    (workdir / "config.json").read_text(),
    checkpoint_steps(workdir),
    (workdir / "metrics.jsonl").read_text(),
  )


@pytest.mark.parametrize(
  "dotted, value, message",
  [
    ("model.hidden_size", 48, "model.hidden_size: saved 32, requested 48"),
    ("model.num_iterations", 1, "model.num_iterations: saved 2, requested 1"),
    ("model.num_experts_per_tok", 3, "model.num_experts_per_tok: saved 2, requested 3"),
    # Same shapes, another function: the rope base and the routed scaling.
    ("model.rope_theta", 500000.0, "model.rope_theta: saved 10000.0, requested 500000.0"),
    ("model.routed_scaling_factor", 2.0, "model.routed_scaling_factor: saved 1.0, requested 2.0"),
  ],
)
def test_workdir_of_another_model_refuses_to_resume(
  reference_run, tmp_path, dotted, value, message
):
  workdir = Path(shutil.copytree(reference_run, tmp_path / "run"))
  before = snapshot(workdir)
  with pytest.raises(ConfigError, match="refusing to resume") as error:
    train.train_and_evaluate(
      small_config(**{dotted.replace(".", "__"): value}), str(workdir), progress=False
    )
  assert message in str(error.value)
  assert snapshot(workdir) == before


def test_execution_fields_may_change_on_resume(reference_run, tmp_path):
  workdir = Path(shutil.copytree(reference_run, tmp_path / "run"))
  dispatch = {"capacity": "dropless", "dropless": "capacity"}[small_config().model.dispatch]
  summary = train.train_and_evaluate(
    small_config(
      model__dispatch=dispatch,
      model__dtype="bfloat16",
      model__remat="full",
      model__attention_query_block=0,
    ),
    str(workdir),
    progress=False,
  )
  assert summary["step"] == STEPS and summary["completed"]
  saved = json.loads((workdir / "config.json").read_text())["model"]
  assert (saved["dispatch"], saved["dtype"], saved["remat"]) == (dispatch, "bfloat16", "full")


def test_a_run_saved_before_the_new_defaults_resumes_with_its_layout_and_optimizer(
  tmp_path, capsys
):
  # A run saved before `scan_layers`, the fused optimizer default and the reference's training
  # semantics: stacked params, the optax chain, masked pads, norm scales undecayed, unstripped
  # texts, none of those fields in its config.json.
  workdir = tmp_path / "run"
  then = {
    ("model", "scan_layers"): True,
    ("train", "fused_optimizer"): False,
    ("model", "pad_semantics"): "masked",
    ("train", "decay_norm_scales"): False,
    ("data", "strip_text"): False,
  }
  older = small_config(**{f"{section}__{field}": value for (section, field), value in then.items()})
  train.train_and_evaluate(older, str(workdir), progress=False, stop_at_step=10)
  path = workdir / "config.json"
  saved = json.loads(path.read_text())
  for section, field in then:
    del saved[section][field]
  path.write_text(json.dumps(saved))
  capsys.readouterr()
  summary = train.train_and_evaluate(small_config(), str(workdir), progress=False)  # new defaults
  assert summary["step"] == STEPS and summary["completed"]
  resumed = json.loads(path.read_text())
  out = capsys.readouterr().out
  for (section, field), value in then.items():
    assert resumed[section][field] == value
    assert f"{section}.{field}: resuming with the saved run's {value}" in out
  run = load_run(str(workdir), with_tokenizer=False)
  assert run.model_config.scan_layers and "layers" in run.params and "layers_0" not in run.params
  assert run.model_config.pad_semantics == "masked" and run.config.data.strip_text is False


@pytest.mark.parametrize("k,scaling,refused", [(1, 1.0, True), (2, 2.0, True), (2, 1.0, False)])
def test_a_run_whose_router_weights_the_reference_rule_changes_refuses_to_resume(
  k, scaling, refused
):
  # Saved before the router followed the reference (normalise only when K > 1, else scale):
  # with norm_topk_prob those runs computed normalise-then-scale.
  fields = dict(norm_topk_prob=True, num_experts_per_tok=k, routed_scaling_factor=scaling)
  current = {"model": ModelConfig().replace(**fields).to_dict()}
  older = {"model": {n: v for n, v in current["model"].items() if n != "pad_semantics"}}
  check_resumable(current, current)  # saved since the rule changed: resumes
  if refused:
    with pytest.raises(ConfigError, match="model.norm_topk_prob: the saved run"):
      check_resumable(older, current)
  else:
    check_resumable(older, current)


def test_every_model_config_field_is_classified():
  kinds = {f.name: f.metadata.get("kind") for f in model_config.flat_fields()}
  assert list(kinds) == list(ModelConfig().to_dict())  # the flat form, CoE fields included
  assert set(kinds.values()) <= set(FIELD_KINDS), kinds
  assert FUNCTION_MODEL_FIELDS == tuple(n for n, k in kinds.items() if k == FUNCTION)
  assert {
    "rope_theta",
    "rope_scaling",
    "rope_factor",
    "rms_norm_eps",
    "routed_scaling_factor",
    "initializer_range",
    "aux_loss_alpha",
    "hidden_size",
  } <= set(FUNCTION_MODEL_FIELDS)
  assert {n for n, k in kinds.items() if k == EXECUTION} == {
    "dispatch",
    "dropless_impl",
    "dropless_tile",
    "dropless_tile_sizes",
    "defer_weight_grads",
    "target_platform",
    "capacity_factor_train",
    "capacity_factor_eval",
    "min_capacity",
    "attention_query_block",
    "dtype",
    "remat",
    "scan_layers",  # the param layout: a resumed run keeps its saved one (train.py)
  }
  assert "pad_semantics" in FUNCTION_MODEL_FIELDS  # a resumed run keeps its saved one too


def test_vocabulary_changed_through_the_tokenizer_refuses_to_resume(reference_run, tmp_path):
  # model.vocab_size=0 in both configs, so only the checkpoint's shapes reveal the change.
  workdir = Path(shutil.copytree(reference_run, tmp_path / "run"))
  before = snapshot(workdir)
  with pytest.raises(ConfigError, match=r"refusing to resume") as error:
    train.train_and_evaluate(small_config(data__vocab_size=320), str(workdir), progress=False)
  assert "params['lm_head']['kernel']: saved (32, 300), requested (32, 320)" in str(
    error.value
  ) and "params['embed_tokens']['embedding']: saved (300, 32), requested (320, 32)" in str(
    error.value
  )
  assert snapshot(workdir) == before


def batches_with_hook(monkeypatch, at_batch: int, hook) -> None:
  """Calls `hook(batch)` on the `at_batch`-th training batch (1-based) and on every later one."""
  original = input_pipeline.TrainIterator.__next__
  served = []

  def next_batch(iterator):
    batch = original(iterator)
    served.append(1)
    return hook(batch) if len(served) >= at_batch else batch

  monkeypatch.setattr(input_pipeline.TrainIterator, "__next__", next_batch)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
  reference_run, tmp_path, monkeypatch
):
  def poison(batch):  # token ids past the vocabulary: the embedding gather returns NaN
    return {**batch, "input_ids": np.full_like(batch["input_ids"], 10_000)}

  batches_with_hook(monkeypatch, 8, poison)
  handler_before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(
    FloatingPointError,
    match=r"train/loss: nan at step 8 \(gradient norm nan\); stopping ; the last good "
    r"checkpoint \(step 5\) is intact",
  ):
    train.train_and_evaluate(small_config(), str(tmp_path), progress=False)
  assert signal.getsignal(signal.SIGTERM) is handler_before  # the run's stop handler is gone
  assert checkpoint_steps(tmp_path) == [5]
  params, _ = restore_params(str(tmp_path), abstract_state(small_config()).params)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
  rows = read_metrics(str(tmp_path))
  assert [row["step"] for row in rows] == list(range(1, 8))
  assert all(math.isfinite(v) for row in rows for v in row.values())

  # Resuming drops the rows the failed run logged after its checkpoint (6, 7) and rewrites them.
  monkeypatch.undo()
  train.train_and_evaluate(small_config(), str(tmp_path), stop_at_step=10, progress=False)
  assert [row["step"] for row in read_metrics(str(tmp_path))] == list(range(1, 11))
  expected = metric_rows(reference_run)
  assert metric_rows(tmp_path) == {step: expected[step] for step in range(1, 11)}
  assert [step for step, _ in tensorboard_scalars(tmp_path)["train/loss"]] == list(range(1, 11))


def test_a_field_missing_from_an_older_saved_config_counts_as_its_default():
  current = {"model": ModelConfig().to_dict()}
  older = {"model": {k: v for k, v in current["model"].items() if k != "rope_theta"}}
  check_resumable(older, current)
  with pytest.raises(ConfigError, match=r"model\.rope_theta: saved 10000\.0, requested 1000\.0"):
    check_resumable(older, {"model": {**current["model"], "rope_theta": 1000.0}})
