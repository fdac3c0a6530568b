"""Weights in the authors' Hugging Face layout (`CoeForCausalLM`) <-> ours.

`from_hf(config_json, state_dict)` builds `(CoECausalLM, variables)` from the
authors' config.json fields and PyTorch state-dict names; `to_hf` is the
inverse. torch Linear weights are [out, in]; Flax kernels are [in, out]; our
per-layer weights are stacked on a leading [layers] axis (scanned decoder).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from coe_jax.model import CoECausalLM
from coe_jax.model_config import ConfigError, ModelConfig

# Our ModelConfig field <- authors' config.json field (same meaning).
_SAME_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "initializer_range": "initializer_range",
    "n_routed_experts": "n_routed_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "moe_intermediate_size": "moe_intermediate_size",
    "num_iterations": "inner_iter",
    "independent_gates": "use_igate",
    "inner_residual": "inner_residual",
    "outer_residual": "outer_residual",
    "norm_topk_prob": "norm_topk_prob",
    "routed_scaling_factor": "routed_scaling_factor",
    "aux_loss_alpha": "aux_loss_alpha",
}
_ROPE_FIELDS = {
    "rope_factor": "factor",
    "rope_original_max_position": "original_max_position_embeddings",
    "rope_beta_fast": "beta_fast",
    "rope_beta_slow": "beta_slow",
    "rope_mscale": "mscale",
    "rope_mscale_all_dim": "mscale_all_dim",
}


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from the authors' config.json dict; `overrides` set our own knobs (dispatch...)."""
  if hf.get("q_lora_rank") not in (None, 0):
    raise ConfigError(f"config.json q_lora_rank: got {hf['q_lora_rank']!r}; allowed values: null")
  if hf.get("first_k_dense_replace", 0) not in (0, None):
    raise ConfigError(f"config.json first_k_dense_replace: got {hf['first_k_dense_replace']!r}; "
                      "allowed values: 0 (every layer is a CoE layer)")
  if hf.get("tie_word_embeddings", False):
    raise ConfigError("config.json tie_word_embeddings: got true; allowed values: false")
  values: dict[str, Any] = {ours: hf[theirs] for ours, theirs in _SAME_FIELDS.items() if theirs in hf}
  values["n_shared_experts"] = int(hf.get("n_shared_experts") or 0)
  rope = hf.get("rope_scaling")
  if rope:
    kind = rope.get("type", rope.get("rope_type"))
    if kind != "yarn":
      raise ConfigError(f"config.json rope_scaling.type: got {kind!r}; allowed values: yarn, or null")
    values["rope_scaling"] = "yarn"
    # Keys absent from config.json take the reference's defaults
    # (DeepseekV2YarnRotaryEmbedding: mscale=1, mscale_all_dim=0), not our paper defaults.
    values.update({"rope_original_max_position": 4096, "rope_beta_fast": 32.0,
                   "rope_beta_slow": 1.0, "rope_mscale": 1.0, "rope_mscale_all_dim": 0.0})
    values.update({ours: rope[theirs] for ours, theirs in _ROPE_FIELDS.items() if theirs in rope})
  else:
    values["rope_scaling"] = "none"
  values.update(overrides)
  return ModelConfig(**values)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The authors' config.json fields for `cfg` (DeepSeek-V2 names plus the CoE switches).

  Raises ConfigError for residual_style='textbook', which their code cannot compute.
  """
  if cfg.residual_style != "reference":
    raise ConfigError(f"model.residual_style: got {cfg.residual_style!r}; the authors' format "
                      "allows only 'reference'")
  hf: dict[str, Any] = {theirs: getattr(cfg, ours) for ours, theirs in _SAME_FIELDS.items()}
  hf.update({
      "architectures": ["CoeForCausalLM"],
      "model_type": "deepseek_v2",
      "n_shared_experts": cfg.n_shared_experts or None,
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
      "intermediate_size": cfg.moe_intermediate_size * max(cfg.num_experts_per_tok, 1),
      "max_position_embeddings": int(cfg.rope_original_max_position * cfg.rope_factor)
      if cfg.rope_scaling == "yarn" else cfg.rope_original_max_position,
      "rope_scaling": None,
  })
  if cfg.rope_scaling == "yarn":
    hf["rope_scaling"] = {"type": "yarn", **{theirs: getattr(cfg, ours) for ours, theirs in _ROPE_FIELDS.items()}}
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
  if cfg.n_shared_experts > 0:
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


def from_hf(config: Mapping[str, Any], state_dict: Mapping[str, Any], **overrides: Any
            ) -> tuple[CoECausalLM, dict]:
  """(model, variables) from the authors' config.json dict and state dict.

  Args:
    config: the authors' config.json fields.
    state_dict: name -> array (numpy, or anything `np.asarray` takes; torch
      tensors via `.numpy()` first), in their naming and [out, in] layout.
    overrides: our own ModelConfig knobs, e.g. dispatch='dropless', dtype.
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
      [np.stack([sd[n] for n in _router_names(cfg, i)]) for i in range(cfg.num_layers)])
  routed = {}
  for proj in ("gate_proj", "up_proj", "down_proj"):
    routed[proj] = np.stack([
        np.stack([_linear(sd[f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"])
                  for j in range(cfg.n_routed_experts)]) for i in range(cfg.num_layers)])
  layers["mlp"]["routed_experts"] = routed
  params["layers"] = layers
  return CoECausalLM(cfg), {"params": params}


def _router_names(cfg: ModelConfig, i: int) -> list[str]:
  if cfg.independent_gates:
    return [f"model.layers.{i}.mlp.gate.{t}.weight" for t in range(cfg.num_iterations)]
  return [f"model.layers.{i}.mlp.gate.weight"]


def _expected_names(cfg: ModelConfig) -> list[str]:
  names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
  for i in range(cfg.num_layers):
    names += [n for n, _ in _layer_names(cfg, i).values()]
    names += _router_names(cfg, i)
    names += [f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"
              for j in range(cfg.n_routed_experts) for proj in ("gate_proj", "up_proj", "down_proj")]
  return names


def to_hf(model_or_config: CoECausalLM | ModelConfig, variables: Mapping[str, Any]
          ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, state dict of float32 numpy arrays) in the authors' layout."""
  cfg = model_or_config.config if isinstance(model_or_config, CoECausalLM) else model_or_config
  params = variables["params"] if "params" in variables else variables
  params = {k: v for k, v in params.items()}
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
      for j in range(cfg.n_routed_experts):
        sd[f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"] = _linear(stacked[j])
  return config_to_hf(cfg), sd
