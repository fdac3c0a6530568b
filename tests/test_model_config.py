"""Tests for coe_jax.nn.model_config: one source per field (CoE fields in `ModelConfig.coe`), the
flat `config.model` form, and validation before anything is traced."""

from __future__ import annotations

import dataclasses

import pytest

from coe_jax.nn import model_config
from coe_jax.nn.coe_config import COE_FIELDS, CoEConfig
from coe_jax.nn.model_config import ConfigError, ModelConfig

SMALL = ModelConfig().replace(
  hidden_size=16, n_routed_experts=6, num_experts_per_tok=2, num_iterations=2, num_layers=2
)


def test_each_coe_field_is_declared_once_in_the_coe_config_the_model_holds():
  own = {f.name for f in dataclasses.fields(ModelConfig)} - {"coe"}
  assert not own & set(COE_FIELDS)
  assert not hasattr(ModelConfig, "num_router_weights")  # the layer's properties live there too
  assert isinstance(SMALL.coe, CoEConfig) and SMALL.coe.num_iterations == 2
  # The width, norm epsilon, init std and compute dtype the whole model shares are read there.
  for name in ("hidden_size", "rms_norm_eps", "initializer_range", "dtype"):
    assert getattr(SMALL, name) == getattr(SMALL.coe, name)
  with pytest.raises(AttributeError, match=r"model_config\.coe\.num_iterations"):
    SMALL.num_iterations  # the error says where the field is


def test_replace_takes_flat_names_and_whole_coe_configs():
  cfg = SMALL.replace(dispatch="capacity", num_layers=3, hidden_size=32)
  assert cfg.coe == SMALL.coe.replace(dispatch="capacity", hidden_size=32)
  assert cfg.num_layers == 3 and cfg.hidden_size == 32
  assert SMALL.replace(coe=cfg.coe) == cfg.replace(num_layers=2)
  assert SMALL.replace(dispatch=SMALL.coe.dispatch) == SMALL


def test_flat_form_holds_every_field_once_and_round_trips():
  flat = SMALL.to_dict()
  assert list(flat) == [f.name for f in model_config.flat_fields()]
  assert flat["num_iterations"] == 2 and flat["num_layers"] == 2 and "coe" not in flat
  assert ModelConfig.from_dict(flat) == SMALL
  assert ModelConfig().to_dict() == {  # the defaults are the CoE layer's and the LM's own
    **{f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name != "coe"},
    **dataclasses.asdict(CoEConfig()),
  }


@pytest.mark.parametrize(
  "overrides,field,allowed",
  [
    (dict(num_experts_per_tok=7), "model.num_experts_per_tok", "between 1 and n_routed_experts=6"),
    (dict(num_iterations=0), "model.num_iterations", "integer >= 1"),
    (dict(capacity_factor_train=0.0), "model.capacity_factor_train", "> 0"),
    (dict(capacity_factor_eval=-1.0), "model.capacity_factor_eval", "> 0"),
    (dict(dispatch="dense"), "model.dispatch", "allowed values: capacity, dropless"),
    (
      dict(dropless_impl="megablox"),
      "model.dropless_impl",
      "allowed values: auto, gather, ragged_dot",
    ),
    (dict(qk_rope_head_dim=5), "model.qk_rope_head_dim", "even integer"),
    (dict(dtype="float16"), "model.dtype", "allowed values: float32, bfloat16"),
    (
      dict(residual_style="pre_norm"),
      "model.residual_style",
      "allowed values: reference, textbook",
    ),
    (dict(remat="some"), "model.remat", "allowed values: none, full, dots"),
    (dict(n_shared_experts=-1), "model.n_shared_experts", ">= 0"),
    (dict(scan_layers="yes"), "model.scan_layers", "allowed values: True, False"),
  ],
)
def test_bad_config_raises_config_error_naming_the_field(overrides, field, allowed):
  with pytest.raises(ConfigError) as err:
    SMALL.replace(**overrides)
  assert field in str(err.value) and allowed in str(err.value)
  assert isinstance(err.value, ValueError)
  # Also from the flat form (`config.model`).
  with pytest.raises(ConfigError, match=field):
    ModelConfig.from_dict({**SMALL.to_dict(), **overrides})


def test_a_coe_config_names_its_own_fields_and_the_model_needs_one():
  with pytest.raises(ConfigError, match=r"coe\.dispatch: got 'dense'"):
    CoEConfig(dispatch="dense")
  with pytest.raises(ConfigError, match=r"model\.coe: got dict; must be a CoEConfig"):
    ModelConfig(coe={"dispatch": "dropless"})


def test_from_dict_rejects_unknown_keys():
  with pytest.raises(ConfigError, match="num_experts"):
    ModelConfig.from_dict({**SMALL.to_dict(), "num_experts": 8})
