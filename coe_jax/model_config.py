"""The model's hyper-parameters as one frozen dataclass, with validation.

`ModelConfig` is what every Flax module in `coe_jax` takes. Field names follow
the authors' Hugging Face `config.json` where one exists (see `convert.py`).
Training configs (`configs/*.py`) hold the same fields under `config.model`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping, Optional

Dispatch = Literal["capacity", "dropless"]
DroplessImpl = Literal["auto", "gather", "ragged_dot", "blocked"]
ResidualStyle = Literal["reference", "textbook"]

DISPATCHES = ("capacity", "dropless")
DROPLESS_IMPLS = ("auto", "gather", "ragged_dot", "blocked")
RESIDUAL_STYLES = ("reference", "textbook")
DTYPES = ("float32", "bfloat16")
ROPE_SCALINGS = ("yarn", "none")
REMATS = ("none", "full", "dots")


class ConfigError(ValueError):
  """A bad configuration value; the message names the field and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V2-style causal LM whose feed-forward blocks are Chain-of-Experts layers.

  Defaults are the paper's MoE(K=8, N=64) baseline (SPEC sections 2-5).
  """

  # --- sizes ---
  vocab_size: int = 102400  # DeepSeek-V2 tokenizer
  hidden_size: int = 1024
  num_layers: int = 4
  num_heads: int = 8
  # --- multi-head latent attention (DeepSeek-V2) ---
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  rope_theta: float = 10000.0
  rope_scaling: str = "yarn"  # 'yarn' | 'none'
  rope_factor: float = 40.0
  rope_original_max_position: int = 4096
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_mscale: float = 0.707
  rope_mscale_all_dim: float = 0.707
  rms_norm_eps: float = 1e-6
  initializer_range: float = 0.02
  # --- experts ---
  n_routed_experts: int = 63  # the paper's N counts the shared expert: N=64 is 63 + 1
  n_shared_experts: int = 1
  num_experts_per_tok: int = 8  # K, routed experts per token per iteration
  moe_intermediate_size: int = 704
  # --- chain of experts ---
  num_iterations: int = 1  # C; C=1 is plain MoE
  independent_gates: bool = True  # one router per iteration (else one shared router)
  inner_residual: bool = True  # u_t = u_{t-1} + m_t (else u_t = m_t)
  outer_residual: bool = False  # out = h + u_C (else out = u_C; reference default)
  residual_style: str = "reference"  # 'reference' (SPEC 2) | 'textbook' (out = h + sum m_t)
  # --- router ---
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  aux_loss_alpha: float = 0.001
  router_z_loss_coef: float = 0.0
  # --- dispatch ---
  dispatch: str = "capacity"  # 'capacity' | 'dropless'
  dropless_impl: str = "auto"  # 'auto' (= 'blocked') | 'blocked' | 'gather' | 'ragged_dot'
  # Rows per tile of dropless_impl='blocked': each expert's rows are padded to a multiple of it
  # (at most tokens*K + N*(tile-1) rows run). Small: less padding; large: faster matmuls.
  # 0 = per backend and load (dispatch.default_dropless_tile: <= 64 on CPU, measured).
  dropless_tile: int = 0
  capacity_factor_train: float = 1.25
  capacity_factor_eval: float = 2.0
  min_capacity: int = 4
  # --- attention kernel ---
  # Queries per causal block in training/prefill self-attention: block i attends only to keys
  # 0 .. (its last query), skipping the all-masked keys after it (~(1 - (n+1)/2n) of the score
  # work with n blocks). 0 = one dense block (every query against every key).
  attention_query_block: int = 64
  # --- numerics and compilation ---
  dtype: str = "float32"  # compute dtype; params and router are always float32
  remat: str = "none"  # 'none' | 'full' | 'dots' (save matmul outputs)

  def __post_init__(self):
    validate(self)

  @property
  def q_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_router_weights(self) -> int:
    """Leading size of the stacked router weights: C with independent gates, else 1."""
    return self.num_iterations if self.independent_gates else 1

  @property
  def shared_intermediate_size(self) -> int:
    return self.moe_intermediate_size * self.n_shared_experts

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a dict or ConfigDict; unknown keys are an error."""
    values = dict(values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ConfigError(
          f"model config: unknown field(s) {unknown}; allowed fields: {sorted(names)}")
    return cls(**values)


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"model.{field}: {message}")


def _choice(config: ModelConfig, field: str, allowed: tuple[str, ...]) -> None:
  value = getattr(config, field)
  _require(value in allowed, field, f"got {value!r}; allowed values: {', '.join(allowed)}")


def validate(config: ModelConfig) -> None:
  """Raises ConfigError naming the first bad field; runs before anything is traced."""
  for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank",
                "qk_nope_head_dim", "v_head_dim", "n_routed_experts",
                "num_experts_per_tok", "moe_intermediate_size", "num_iterations"):
    value = getattr(config, field)
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field,
             f"got {value!r}; must be an integer >= 1")
  _require(isinstance(config.qk_rope_head_dim, int) and config.qk_rope_head_dim >= 2
           and config.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
           f"got {config.qk_rope_head_dim!r}; must be an even integer >= 2")
  _require(isinstance(config.attention_query_block, int)
           and not isinstance(config.attention_query_block, bool)
           and config.attention_query_block >= 0, "attention_query_block",
           f"got {config.attention_query_block!r}; must be an integer >= 0 (0 = dense)")
  _require(isinstance(config.n_shared_experts, int) and config.n_shared_experts >= 0,
           "n_shared_experts", f"got {config.n_shared_experts!r}; must be an integer >= 0")
  _require(config.num_experts_per_tok <= config.n_routed_experts, "num_experts_per_tok",
           f"got K={config.num_experts_per_tok}; must be between 1 and "
           f"n_routed_experts={config.n_routed_experts}")
  _choice(config, "dispatch", DISPATCHES)
  _choice(config, "dropless_impl", DROPLESS_IMPLS)
  _require(isinstance(config.dropless_tile, int) and not isinstance(config.dropless_tile, bool)
           and config.dropless_tile >= 0, "dropless_tile",
           f"got {config.dropless_tile!r}; must be an integer >= 0 (0 = default)")
  _choice(config, "residual_style", RESIDUAL_STYLES)
  _choice(config, "dtype", DTYPES)
  _choice(config, "rope_scaling", ROPE_SCALINGS)
  _choice(config, "remat", REMATS)
  for field in ("capacity_factor_train", "capacity_factor_eval"):
    value = getattr(config, field)
    _require(isinstance(value, (int, float)) and value > 0 and math.isfinite(value), field,
             f"got {value!r}; must be a finite number > 0")
  _require(isinstance(config.min_capacity, int) and config.min_capacity >= 1, "min_capacity",
           f"got {config.min_capacity!r}; must be an integer >= 1")
  for field in ("aux_loss_alpha", "router_z_loss_coef", "initializer_range", "rms_norm_eps"):
    value = getattr(config, field)
    _require(isinstance(value, (int, float)) and value >= 0, field,
             f"got {value!r}; must be a number >= 0")
  _require(config.routed_scaling_factor > 0, "routed_scaling_factor",
           f"got {config.routed_scaling_factor!r}; must be > 0")
  if config.rope_scaling == "yarn":
    _require(config.rope_factor >= 1, "rope_factor",
             f"got {config.rope_factor!r}; must be >= 1 with rope_scaling='yarn'")
