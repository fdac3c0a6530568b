"""The model's hyper-parameters as one frozen dataclass, with validation.

`ModelConfig` is what every Flax module in `coe_jax` takes. Field names follow
the authors' Hugging Face `config.json` where one exists (see `convert.py`).
Training configs (`configs/*.py`) hold the same fields under `config.model`.

Every field carries metadata (`dataclasses.fields(ModelConfig)[i].metadata`):

- `kind`: `FUNCTION` or `EXECUTION`. The rule: a field is a FUNCTION field when
  changing it changes the parameters (their shapes, their initial
  distribution) or the exact function the model defines and trains: what the
  layers compute from given parameters when nothing is dropped and arithmetic
  is exact (sizes, attention and rope, norms, experts, the chain, the router
  and its losses, the initializer). It is an EXECUTION field when it only
  chooses how that function is evaluated: dispatch strategy and capacity
  (capacity dispatch approximates the dropless function by dropping
  assignments), the dropless kernel, attention blocking, compute dtype and
  rematerialisation. Execution fields may change between runs of the same
  model (a resumed run, an imported checkpoint); function fields may not
  (`checkpoint.check_resumable`).
- `hf` (optional): the authors' config.json key holding the field
  (`rope_scaling.factor` is the `factor` key of the `rope_scaling` dict).
- `hf_value` (optional): for a function field config.json does not carry,
  the only value the authors' code computes (export refuses any other).

Fields with neither `hf` nor `hf_value` are our own knobs: an import keeps
them from the base run config (`our_knobs()`, `export.import_hf`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from coe_jax.errors import ConfigError, DataError, is_int, require, require_choice  # noqa: F401
from coe_jax.nn.coe_config import (  # noqa: F401
  COE_FIELDS,
  DISPATCHES,
  DROPLESS_IMPLS,
  DTYPES,
  RESIDUAL_STYLES,
  CoEConfig,
  validate_coe,
)

ROPE_SCALINGS = ("yarn", "none")
PAD_SEMANTICS = ("reference", "masked")
REMATS = ("none", "full", "dots")


FUNCTION = "function"
EXECUTION = "execution"
FIELD_KINDS = (FUNCTION, EXECUTION)
_UNSET = object()


def _function(default: Any, hf: Optional[str] = None, hf_value: Any = _UNSET) -> Any:
  """A field that changes the parameters or the model's function (see the module docstring)."""
  metadata: dict[str, Any] = {"kind": FUNCTION}
  if hf is not None:
    metadata["hf"] = hf
  if hf_value is not _UNSET:
    metadata["hf_value"] = hf_value
  return dataclasses.field(default=default, metadata=metadata)


