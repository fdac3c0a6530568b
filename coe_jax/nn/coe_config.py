"""`CoEConfig`: what one Chain-of-Experts layer reads, and nothing else (DESIGN.md 2-4).

`CoELayer(CoEConfig(...))` is all a host Flax codebase needs to configure the
layer; `ModelConfig` (the whole LM) keeps the same fields flat, validates them
with the same rules and hands the layer `model_config.coe`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from coe_jax.errors import is_int, require, require_choice

Dispatch = Literal["capacity", "dropless"]
DroplessImpl = Literal["auto", "gather", "ragged_dot", "blocked", "grouped"]
ResidualStyle = Literal["reference", "textbook"]

DISPATCHES = ("capacity", "dropless")
DROPLESS_IMPLS = ("auto", "gather", "ragged_dot", "blocked", "grouped")
RESIDUAL_STYLES = ("reference", "textbook")
DTYPES = ("float32", "bfloat16")
TARGET_PLATFORMS = ("", "cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class CoEConfig:
  """One CoE layer: C routed passes of K of N routed experts (+ shared experts) each.

  Defaults are the paper's MoE(K=8, N=64) layer; `num_iterations=2,
  num_experts_per_tok=4` is its CoE(C=2, K=4).
  """

  hidden_size: int = 1024  # width of the residual stream the layer reads and writes
  # --- experts (DESIGN.md 4) ---
  n_routed_experts: int = 63  # N_routed; the paper's N counts the shared expert too (64 = 63 + 1)
  n_shared_experts: int = 1  # shared experts, run on every token in every iteration (0 = none)
  num_experts_per_tok: int = 8  # K: routed experts chosen per token per iteration
  moe_intermediate_size: int = 704  # SwiGLU width of one expert (shared: times n_shared_experts)
  # --- the chain (DESIGN.md 2) ---
  num_iterations: int = 1  # C; C=1 is plain MoE
  independent_gates: bool = True  # one router per iteration (else one router reused)
  inner_residual: bool = True  # u_t = u_{t-1} + m_t (else u_t = m_t)
  outer_residual: bool = False  # out = h + u_C (else out = u_C, the reference's default)
  residual_style: str = "reference"  # 'reference' (DESIGN.md 2) | 'textbook' (out = h + sum_t m_t)
  # --- router (DESIGN.md 3) ---
  norm_topk_prob: bool = False  # renormalise the K chosen scores to sum to 1
  routed_scaling_factor: float = 1.0  # multiplies the combine weights
  aux_loss_alpha: float = 0.001  # sequence-level load-balancing loss weight
  router_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (not in the reference)
  # --- dispatch (DESIGN.md 3) ---
  dispatch: str = "dropless"  # 'dropless' (the reference) | 'capacity' (drops over capacity)
  # 'auto' ('grouped' on GPU, 'blocked' elsewhere) | 'grouped' | 'blocked' | 'gather' | 'ragged_dot'
  dropless_impl: str = "auto"
  dropless_tile: int = 0  # rows per whole tile of 'blocked' / 'grouped'; 0 = the target's default
  dropless_tile_sizes: int = 0  # tile sizes of 'blocked'; 0 = the target's (default_tiling)
  # '' | 'cpu' | 'gpu' | 'tpu': the platform the kernel policies (dropless_impl='auto', tiling)
  # are chosen for; '' = the devices the program is compiled for (nn.tuning.target_platform)
  target_platform: str = ""
  capacity_factor_train: float = 1.25  # capacity = ceil(cf * tokens * K / N) in training
  capacity_factor_eval: float = 2.0  # ... and in evaluation
  min_capacity: int = 4  # capacity never goes below this
  # --- numerics ---
  rms_norm_eps: float = 1e-6  # of the RMSNorm that runs once before the chain
  initializer_range: float = 0.02  # std of the experts' normal init (the router: torch default)
  dtype: str = "float32"  # compute dtype; params and the router stay float32

  def __post_init__(self):
    validate_coe(self, prefix="coe")

  @property
  def num_router_weights(self) -> int:
    """Leading size of the stacked router weights: C with independent gates, else 1."""
    return self.num_iterations if self.independent_gates else 1

  @property
  def shared_intermediate_size(self) -> int:
    return self.moe_intermediate_size * self.n_shared_experts

  def replace(self, **changes: Any) -> "CoEConfig":
    return dataclasses.replace(self, **changes)


COE_FIELDS = tuple(f.name for f in dataclasses.fields(CoEConfig))


def validate_coe(config: Any, prefix: str) -> None:
  """Raises ConfigError naming `<prefix>.<field>` for the first bad CoE field of `config`
  (a CoEConfig, or a ModelConfig, which holds the same fields)."""

  def check(ok: bool, field: str, message: str) -> None:
    require(ok, f"{prefix}.{field}", message)

  for field in (
    "hidden_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "num_iterations",
  ):
    value = getattr(config, field)
    check(is_int(value) and value >= 1, field, f"got {value!r}; must be an integer >= 1")
  check(
    is_int(config.n_shared_experts) and config.n_shared_experts >= 0,
    "n_shared_experts",
    f"got {config.n_shared_experts!r}; must be an integer >= 0",
  )
  check(
    config.num_experts_per_tok <= config.n_routed_experts,
    "num_experts_per_tok",
    f"got K={config.num_experts_per_tok}; must be between 1 and "
    f"n_routed_experts={config.n_routed_experts}",
  )
  for field, allowed in (
    ("dispatch", DISPATCHES),
    ("dropless_impl", DROPLESS_IMPLS),
    ("residual_style", RESIDUAL_STYLES),
    ("dtype", DTYPES),
    ("target_platform", TARGET_PLATFORMS),
  ):
    require_choice(getattr(config, field), f"{prefix}.{field}", allowed)
  for field in ("independent_gates", "inner_residual", "outer_residual", "norm_topk_prob"):
    value = getattr(config, field)
    check(isinstance(value, bool), field, f"got {value!r}; allowed values: True, False")
  for field in ("capacity_factor_train", "capacity_factor_eval"):
    value = getattr(config, field)
    check(
      isinstance(value, (int, float)) and value > 0 and math.isfinite(value),
      field,
      f"got {value!r}; must be a finite number > 0",
    )
  check(
    is_int(config.dropless_tile) and config.dropless_tile >= 0,
    "dropless_tile",
    f"got {config.dropless_tile!r}; must be an integer >= 0 (0 = default)",
  )
  check(
    is_int(config.dropless_tile_sizes) and config.dropless_tile_sizes >= 0,
    "dropless_tile_sizes",
    f"got {config.dropless_tile_sizes!r}; must be an integer >= 0 (0 = default)",
  )
  check(
    is_int(config.min_capacity) and config.min_capacity >= 1,
    "min_capacity",
    f"got {config.min_capacity!r}; must be an integer >= 1",
  )
  for field in ("aux_loss_alpha", "router_z_loss_coef", "initializer_range", "rms_norm_eps"):
    value = getattr(config, field)
    check(
      isinstance(value, (int, float)) and value >= 0, field, f"got {value!r}; must be a number >= 0"
    )
  check(
    isinstance(config.routed_scaling_factor, (int, float)) and config.routed_scaling_factor > 0,
    "routed_scaling_factor",
    f"got {config.routed_scaling_factor!r}; must be > 0",
  )
