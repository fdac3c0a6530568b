"""Orbax checkpoints of the train state plus the data iterator position.

A checkpoint holds `state` (step, params, optimizer state) and `data` (the
iterator's JSON state), so resuming reproduces the uninterrupted run exactly.
The run's config is written beside it as `config.json`; a workdir whose saved
model differs from the requested one in any function field (field metadata,
see `field_kinds`; compared by the flat `config.model` names) refuses to resume; execution fields (dispatch,
capacity, dtype, remat, ...) may change.

Damage (`restore_newest`): resuming takes the newest checkpoint that restores; each
newer one that does not (a truncated file, a deleted `_METADATA`, ...) is named in
one warning line and moved to `<workdir>/damaged_checkpoints/` (never deleted).
A save that fails (a full or read-only disk) removes its partial directory and
raises a one-line `StorageError` naming the last complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from coe_jax import storage
from coe_jax.errors import CheckpointError
from coe_jax.nn.model_config import FUNCTION, ConfigError, ModelConfig, fields_of_kind
from coe_jax.training.checkpoint_faults import (
  bytes_to_write,
  close_quietly,
  describe_damage,
  intact_note,
  move_aside,
  quiet_background_failures,
  remove_partial_saves,
)

CONFIG_FILE = "config.json"
# Fields that change the parameters or the function the layers compute (derived from the
# field metadata of ModelConfig and its CoEConfig); execution choices (dispatch, capacity, dtype,
# remat) may change.
FUNCTION_MODEL_FIELDS = fields_of_kind(FUNCTION)
# What a saved config lacking a field (written before it existed) counts it as, by flat name.
_DEFAULTS = ModelConfig().to_dict()


class Checkpointer:
  """Save/restore `(state, data_state)` under `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # a save killed midway leaves a tmp directory: removed
    )
    self._pending: tuple[int, int] = (0, 0)  # (step, bytes) of the latest save
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, force: bool = True) -> None:
    """Starts saving `step` (async); raises StorageError when this or the previous save failed.

    In one process, a save that cannot fit in the free space is refused before anything is
    written (with several, each would decide alone and the others would wait for it in Orbax).
    """
    try:
      self.manager.wait_until_finished()  # as Orbax's save does; a failure is the previous step's
    except Exception as error:
      self._raise_save_failure(error)
    self._pending = (step, bytes_to_write(state))
    free = storage.free_bytes(self.directory)
    if jax.process_count() == 1 and free is not None and free < self._pending[1]:
      self._raise_save_failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.directory))
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
        force=force,
      )
    except Exception as error:
      self._raise_save_failure(error)

  def _raise_save_failure(self, error: Exception) -> None:
    remove_partial_saves(self.directory)
    step, needed = self._pending
    failure = storage.storage_error(
      error, f"checkpoint step {step}", self.directory, needed or None, intact_note(self.directory)
    )
    if failure is None:
      raise error
    raise failure from error

  def restore_newest(
    self, abstract_state: Any, note: Callable[[str], None] = print
  ) -> Optional[tuple[Any, dict, int]]:
    """`restore` of the newest checkpoint that restores, None when there is none.

    Each newer one that fails is named in one `note` line and moved aside;
    CheckpointError (one line, nothing moved) when none restores.
    """
    failures: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        with quiet_background_failures():
          restored = self.restore(abstract_state, step)
      except ConfigError:
        raise
      except Exception as error:  # noqa: BLE001 (any failure to read it is damage)
        failures.append((step, describe_damage(self.directory, step, error)))
        continue
      for bad, what in failures:
        note(
          f"warning: checkpoint step {bad} is damaged ({what}); moved to "
          f"{move_aside(self.directory, bad)}; resuming from step {step}"
        )
      if failures:
        self.manager.reload()
      return restored
    if failures:
      raise CheckpointError(
        f"{self.directory}: no checkpoint restores ("
        + "; ".join(f"step {s}: {w}" for s, w in failures)
        + ") ; nothing was moved or deleted: move them away to start afresh, or use another "
        "--workdir"
      )
    return None

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict, int]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    mismatches = self.param_shape_mismatches(step, abstract_state.params)
    if mismatches:
      raise ConfigError(
        f"the checkpoint at step {step} under {self.directory} holds params of other shapes than "
        "the requested model (model.vocab_size, or the tokenizer's vocabulary when it is 0, or "
        "another structural field differs); refusing to resume (use a new --workdir): "
        + "; ".join(mismatches)
      )
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_with_default_sharding(abstract_state)),
        data=ocp.args.JsonRestore(),
      ),
    )
    return restored["state"], dict(restored["data"]), step

  def param_shape_mismatches(self, step: int, abstract_params: Any) -> list[str]:
    """'params<path>: saved <shape>, requested <shape>' for each param whose shapes differ."""
    saved = _shapes(self.manager.item_metadata(step)["state"]["params"])
    requested = _shapes(abstract_params)
    return [
      f"params{path}: saved {saved.get(path)}, requested {requested.get(path)}"
      for path in sorted(saved.keys() | requested.keys())
      if saved.get(path) != requested.get(path)
    ]

  def close(self) -> None:
    """Waits for the last save (StorageError when it failed) and closes the manager."""
    try:
      self.manager.wait_until_finished()
    except Exception as error:
      try:
        self._raise_save_failure(error)
      finally:
        close_quietly(self.manager)
    self.manager.close()


def _with_default_sharding(abstract: Any) -> Any:
  """`abstract` as ShapeDtypeStructs; leaves without a sharding go to the first local device.

  Without a target sharding Orbax would use the one saved in the checkpoint,
  which names the devices of the machine that trained (e.g. a GPU).
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(
      leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None) or device
    ),
    abstract,
  )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Array (or array metadata) shapes of a pytree, by key path."""
  return {
    jax.tree_util.keystr(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def restore_params(
  workdir_or_dir: str, abstract_params: Any, step: Optional[int] = None
) -> tuple[Any, int]:
  """Only the params of a run's checkpoint (for analysis, generation, export).

  Without `step`, the newest checkpoint that restores: each newer, damaged one is named in a
  warning line on stderr and left in place (readers change nothing). CheckpointError when
  none (or the given `step`) restores.
  """
  directory = workdir_or_dir
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint path {workdir_or_dir!r} does not exist")
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(directory)
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint under {directory!r}")
    if step is not None and step not in steps:
      raise ConfigError(
        f"--step: got {step}; no such checkpoint under {directory} ; one of "
        + ", ".join(map(str, sorted(steps)))
      )
    steps = steps if step is None else [step]
    target = {"params": _with_default_sharding(abstract_params)}
    args = ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        partial_restore=True,
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      )
    )
    failures = []
    for candidate in steps:
      try:
        with quiet_background_failures():
          params = manager.restore(candidate, args=args)["state"]["params"]
      except Exception as error:  # noqa: BLE001 (any failure to read it is damage)
        failures.append((candidate, describe_damage(directory, candidate, error)))
        continue
      for bad, what in failures:
        print(
          f"warning: checkpoint step {bad} is damaged ({what}); reading step {candidate} "
          "instead (the damaged one is left in place)",
          file=sys.stderr,
        )
      return params, candidate
    raise CheckpointError(
      f"{directory}: no checkpoint restores ("
      + "; ".join(f"step {s}: {w}" for s, w in failures)
      + ") ; a step that restores, or another run"
    )
  finally:
    manager.close()


def save_run_config(workdir: str, config_dict: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  text = json.dumps(config_dict, indent=2, sort_keys=True, default=str)
  storage.write_text_atomic(os.path.join(workdir, CONFIG_FILE), text)  # never half a config


def load_run_config(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# Fields whose saved value wins on resume (a run goes on as it was trained and laid out), each
# with the value a run saved before the field existed had. README "Runs saved before" lists them.
KEPT_ON_RESUME = {
  ("model", "scan_layers"): True,  # params stacked on a [layers] axis
  ("model", "pad_semantics"): "masked",  # pads took no expert capacity, got no routed output
  ("train", "fused_optimizer"): False,  # the optax chain
  ("train", "decay_norm_scales"): False,  # no weight decay on RMSNorm scales
  ("data", "strip_text"): False,  # texts not stripped
}


def saved_value(saved: dict, section: str, field: str) -> Any:
  """`section.field` of a saved run config, or what a run saved before the field had."""
  return saved.get(section, {}).get(field, KEPT_ON_RESUME[(section, field)])


def apply_saved_semantics(config: Any, saved: dict) -> None:
  """Sets every `KEPT_ON_RESUME` field of `config` to the saved run's value (for a run read back
  by evaluate, generate or export)."""
  for section, field in KEPT_ON_RESUME:
    if section in config:
      config[section][field] = saved_value(saved, section, field)


def keep_saved_layout_and_optimizer(
  config: Any, requested: dict, saved: dict, note: Optional[Callable[[str], None]] = None
) -> None:
  """On resume, the saved run's `KEPT_ON_RESUME` fields (param layout, optimizer, padding and
  text semantics) win over the requested ones, in `config` and `requested`.

  A field the saved config lacks was written before it existed and takes its value then.
  `note` (e.g. `print`) is told of each requested value that was overridden.
  """
  kept = {key: saved_value(saved, *key) for key in KEPT_ON_RESUME}
  for (section, field), value in kept.items():
    if requested[section].get(field) != value and note is not None:
      note(
        f"{section}.{field}: resuming with the saved run's {value} "
        f"(requested {requested[section].get(field)})"
      )
    config[section][field] = requested[section][field] = value


def check_resumable(saved: dict, requested: dict) -> None:
  """Raises ConfigError if a function field of the saved run's model differs from the request.

  Args:
    saved, requested: run configs as dicts ({'model': {...}, ...}). A field the
      saved config lacks (written before the field existed) counts as its default.
  """
  kept = {field for section, field in KEPT_ON_RESUME if section == "model"}
  diffs = [
    f"model.{k}: saved {a!r}, requested {b!r}"
    for k, a, b in (
      (k, _model_value(saved, k), _model_value(requested, k))
      for k in FUNCTION_MODEL_FIELDS
      if k not in kept
    )
    if a != b
  ]
  _check_router_weights_rule(saved)
  if diffs:
    raise ConfigError(
      "workdir holds a run of a different model (a field that changes the parameters or the "
      "function the model computes differs); refusing to resume (use a new --workdir): "
      + "; ".join(diffs)
    )


def _check_router_weights_rule(saved: dict) -> None:
  """Refuses a run saved before the router followed the reference's rule (K > 1 and
  norm_topk_prob: normalise, else scale) whose combine weights that rule changes."""
  model = saved["model"]
  if "pad_semantics" in model:  # saved since the rule changed
    return
  norm = model.get("norm_topk_prob", False)
  k = model.get("num_experts_per_tok", _DEFAULTS["num_experts_per_tok"])
  scaling = model.get("routed_scaling_factor", 1.0)
  if norm and (k == 1 or scaling != 1.0):
    raise ConfigError(
      f"model.norm_topk_prob: the saved run (norm_topk_prob=True, num_experts_per_tok={k}, "
      f"routed_scaling_factor={scaling}) trained with the old router weights (normalised, then "
      "scaled), which this version no longer computes; allowed: resume it with the version that "
      "saved it, or start a new --workdir"
    )


def _model_value(config: dict, name: str) -> Any:
  return config["model"].get(name, _DEFAULTS[name])
