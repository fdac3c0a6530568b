"""Validating a whole training config (`model`, `data`, `train`) before anything loads or
compiles: one `ConfigError` naming the first bad field and what is allowed."""

from __future__ import annotations

import math
from typing import Optional

import ml_collections

from coe_jax import config_lib
from coe_jax.data.input_pipeline import validate_data_config
from coe_jax.errors import ConfigError
from coe_jax.nn.model_config import ModelConfig
from coe_jax.training.optimizer import SCHEDULES


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"{field}: {message}")


def validate_train_config(train: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad `train.*` field."""
  for field in (
    "steps",
    "batch_size",
    "grad_accum_steps",
    "eval_batch_size",
    "log_every",
    "keep_checkpoints",
  ):
    value = train[field]
    _require(
      isinstance(value, int) and value >= 1,
      f"train.{field}",
      f"got {value!r}; must be an integer >= 1",
    )
  for field in ("paper_val_batches", "paper_val_batch_size"):
    value = train[field]
    _require(
      isinstance(value, int) and value >= 1,
      f"train.{field}",
      f"got {value!r}; must be an integer >= 1",
    )
  for field in ("paper_val", "fused_optimizer", "decay_norm_scales"):
    _require(
      isinstance(train.get(field, False), bool),
      f"train.{field}",
      f"got {train.get(field)!r}; allowed values: True, False",
    )
  for field in ("eval_every", "checkpoint_every", "max_eval_batches"):
    value = train[field]
    _require(
      isinstance(value, int) and value >= 0,
      f"train.{field}",
      f"got {value!r}; must be an integer >= 0",
    )
  _require(
    train.batch_size % train.grad_accum_steps == 0,
    "train.batch_size",
    f"got {train.batch_size}; must be divisible by train.grad_accum_steps={train.grad_accum_steps}",
  )
  _require(train.lr > 0 and math.isfinite(train.lr), "train.lr", f"got {train.lr!r}; must be > 0")
  _require(
    0 <= train.warmup_fraction < 1,
    "train.warmup_fraction",
    f"got {train.warmup_fraction!r}; must be in [0, 1)",
  )
  _require(
    train.schedule in SCHEDULES,
    "train.schedule",
    f"got {train.schedule!r}; allowed values: {', '.join(SCHEDULES)}",
  )
  for field in ("b1", "b2"):
    _require(0 <= train[field] < 1, f"train.{field}", f"got {train[field]!r}; must be in [0, 1)")
  _require(
    train.weight_decay >= 0, "train.weight_decay", f"got {train.weight_decay!r}; must be >= 0"
  )
  _require(train.grad_clip >= 0, "train.grad_clip", f"got {train.grad_clip!r}; must be >= 0")
  peak = train.get("peak_tflops_per_device", -1.0)
  _require(
    isinstance(peak, (int, float))
    and not isinstance(peak, bool)
    and math.isfinite(peak)
    and (peak >= 0 or peak == -1),
    "train.peak_tflops_per_device",
    f"got {peak!r}; must be -1 (the device kind's known peak), 0 (unknown) or > 0",
  )
  profile_window(train)  # raises ConfigError on a malformed window
  project = train.get("wandb_project", "")
  _require(
    isinstance(project, str),
    "train.wandb_project",
    f"got {project!r}; must be a project name or '' (off)",
  )


def profile_window(train: ml_collections.ConfigDict) -> Optional[tuple[int, int]]:
  """`train.profile_steps` 'START:STOP' as (START, STOP), or None when it is ''."""
  spec = train.get("profile_steps", "")
  message = (
    f"got {spec!r}; must be '' (off) or 'START:STOP' with 0 <= START < STOP <= "
    f"train.steps={train.steps} (traces the steps logged as START+1 .. STOP)"
  )
  _require(isinstance(spec, str), "train.profile_steps", message)
  if not spec.strip():
    return None
  parts = spec.split(":")
  _require(
    len(parts) == 2 and all(p.strip().isdigit() for p in parts), "train.profile_steps", message
  )
  start, stop = (int(p) for p in parts)
  _require(0 <= start < stop <= train.steps, "train.profile_steps", message)
  return start, stop


def sharded_batch_sizes(train: ml_collections.ConfigDict) -> dict[str, int]:
  """Every batch a mesh splits over its batch axes, by the field that sets it: the train
  step's micro-batch, the eval batch and, with `paper_val`, the reference's validation batch."""
  sizes = {
    "train.batch_size / grad_accum_steps": train.batch_size // train.grad_accum_steps,
    "train.eval_batch_size": train.eval_batch_size,
  }
  if train.get("paper_val", False):
    sizes["train.paper_val_batch_size"] = train.paper_val_batch_size
  return sizes


def validate_mesh_config(mesh: Optional[ml_collections.ConfigDict]) -> None:
  """Raises ConfigError for a bad `mesh.cpu_devices` (the mesh axes are checked with the devices)."""
  if mesh is None:
    return
  value = mesh.get("cpu_devices", 0)
  _require(
    isinstance(value, int) and not isinstance(value, bool) and value >= 0,
    "mesh.cpu_devices",
    f"got {value!r}; must be an integer >= 0 "
    "(0 = auto: split a CPU host where that trains faster, 1 = one device, n = n devices)",
  )


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """Validates model, data and train sections before anything loads or compiles."""
  for section in ("model", "data", "train"):
    _require(section in config, f"config.{section}", "missing section")
  _require(
    isinstance(config.get("seed", 0), int),
    "config.seed",
    f"got {config.get('seed')!r}; must be an integer",
  )
  model_config = config_lib.model_config_from(config)
  validate_data_config(config.data)
  validate_train_config(config.train)
  validate_mesh_config(config.get("mesh"))
  return model_config