def _execution(default: Any) -> Any:
  """A field that only chooses how the same function is evaluated (see the module docstring)."""
  return dataclasses.field(default=default, metadata={"kind": EXECUTION})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V2-style causal LM whose feed-forward blocks are Chain-of-Experts layers.

  Defaults are the paper's MoE(K=8, N=64) baseline (DESIGN.md 2-5).
  """

  # --- sizes ---
  vocab_size: int = _function(102400, hf="vocab_size")  # DeepSeek-V2 tokenizer
  hidden_size: int = _function(1024, hf="hidden_size")
  num_layers: int = _function(4, hf="num_hidden_layers")
  num_heads: int = _function(8, hf="num_attention_heads")
  # --- multi-head latent attention (DeepSeek-V2) ---
  kv_lora_rank: int = _function(512, hf="kv_lora_rank")
  qk_nope_head_dim: int = _function(128, hf="qk_nope_head_dim")
  qk_rope_head_dim: int = _function(64, hf="qk_rope_head_dim")
  v_head_dim: int = _function(128, hf="v_head_dim")
  rope_theta: float = _function(10000.0, hf="rope_theta")
  rope_scaling: str = _function(
    "yarn", hf="rope_scaling"
  )  # 'yarn' | 'none' (config.json: a dict | null)
  rope_factor: float = _function(40.0, hf="rope_scaling.factor")
  rope_original_max_position: int = _function(
    4096, hf="rope_scaling.original_max_position_embeddings"
  )
  rope_beta_fast: float = _function(32.0, hf="rope_scaling.beta_fast")
  rope_beta_slow: float = _function(1.0, hf="rope_scaling.beta_slow")
  rope_mscale: float = _function(0.707, hf="rope_scaling.mscale")
  rope_mscale_all_dim: float = _function(0.707, hf="rope_scaling.mscale_all_dim")
  rms_norm_eps: float = _function(1e-6, hf="rms_norm_eps")
  initializer_range: float = _function(0.02, hf="initializer_range")
  # --- experts ---
  # the paper's N counts the shared expert: N=64 is 63 + 1
  n_routed_experts: int = _function(63, hf="n_routed_experts")
  n_shared_experts: int = _function(1, hf="n_shared_experts")  # config.json: null for 0
  # K, routed experts per token per iteration
  num_experts_per_tok: int = _function(8, hf="num_experts_per_tok")
  moe_intermediate_size: int = _function(704, hf="moe_intermediate_size")
  # --- chain of experts ---
  num_iterations: int = _function(1, hf="inner_iter")  # C; C=1 is plain MoE
  # one router per iteration (else one shared router)
  independent_gates: bool = _function(True, hf="use_igate")
  inner_residual: bool = _function(
    True, hf="inner_residual"
  )  # u_t = u_{t-1} + m_t (else u_t = m_t)
  # out = h + u_C (else out = u_C; reference default)
  outer_residual: bool = _function(False, hf="outer_residual")
  # 'reference' (DESIGN.md 2) | 'textbook' (out = h + sum m_t); the authors' code has only 'reference'
  residual_style: str = _function("reference", hf_value="reference")
  # --- router ---
  norm_topk_prob: bool = _function(False, hf="norm_topk_prob")
  routed_scaling_factor: float = _function(1.0, hf="routed_scaling_factor")
  aux_loss_alpha: float = _function(0.001, hf="aux_loss_alpha")
  router_z_loss_coef: float = _function(0.0)  # ours; the authors' code has no z-loss
  # --- padded positions (DESIGN.md 6) ---
  # 'reference' (the authors' trainer): a pad's attention output is zero and the CoE layers
  # take no mask, so pads get the routed and shared experts' output, take expert capacity and
  # count in the balance loss; unpacked rows are laid out as theirs (padded with end-of-text,
  # the example's end-of-text is the first pad). 'masked': pads take no expert capacity and get
  # no routed output (what runs saved before this field keep on resume).
  pad_semantics: str = _function("reference")
  # --- dispatch ---
  # The reference routes dropless (DESIGN.md 3); capacity bounds the work per expert by dropping.
  dispatch: str = _execution("dropless")  # 'dropless' | 'capacity'
  # 'auto' ('grouped' on GPU, 'blocked' elsewhere: nn.tuning) | 'grouped' (Pallas grouped matmul,
  # nn.grouped; interpreted on CPU) | 'blocked' | 'gather' | 'ragged_dot'
  dropless_impl: str = _execution("auto")
  # Rows per whole tile of dropless_impl='blocked': each expert's rows run as whole tiles plus a
  # last tile of the smallest size that holds the rest (dropless_tile_sizes). Large: fewer,
  # faster matmuls.
  # 'grouped': rows per tile, a power of two (0 = nn.tuning.GROUPED_TILE_ROWS, 128).
  # 0 = from the load (tuning.default_tiling: a balanced load + 1 sd, <= 256 rows a tile; three
  # times that on CPU for experts of >= 1 MiB, whose last tiles there pad little).
  dropless_tile: int = _execution(0)
  # How many tile sizes 'blocked' picks each expert's last tile from, evenly spaced up to
  # dropless_tile (1 = whole tiles only). 0 = the target's default (blocked.default_tiling):
  # on CPU every 8 rows for experts of >= 1 MiB (PERF.md 22), else 5 (PERF.md 21); elsewhere 1
  # (unmeasured).
  dropless_tile_sizes: int = _execution(0)
  # '' | 'cpu' | 'gpu' | 'tpu': the platform dropless_impl='auto' and the tilings are chosen for.
  # '' = the devices the program is compiled for: the mesh's (jax.set_mesh), else the default
  # device (nn.tuning.target_platform); set it when tracing for devices other than those.
  target_platform: str = _execution("")
  capacity_factor_train: float = _execution(1.25)
  capacity_factor_eval: float = _execution(2.0)
  min_capacity: int = _execution(4)
  # --- attention kernel ---
  # Queries per causal block in training/prefill self-attention: block i attends only to keys
  # 0 .. (its last query), skipping the all-masked keys after it (~(1 - (n+1)/2n) of the score
  # work with n blocks). 0 = one dense block (every query against every key).
  attention_query_block: int = _execution(64)
  # --- numerics and compilation ---
  dtype: str = _execution("float32")  # compute dtype; params and router are always float32
  remat: str = _execution("none")  # 'none' | 'full' | 'dots' (save matmul outputs)
  # False: one param tree per decoder layer (`layers_0`, `layers_1`, ...), each read in place
  # (12-14% less CPU time per paper-width train step; experiments/PERF.md 17). True: params stacked
  # on a leading [layers] axis under `layers` (an unrolled nn.scan; XLA copies every layer's
  # params out of the stack each step): the layout of runs saved before this field existed.
  # The same seed draws different initial weights in the two layouts.
  scan_layers: bool = _execution(False)

  def __post_init__(self):
    validate(self)

  @property
  def coe(self) -> CoEConfig:
    """The CoE layer's own config: the fields of `CoEConfig`, taken from this one."""
    return CoEConfig(**{name: getattr(self, name) for name in COE_FIELDS})

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
        f"model config: unknown field(s) {unknown}; allowed fields: {sorted(names)}"
      )
    return cls(**values)


