"""Weights in the authors' Hugging Face layout (`CoeForCausalLM`) <-> ours.

`from_hf(config_json, state_dict)` builds `(CoECausalLM, variables)` from the
authors' config.json fields and PyTorch state-dict names; `to_hf` is the
inverse. torch Linear weights are [out, in]; Flax kernels are [in, out]; our
per-layer weights are one tree per layer (`layers_i`), or stacked on a leading [layers]
axis with `scan_layers` (`to_hf` reads either).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from coe_jax.nn.model import CoECausalLM, stack_layers, unstack_layers
from coe_jax.nn.model_config import ConfigError, ModelConfig, hf_fixed_values, hf_keys

MODEL_TYPE = "coe_deepseekv2"  # the authors' CoeConfig.model_type
DEEPSEEK_V2 = "deepseek_v2"  # plain DeepSeek-V2 checkpoints (C=1), also accepted on import
MODEL_TYPES = (MODEL_TYPE, DEEPSEEK_V2)
AUTO_MAP = {
  "AutoConfig": "configuration_coe.CoeConfig",
  "AutoModel": "modeling_coe.CoeModel",
  "AutoModelForCausalLM": "modeling_coe.CoeForCausalLM",
}
# The authors' routing (DESIGN.md 3): every chosen expert processes the token. Import uses it unless
# the caller overrides `dispatch`.
IMPORT_DISPATCH = "dropless"
# Fields whose config.json form needs conversion code below (n_shared_experts: null for 0;
# rope_scaling: a dict or null).
_CONVERTED = ("n_shared_experts", "rope_scaling")
# Our ModelConfig field <- authors' config.json key (same meaning), from the field metadata.
_SAME_FIELDS = {
  ours: theirs for ours, theirs in hf_keys().items() if "." not in theirs and ours not in _CONVERTED
}
_ROPE_FIELDS = {
  ours: theirs.split(".", 1)[1]
  for ours, theirs in hf_keys().items()
  if theirs.startswith("rope_scaling.")
}
# What DeepSeek-V2's own decoder layer computes, in our fields: one expert pass with one gate
# per layer (`mlp.gate.weight`) and out = h + experts(norm(h)).
_DEEPSEEK_V2_CHAIN = {
  "num_iterations": 1,
  "independent_gates": False,
  "inner_residual": False,
  "outer_residual": True,
}


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from the authors' config.json dict; `overrides` set our own knobs.

  Routes dropless (`IMPORT_DISPATCH`, the authors' routing) unless `overrides`
  names another `dispatch`. `model_type` 'coe_deepseekv2' reads the CoE switches
  (inner_iter, use_igate, inner_residual, outer_residual); 'deepseek_v2' is plain
  DeepSeek-V2, i.e. C=1 with its residual (`_DEEPSEEK_V2_CHAIN`).
  """
  _check_hf_values(hf)
  values: dict[str, Any] = {
    ours: hf[theirs] for ours, theirs in _SAME_FIELDS.items() if theirs in hf
  }
  if hf["model_type"] == DEEPSEEK_V2:
    values.update(_deepseek_v2_chain(hf))
  values["n_shared_experts"] = int(hf.get("n_shared_experts") or 0)
  values.update(_rope_from_hf(hf.get("rope_scaling")))
  values.update(hf_fixed_values())
  values["dispatch"] = IMPORT_DISPATCH
  values.update(overrides)
  return ModelConfig.from_dict(values)


def _check_hf_values(hf: Mapping[str, Any]) -> None:
  """Raises ConfigError for config.json values our model cannot compute."""
  if hf.get("model_type") not in MODEL_TYPES:
    raise ConfigError(
      f"config.json model_type: got {hf.get('model_type')!r}; allowed values: "
      f"{', '.join(MODEL_TYPES)}"
    )
  if hf.get("q_lora_rank") not in (None, 0):
    raise ConfigError(f"config.json q_lora_rank: got {hf['q_lora_rank']!r}; allowed values: null")
  if hf.get("first_k_dense_replace", 0) not in (0, None):
    raise ConfigError(
      f"config.json first_k_dense_replace: got {hf['first_k_dense_replace']!r}; "
      "allowed values: 0 (every layer is a CoE layer)"
    )
  if hf.get("tie_word_embeddings", False):
    raise ConfigError("config.json tie_word_embeddings: got true; allowed values: false")


