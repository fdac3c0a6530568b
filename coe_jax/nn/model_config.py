"""The LM's hyper-parameters: `ModelConfig`, which holds its CoE layers' `CoEConfig` as `coe`.

`ModelConfig` is what every Flax module of the LM takes. It declares the fields
of the model around its CoE layers (vocabulary, depth, attention and rope,
padding, compilation) and holds every CoE field in one `CoEConfig`
(`model_config.coe`, what `CoELayer` takes): a CoE field is declared,
documented and validated in `coe_config.py` only. The residual stream's width,
norm epsilon, initializer std and compute dtype are CoE fields the whole model
shares; `model_config.hidden_size` (and `rms_norm_eps`, `initializer_range`,
`dtype`) read them there.

Users see one flat namespace, as in the authors' config.json: `config.model`
in `configs/*.py`, the `--config.model.<field>=` flags and the `config.json` a
run saves hold the CoE fields beside the others (`config.model.num_iterations`).
`from_dict` / `to_dict` map that flat form to this nested one and back, and
`replace` takes the flat names; nothing else converts.

Field names follow the authors' Hugging Face `config.json` where one exists
(see `convert.py`). Each field's metadata says whether it is a function or an
execution field (what a resumed run may change) and its config.json key
(`field_kinds`); `flat_fields()` lists both dataclasses' fields in the flat order.
"""

from __future__ import annotations

import dataclasses
import types
from typing import TYPE_CHECKING, Any, Mapping

from coe_jax.errors import ConfigError, DataError, is_int, require, require_choice  # noqa: F401
from coe_jax.nn.coe_config import COE_FIELDS, CoEConfig, validate_coe
from coe_jax.nn.field_kinds import EXECUTION, FIELD_KINDS, FUNCTION  # noqa: F401
from coe_jax.nn.field_kinds import execution_field as _execution
from coe_jax.nn.field_kinds import function_field as _function

