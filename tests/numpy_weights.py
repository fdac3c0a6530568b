"""The numpy reference's weight and hyper-parameter adapters (re-exported by `numpy_reference`).

The only place that knows parameter names: `flax_weights` / `hf_weights` build the
neutral per-layer dict of `numpy_reference` (matrices in [in, out] layout, "x @ w")
from Flax params or from a torch-layout state dict; `hf_hparams` builds an `hp`
namespace from the authors' config.json; `random_params` draws params of a Flax
module's shapes. Like `numpy_reference`, nothing here imports `coe_jax`.
"""

from __future__ import annotations

from types import SimpleNamespace

import flax
import jax
import numpy as np


def f64(a) -> np.ndarray:
  return np.asarray(a, dtype=np.float64)


def flax_ffn_weights(mlp):
  """Neutral CoE-block dict from a CoELayer's params (one layer, no [layers] axis)."""
  shared = None
  if "shared_experts" in mlp:
    sh = mlp["shared_experts"]
    shared = (sh["gate_proj"], sh["up_proj"], sh["down_proj"])
  re = mlp["routed_experts"]
  return {
    "ffn_norm": mlp["norm"]["scale"],
    "router": mlp["router"],
    "gate": re["gate_proj"],
    "up": re["up_proj"],
    "down": re["down_proj"],
    "shared": shared,
  }


def flax_layer_weights(layer):
  """Neutral per-layer dict from one DecoderLayer's params."""
  att = layer["self_attn"]
  return {
    "input_norm": layer["input_layernorm"]["scale"],
    "q": att["q_proj"]["kernel"],
    "kv_a": att["kv_a_proj_with_mqa"]["kernel"],
    "kv_norm": att["kv_a_layernorm"]["scale"],
    "kv_b": att["kv_b_proj"]["kernel"],
    "o": att["o_proj"]["kernel"],
    **flax_ffn_weights(layer["mlp"]),
  }


def flax_weights(params, num_layers):
  """Neutral LM weights from CoECausalLM params (either layer layout)."""

  def layer(i):  # per-layer trees `layers_i`, or `layers` stacked on a leading [layers] axis
    if f"layers_{i}" in params:
      return jax.tree.map(np.asarray, params[f"layers_{i}"])
    return jax.tree.map(lambda a: np.asarray(a)[i], params["layers"])

  layers = [flax_layer_weights(layer(i)) for i in range(num_layers)]
  return {
    "embed": params["embed_tokens"]["embedding"],
    "layers": layers,
    "norm": params["norm"]["scale"],
    "head": params["lm_head"]["kernel"],
  }


def hf_weights(sd, hf):
  """Neutral LM weights straight from a torch-layout ([out, in]) state dict."""

  def lin(name):
    return f64(sd[name]).T

  layers = []
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    if hf["use_igate"]:
      router = np.stack([f64(sd[f"{p}mlp.gate.{t}.weight"]) for t in range(hf["inner_iter"])])
    else:
      router = f64(sd[f"{p}mlp.gate.weight"])[None]
    shared = None
    if hf.get("n_shared_experts"):
      shared = tuple(
        lin(f"{p}mlp.shared_experts.{proj}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj")
      )
    experts = {
      proj: np.stack(
        [lin(f"{p}mlp.experts.{j}.{proj}.weight") for j in range(hf["n_routed_experts"])]
      )
      for proj in ("gate_proj", "up_proj", "down_proj")
    }
    layers.append(
      {
        "input_norm": f64(sd[p + "input_layernorm.weight"]),
        "q": lin(p + "self_attn.q_proj.weight"),
        "kv_a": lin(p + "self_attn.kv_a_proj_with_mqa.weight"),
        "kv_norm": f64(sd[p + "self_attn.kv_a_layernorm.weight"]),
        "kv_b": lin(p + "self_attn.kv_b_proj.weight"),
        "o": lin(p + "self_attn.o_proj.weight"),
        "ffn_norm": f64(sd[p + "post_attention_layernorm.weight"]),
        "router": router,
        "gate": experts["gate_proj"],
        "up": experts["up_proj"],
        "down": experts["down_proj"],
        "shared": shared,
      }
    )
  return {
    "embed": f64(sd["model.embed_tokens.weight"]),
    "layers": layers,
    "norm": f64(sd["model.norm.weight"]),
    "head": lin("lm_head.weight"),
  }


def flat_hparams(hp):
  """`hp` as a namespace of flat names: `hp.to_dict()` where it has one (a ModelConfig)."""
  return SimpleNamespace(**hp.to_dict()) if hasattr(hp, "to_dict") else hp


def hf_hparams(hf, **ours):
  """A `hp` namespace straight from the authors' config.json names (plus our own knobs)."""
  rope_cfg = hf.get("rope_scaling") or {}
  values = dict(
    num_heads=hf["num_attention_heads"],
    qk_nope_head_dim=hf["qk_nope_head_dim"],
    qk_rope_head_dim=hf["qk_rope_head_dim"],
    v_head_dim=hf["v_head_dim"],
    kv_lora_rank=hf["kv_lora_rank"],
    rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
    rope_theta=hf.get("rope_theta", 10000.0),
    rope_scaling="yarn" if rope_cfg else "none",
    rope_factor=rope_cfg.get("factor", 1.0),
    rope_original_max_position=rope_cfg.get("original_max_position_embeddings", 4096),
    rope_beta_fast=rope_cfg.get("beta_fast", 32),
    rope_beta_slow=rope_cfg.get("beta_slow", 1),
    rope_mscale=rope_cfg.get("mscale", 1.0),
    rope_mscale_all_dim=rope_cfg.get("mscale_all_dim", 0.0),
    num_experts_per_tok=hf["num_experts_per_tok"],
    n_routed_experts=hf["n_routed_experts"],
    num_iterations=hf["inner_iter"],
    independent_gates=hf["use_igate"],
    inner_residual=hf["inner_residual"],
    outer_residual=hf["outer_residual"],
    residual_style="reference",
    norm_topk_prob=hf.get("norm_topk_prob", False),
    routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
    aux_loss_alpha=hf.get("aux_loss_alpha", 0.001),
    min_capacity=4,
  )
  values.update(ours)
  return SimpleNamespace(**values)


def random_params(init_fn, *args, seed=0, std=0.3, router_std=0.5):
  """Random float32 params with the structure `init_fn(key, *args)` would create.

  Only the shapes come from the library (`jax.eval_shape`, nothing compiled);
  every value is drawn here: N(0, std) for matrices, N(0, router_std) for
  routers, 1 + N(0, 0.3) for RMSNorm scales (so that the scales are exercised).
  """
  shapes = flax.core.meta.unbox(jax.eval_shape(init_fn, jax.random.key(0), *args))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      value = 1.0 + 0.3 * rng.normal(size=leaf.shape)
    elif name == "router":
      value = router_std * rng.normal(size=leaf.shape)
    else:
      value = std * rng.normal(size=leaf.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)