def _deepseek_v2_chain(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`_DEEPSEEK_V2_CHAIN`; a CoE key in a deepseek_v2 config.json must agree with it.

  DeepSeek-V2's code ignores those keys, so a disagreeing one means the file
  describes a CoE model under the wrong model_type.
  """
  for ours, want in _DEEPSEEK_V2_CHAIN.items():
    theirs = hf_keys()[ours]
    if theirs in hf and hf[theirs] != want:
      raise ConfigError(
        f"config.json {theirs}: got {hf[theirs]!r} with model_type {DEEPSEEK_V2!r}, whose code "
        f"computes {theirs}={want!r} (one expert pass, out = h + experts(norm(h))); allowed "
        f"values: {want!r} or absent. A Chain-of-Experts checkpoint has model_type {MODEL_TYPE!r}"
      )
  return dict(_DEEPSEEK_V2_CHAIN)


def _rope_from_hf(rope: Any) -> dict[str, Any]:
  """Our rope fields from config.json's rope_scaling (a dict, or null for none)."""
  if not rope:
    return {"rope_scaling": "none"}
  kind = rope.get("type", rope.get("rope_type"))
  if kind != "yarn":
    raise ConfigError(f"config.json rope_scaling.type: got {kind!r}; allowed values: yarn, or null")
  # Keys absent from config.json take the reference's defaults
  # (DeepseekV2YarnRotaryEmbedding: mscale=1, mscale_all_dim=0), not our paper defaults.
  values = {
    "rope_scaling": "yarn",
    "rope_original_max_position": 4096,
    "rope_beta_fast": 32.0,
    "rope_beta_slow": 1.0,
    "rope_mscale": 1.0,
    "rope_mscale_all_dim": 0.0,
  }
  values.update({ours: rope[theirs] for ours, theirs in _ROPE_FIELDS.items() if theirs in rope})
  return values


def check_authors_can_compute(cfg: ModelConfig) -> None:
  """Raises ConfigError when a field config.json lacks is not the authors' only value.

  E.g. residual_style='textbook': the authors' CoeForCausalLM only computes
  'reference' (its inner_residual/outer_residual switches cannot express
  out = h + sum_t m_t), so the exported model would compute something else.
  """
  flat = cfg.to_dict()
  for name, only in hf_fixed_values().items():
    value = flat[name]
    if value != only:
      raise ConfigError(
        f"model.{name}: got {value!r}; the authors' CoeForCausalLM only computes "
        f"{name}={only!r}, so the exported model would compute something else"
      )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The authors' config.json fields for `cfg` (DeepSeek-V2 names plus the CoE switches).

  Raises ConfigError (`check_authors_can_compute`), e.g. for residual_style='textbook'.
  """
  check_authors_can_compute(cfg)
  flat = cfg.to_dict()
  hf: dict[str, Any] = {theirs: flat[ours] for ours, theirs in _SAME_FIELDS.items()}
  hf.update(
    {
      "architectures": ["CoeForCausalLM"],
      "model_type": MODEL_TYPE,
      "auto_map": dict(AUTO_MAP),
      "n_shared_experts": cfg.coe.n_shared_experts or None,
      "q_lora_rank": None,
      "num_key_value_heads": cfg.num_heads,
      "first_k_dense_replace": 0,
      "moe_layer_freq": 1,
      "topk_method": "greedy",
      "scoring_func": "softmax",
      "seq_aux": True,
      "hidden_act": "silu",
      "tie_word_embeddings": False,
      "attention_bias": False,
      "intermediate_size": cfg.coe.moe_intermediate_size * max(cfg.coe.num_experts_per_tok, 1),
      "max_position_embeddings": int(cfg.rope_original_max_position * cfg.rope_factor)
      if cfg.rope_scaling == "yarn"
      else cfg.rope_original_max_position,
      "rope_scaling": None,
    }
  )
  if cfg.rope_scaling == "yarn":
    hf["rope_scaling"] = {
      "type": "yarn",
      **{theirs: flat[ours] for ours, theirs in _ROPE_FIELDS.items()},
    }
  return hf


def _linear(w) -> np.ndarray:
  """torch [out, in] <-> flax [in, out]."""
  return np.ascontiguousarray(np.asarray(w).T)


def _layer_names(cfg: ModelConfig, i: int) -> dict[tuple[str, ...], tuple[str, bool]]:
  """Our param path (within the stacked layer) -> (their name, is a Linear weight)."""
  p = f"model.layers.{i}."
  names = {
    ("input_layernorm", "scale"): (p + "input_layernorm.weight", False),
    ("mlp", "norm", "scale"): (p + "post_attention_layernorm.weight", False),
  }
  for proj in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
    names[("self_attn", proj, "kernel")] = (p + f"self_attn.{proj}.weight", True)
  names[("self_attn", "kv_a_layernorm", "scale")] = (p + "self_attn.kv_a_layernorm.weight", False)
  if cfg.coe.n_shared_experts > 0:
    for proj in ("gate_proj", "up_proj", "down_proj"):
      names[("mlp", "shared_experts", proj)] = (p + f"mlp.shared_experts.{proj}.weight", True)
  return names


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def from_hf(
  config: Mapping[str, Any], state_dict: Mapping[str, Any], **overrides: Any
) -> tuple[CoECausalLM, dict]:
  """(model, variables) from the authors' config.json dict and state dict.

  Args:
    config: the authors' config.json fields.
    state_dict: name -> array (numpy, or anything `np.asarray` takes; torch
      tensors via `.numpy()` first), in their naming and [out, in] layout.
    overrides: our own ModelConfig knobs, e.g. dtype, or dispatch='capacity' (default
      'dropless', the authors' routing: the logits equal theirs).
  Returns:
    `CoECausalLM` and `{'params': ...}` with float32 numpy leaves.
  """
  cfg = config_from_hf(config, **overrides)
  sd = {k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}
  missing = [n for n in _expected_names(cfg) if n not in sd]
  if missing:
    raise KeyError(f"state_dict is missing {len(missing)} weight(s), e.g. {missing[:5]}")
  params: dict = {
    "embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
    "norm": {"scale": sd["model.norm.weight"]},
    "lm_head": {"kernel": _linear(sd["lm_head.weight"])},
  }
  layers: dict = {}
  for path, _ in _layer_names(cfg, 0).items():
    stacked = [sd[_layer_names(cfg, i)[path][0]] for i in range(cfg.num_layers)]
    is_linear = _layer_names(cfg, 0)[path][1]
    _set(layers, path, np.stack([_linear(w) if is_linear else w for w in stacked]))
  layers.setdefault("mlp", {})["router"] = np.stack(
    [np.stack([sd[n] for n in _router_names(cfg, i)]) for i in range(cfg.num_layers)]
  )
  routed = {}
  for proj in ("gate_proj", "up_proj", "down_proj"):
    routed[proj] = np.stack(
      [
        np.stack(
          [
            _linear(sd[f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"])
            for j in range(cfg.coe.n_routed_experts)
          ]
        )
        for i in range(cfg.num_layers)
      ]
    )
  layers["mlp"]["routed_experts"] = routed
  params["layers"] = layers
  if not cfg.scan_layers:
    params = unstack_layers(params)
  return CoECausalLM(cfg), {"params": params}


def _router_names(cfg: ModelConfig, i: int) -> list[str]:
  if cfg.coe.independent_gates:
    return [f"model.layers.{i}.mlp.gate.{t}.weight" for t in range(cfg.coe.num_iterations)]
  return [f"model.layers.{i}.mlp.gate.weight"]


def _expected_names(cfg: ModelConfig) -> list[str]:
  names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
  for i in range(cfg.num_layers):
    names += [n for n, _ in _layer_names(cfg, i).values()]
    names += _router_names(cfg, i)
    names += [
      f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"
      for j in range(cfg.coe.n_routed_experts)
      for proj in ("gate_proj", "up_proj", "down_proj")
    ]
  return names


def to_hf(
  model_or_config: CoECausalLM | ModelConfig, variables: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, state dict of float32 numpy arrays) in the authors' layout."""
  cfg = model_or_config.config if isinstance(model_or_config, CoECausalLM) else model_or_config
  params = variables["params"] if "params" in variables else variables
  params = stack_layers(jax.tree.map(np.asarray, dict(params)))  # either layout, on the host
  sd: dict[str, np.ndarray] = {
    "model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"], np.float32),
    "model.norm.weight": np.asarray(params["norm"]["scale"], np.float32),
    "lm_head.weight": _linear(np.asarray(params["lm_head"]["kernel"], np.float32)),
  }
  layers = params["layers"]
  for i in range(cfg.num_layers):
    for path, (name, is_linear) in _layer_names(cfg, i).items():
      w = np.asarray(_get(layers, path)[i], np.float32)
      sd[name] = _linear(w) if is_linear else w
    router = np.asarray(layers["mlp"]["router"][i], np.float32)
    for t, name in enumerate(_router_names(cfg, i)):
      sd[name] = router[t]
    for proj in ("gate_proj", "up_proj", "down_proj"):
      stacked = np.asarray(layers["mlp"]["routed_experts"][proj][i], np.float32)
      for j in range(cfg.coe.n_routed_experts):
        sd[f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"] = _linear(stacked[j])
  return config_to_hf(cfg), sd