ROPE_SCALINGS = ("yarn", "none")
PAD_SEMANTICS = ("reference", "masked")
REMATS = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V2-style causal LM whose feed-forward blocks are Chain-of-Experts layers.

  Defaults are the paper's MoE(K=8, N=64) baseline (DESIGN.md 2-5).
  """

  # --- sizes ---
  vocab_size: int = _function(102400, hf="vocab_size")  # DeepSeek-V2 tokenizer
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
  # --- padded positions (DESIGN.md 6) ---
  # 'reference' (the authors' trainer): a pad's attention output is zero and the CoE layers
  # take no mask, so pads get the routed and shared experts' output, take expert capacity and
  # count in the balance loss; unpacked rows are laid out as theirs (padded with end-of-text,
  # the example's end-of-text is the first pad). 'masked': pads take no expert capacity and get
  # no routed output (what runs saved before this field keep on resume).
  pad_semantics: str = _function("reference")
  # --- attention kernel ---
  # Queries per causal block in training/prefill self-attention: block i attends only to keys
  # 0 .. (its last query), skipping the all-masked keys after it (~(1 - (n+1)/2n) of the score
  # work with n blocks). 0 = one dense block (every query against every key).
  attention_query_block: int = _execution(64)
  # --- compilation ---
  remat: str = _execution("none")  # 'none' | 'full' | 'dots' (save matmul outputs)
  # False: one param tree per decoder layer (`layers_0`, `layers_1`, ...), each read in place
  # (12-14% less CPU time per paper-width train step; experiments/PERF.md 17). True: params stacked
  # on a leading [layers] axis under `layers` (an unrolled nn.scan; XLA copies every layer's
  # params out of the stack each step): the layout of runs saved before this field existed.
  # The same seed draws different initial weights in the two layouts.
  scan_layers: bool = _execution(False)
  # --- the CoE layer of every decoder layer: experts, chain, router, dispatch, and the width,
  # norm epsilon, initializer std and compute dtype the whole model shares ---
  coe: CoEConfig = dataclasses.field(default_factory=CoEConfig)

  def __post_init__(self):
    validate(self)

  @property
  def hidden_size(self) -> int:
    """Width of the residual stream, the embeddings and attention's output (`coe.hidden_size`)."""
    return self.coe.hidden_size

  @property
  def rms_norm_eps(self) -> float:
    """Epsilon of every RMSNorm of the model (`coe.rms_norm_eps`)."""
    return self.coe.rms_norm_eps

  @property
  def initializer_range(self) -> float:
    """Std of the normal init of every weight but the routers' (`coe.initializer_range`)."""
    return self.coe.initializer_range

  @property
  def dtype(self) -> str:
    """Compute dtype of the whole model; params stay float32 (`coe.dtype`)."""
    return self.coe.dtype

  @property
  def q_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  if not TYPE_CHECKING:  # type checkers keep flagging unknown attributes

    def __getattr__(self, name: str) -> Any:
      """Only for names that are no attribute: a CoE field read on the model says where it is."""
      if name in COE_FIELDS or name in _COE_PROPERTIES:
        raise AttributeError(
          f"ModelConfig has no attribute {name!r}: it is a field of the CoE layer, "
          f"model_config.coe.{name} (config.model.{name} in the flat form)"
        )
      raise AttributeError(f"'ModelConfig' object has no attribute {name!r}")

  def replace(self, **changes: Any) -> "ModelConfig":
    """This config with `changes` by their flat names (a CoE field lands in `coe`), or `coe=`."""
    coe_changes = {name: changes.pop(name) for name in COE_FIELDS if name in changes}
    coe = changes.pop("coe", self.coe)
    if coe_changes:
      coe = _coe_from({**_values(coe), **coe_changes})
    return dataclasses.replace(self, coe=coe, **changes)

  def to_dict(self) -> dict[str, Any]:
    """The flat form (`config.model`, a saved config.json's `model`): every field by name."""
    return {f.name: getattr(self, f.name) for f in _own_fields()} | _values(self.coe)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from the flat form (a dict or ConfigDict); unknown keys are an error."""
    values = dict(values)
    names = [f.name for f in flat_fields()]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ConfigError(
        f"model config: unknown field(s) {unknown}; allowed fields: {sorted(names)}"
      )
    coe_values = {name: values.pop(name) for name in COE_FIELDS if name in values}
    return cls(coe=_coe_from(coe_values), **values)


_COE_PROPERTIES = ("num_router_weights", "shared_intermediate_size")


def _values(coe: CoEConfig) -> dict[str, Any]:
  return {name: getattr(coe, name) for name in COE_FIELDS}


def _coe_from(values: Mapping[str, Any]) -> CoEConfig:
  """CoEConfig of flat `config.model` values; a bad one raises ConfigError naming
  `model.<field>`, the name the user wrote, rather than CoEConfig's own `coe.<field>`."""
  validate_coe(types.SimpleNamespace(**{**_values(CoEConfig()), **values}), prefix="model")
  return CoEConfig(**values)


def _own_fields() -> tuple[dataclasses.Field, ...]:
  return tuple(f for f in dataclasses.fields(ModelConfig) if f.name != "coe")


def flat_fields() -> tuple[dataclasses.Field, ...]:
  """Every field of the flat form: the LM's own, then its CoE layer's (each with its metadata)."""
  return _own_fields() + dataclasses.fields(CoEConfig)


def validate(config: ModelConfig) -> None:
  """Raises ConfigError naming the first bad field of the LM's own (CoEConfig checks its own);
  runs before anything is traced."""
  require(
    isinstance(config.coe, CoEConfig),
    "model.coe",
    f"got {type(config.coe).__name__}; must be a CoEConfig (flat values: ModelConfig.from_dict)",
  )
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
  """Flat names of the fields of `kind` (FUNCTION or EXECUTION), in `flat_fields()` order."""
  if kind not in FIELD_KINDS:
    raise ValueError(f"kind: got {kind!r}; allowed values: {', '.join(FIELD_KINDS)}")
  return tuple(f.name for f in flat_fields() if f.metadata.get("kind") == kind)


def hf_keys() -> dict[str, str]:
  """Our field name -> the authors' config.json key ('rope_scaling.<key>' inside that dict)."""
  return {f.name: f.metadata["hf"] for f in flat_fields() if "hf" in f.metadata}


def hf_fixed_values() -> dict[str, Any]:
  """Our field name -> the only value the authors' code computes, for fields config.json lacks."""
  return {f.name: f.metadata["hf_value"] for f in flat_fields() if "hf_value" in f.metadata}


def our_knobs() -> tuple[str, ...]:
  """Fields the authors' config.json neither carries nor fixes (dispatch, dtype, z-loss, ...)."""
  return tuple(
    f.name for f in flat_fields() if "hf" not in f.metadata and "hf_value" not in f.metadata
  )
