"""`CoEConfig`: what one Chain-of-Experts layer reads, and nothing else (DESIGN.md 2-4).

`CoELayer(CoEConfig(...))` is all a host Flax codebase needs to configure the
layer. The paper's LM holds one as `ModelConfig.coe`: each field is declared
here only, with its kind (function or execution) and the authors' config.json
key in its metadata (`field_kinds`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from coe_jax.errors import is_int, require, require_choice
from coe_jax.nn.field_kinds import execution_field as _execution
from coe_jax.nn.field_kinds import function_field as _function

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

  # width of the residual stream the layer reads and writes (the LM's hidden size)
  hidden_size: int = _function(1024, hf="hidden_size")
  # --- experts (DESIGN.md 4) ---
  # N_routed; the paper's N counts the shared expert too (64 = 63 + 1)
  n_routed_experts: int = _function(63, hf="n_routed_experts")
  # shared experts, run on every token in every iteration (0 = none; config.json: null)
  n_shared_experts: int = _function(1, hf="n_shared_experts")
  # K: routed experts chosen per token per iteration
  num_experts_per_tok: int = _function(8, hf="num_experts_per_tok")
  # SwiGLU width of one expert (shared: times n_shared_experts)
  moe_intermediate_size: int = _function(704, hf="moe_intermediate_size")
  # --- the chain (DESIGN.md 2) ---
  num_iterations: int = _function(1, hf="inner_iter")  # C; C=1 is plain MoE
  # one router per iteration (else one router reused)
  independent_gates: bool = _function(True, hf="use_igate")
  inner_residual: bool = _function(True, hf="inner_residual")  # u_t = u_{t-1} + m_t (else m_t)
  # out = h + u_C (else out = u_C, the reference's default)
  outer_residual: bool = _function(False, hf="outer_residual")
  # 'reference' (DESIGN.md 2) | 'textbook' (out = h + sum_t m_t); the authors' code has only
  # 'reference'
  residual_style: str = _function("reference", hf_value="reference")
  # --- router (DESIGN.md 3) ---
  # renormalise the K chosen scores to sum to 1
  norm_topk_prob: bool = _function(False, hf="norm_topk_prob")
  routed_scaling_factor: float = _function(1.0, hf="routed_scaling_factor")  # scales the weights
  # sequence-level load-balancing loss weight
  aux_loss_alpha: float = _function(0.001, hf="aux_loss_alpha")
  router_z_loss_coef: float = _function(0.0)  # ST-MoE router z-loss weight (not in the reference)
  # --- dispatch (DESIGN.md 3) ---
  # 'dropless' (the reference) | 'capacity' (bounds the work per expert by dropping)
  dispatch: str = _execution("dropless")
  # 'auto' ('grouped' on GPU, 'blocked' elsewhere: nn.tuning) | 'grouped' (Pallas grouped
  # matmul, nn.grouped; interpreted on CPU) | 'blocked' | 'gather' | 'ragged_dot'
  dropless_impl: str = _execution("auto")
  # Rows per whole tile of 'blocked' (each expert's rows run as whole tiles plus a last tile of
  # the smallest size that holds the rest) or of 'grouped' (a power of two).
  # 0 = the target's default (nn.tuning).
  dropless_tile: int = _execution(0)
  # How many tile sizes 'blocked' picks each expert's last tile from, evenly spaced up to
  # dropless_tile (1 = whole tiles only); 0 = the target's default (nn.tuning).
  dropless_tile_sizes: int = _execution(0)
  # 'blocked' on CPU with C > 1, training: each expert's weight gradient from all C passes'
  # rows in one loop, at C times the tile heights (experiments/PERF.md 39); False: one per
  # pass. Same gradient up to float rounding.
  defer_weight_grads: bool = _execution(True)
  # '' | 'cpu' | 'gpu' | 'tpu': the platform dropless_impl='auto' and the tilings are chosen for.
  # '' = the devices the program is compiled for: the mesh's (jax.set_mesh), else the default
  # device (nn.tuning.target_platform); set it when tracing for devices other than those.
  target_platform: str = _execution("")
  # capacity = ceil(cf * tokens * K / N), at least min_capacity (dispatch.expert_capacity)
  capacity_factor_train: float = _execution(1.25)
  capacity_factor_eval: float = _execution(2.0)
  min_capacity: int = _execution(4)
  # --- numerics ---
  # of the RMSNorm that runs once before the chain (the LM's other norms use it too)
  rms_norm_eps: float = _function(1e-6, hf="rms_norm_eps")
  # std of the normal init of the experts (and of the LM's other weights; the router: torch's)
  initializer_range: float = _function(0.02, hf="initializer_range")
  dtype: str = _execution("float32")  # compute dtype; params and the router stay float32

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
  (any object with CoEConfig's attribute names: a CoEConfig, or the flat `config.model`
  values `ModelConfig` builds one from, named as the user wrote them)."""

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
  for field in (
    "independent_gates",
    "inner_residual",
    "outer_residual",
    "norm_topk_prob",
    "defer_weight_grads",
  ):
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