def validate(config: ModelConfig) -> None:
  """Raises ConfigError naming the first bad field; runs before anything is traced."""
  validate_coe(config, prefix="model")
  for field in (
    "vocab_size",
    "num_layers",
    "num_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "v_head_dim",
  ):
    value = getattr(config, field)
    require(
      is_int(value) and value >= 1, f"model.{field}", f"got {value!r}; must be an integer >= 1"
    )
  require(
    is_int(config.qk_rope_head_dim)
    and config.qk_rope_head_dim >= 2
    and config.qk_rope_head_dim % 2 == 0,
    "model.qk_rope_head_dim",
    f"got {config.qk_rope_head_dim!r}; must be an even integer >= 2",
  )
  require(
    is_int(config.attention_query_block) and config.attention_query_block >= 0,
    "model.attention_query_block",
    f"got {config.attention_query_block!r}; must be an integer >= 0 (0 = dense)",
  )
  require_choice(config.rope_scaling, "model.rope_scaling", ROPE_SCALINGS)
  require_choice(config.remat, "model.remat", REMATS)
  require_choice(config.pad_semantics, "model.pad_semantics", PAD_SEMANTICS)
  require(
    isinstance(config.scan_layers, bool),
    "model.scan_layers",
    f"got {config.scan_layers!r}; allowed values: True, False",
  )
  if config.rope_scaling == "yarn":
    require(
      config.rope_factor >= 1,
      "model.rope_factor",
      f"got {config.rope_factor!r}; must be >= 1 with rope_scaling='yarn'",
    )


def fields_of_kind(kind: str) -> tuple[str, ...]:
  """Names of the ModelConfig fields of `kind` (FUNCTION or EXECUTION), in declaration order."""
  if kind not in FIELD_KINDS:
    raise ValueError(f"kind: got {kind!r}; allowed values: {', '.join(FIELD_KINDS)}")
  return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("kind") == kind)


def hf_keys() -> dict[str, str]:
  """Our field name -> the authors' config.json key ('rope_scaling.<key>' inside that dict)."""
  return {f.name: f.metadata["hf"] for f in dataclasses.fields(ModelConfig) if "hf" in f.metadata}


def hf_fixed_values() -> dict[str, Any]:
  """Our field name -> the only value the authors' code computes, for fields config.json lacks."""
  return {
    f.name: f.metadata["hf_value"]
    for f in dataclasses.fields(ModelConfig)
    if "hf_value" in f.metadata
  }


def our_knobs() -> tuple[str, ...]:
  """Fields the authors' config.json neither carries nor fixes (dispatch, dtype, z-loss, ...)."""
  return tuple(
    f.name
    for f in dataclasses.fields(ModelConfig)
    if "hf" not in f.metadata and "hf_value" not in f.metadata
  )
