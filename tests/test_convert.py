"""Tests for coe_jax.inference.convert: the authors' Hugging Face layout <-> our params."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax.core.meta import unbox

from coe_jax.inference.convert import from_hf, to_hf
from coe_jax.nn.model import CoECausalLM, stack_layers
from coe_jax.nn.model_config import ConfigError, ModelConfig

B, S = 2, 7
# Our float32 logits against the float64 reference: float32 rounding only, no dropped tokens.
F32 = dict(rtol=1e-5, atol=1e-5)


def _hf_config(**changes):
  """A config.json dict in the authors' names (DeepSeek-V2 fields plus the CoE switches)."""
  hf = {
    "architectures": ["CoeForCausalLM"],
    "model_type": "coe_deepseekv2",
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": None,
    "kv_lora_rank": 8,
    "qk_nope_head_dim": 4,
    "qk_rope_head_dim": 4,
    "v_head_dim": 6,
    "n_routed_experts": 5,
    "n_shared_experts": 2,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 6,
    "intermediate_size": 24,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "inner_iter": 2,
    "use_igate": True,
    "inner_residual": True,
    "outer_residual": False,
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "rope_scaling": {
      "type": "yarn",
      "factor": 40,
      "original_max_position_embeddings": 4096,
      "beta_fast": 32,
      "beta_slow": 1,
      "mscale": 0.707,
      "mscale_all_dim": 0.707,
    },
  }
  hf.update(changes)
  return hf


def _random_state_dict(hf, seed=0, std=0.3):
  """Random weights under the reference's names, torch Linear layout [out, in]."""
  rng = np.random.default_rng(seed)
  d, V, H = hf["hidden_size"], hf["vocab_size"], hf["num_attention_heads"]
  nope, rope, vd, r = (
    hf["qk_nope_head_dim"],
    hf["qk_rope_head_dim"],
    hf["v_head_dim"],
    hf["kv_lora_rank"],
  )
  f, N = hf["moe_intermediate_size"], hf["n_routed_experts"]
  fs = f * (hf.get("n_shared_experts") or 0)

  def w(*shape):
    return (std * rng.normal(size=shape)).astype(np.float32)

  def norm(n):
    return (1 + 0.3 * rng.normal(size=(n,))).astype(np.float32)

  sd = {
    "model.embed_tokens.weight": w(V, d),
    "model.norm.weight": norm(d),
    "lm_head.weight": w(V, d),
  }
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    sd.update(
      {
        p + "input_layernorm.weight": norm(d),
        p + "post_attention_layernorm.weight": norm(d),
        p + "self_attn.q_proj.weight": w(H * (nope + rope), d),
        p + "self_attn.kv_a_proj_with_mqa.weight": w(r + rope, d),
        p + "self_attn.kv_a_layernorm.weight": norm(r),
        p + "self_attn.kv_b_proj.weight": w(H * (nope + vd), r),
        p + "self_attn.o_proj.weight": w(d, H * vd),
      }
    )
    if hf["use_igate"]:
      for t in range(hf["inner_iter"]):
        sd[p + f"mlp.gate.{t}.weight"] = w(N, d) * 2
    else:
      sd[p + "mlp.gate.weight"] = w(N, d) * 2
    for j in range(N):
      sd[p + f"mlp.experts.{j}.gate_proj.weight"] = w(f, d)
      sd[p + f"mlp.experts.{j}.up_proj.weight"] = w(f, d)
      sd[p + f"mlp.experts.{j}.down_proj.weight"] = w(d, f)
    if fs:
      sd[p + "mlp.shared_experts.gate_proj.weight"] = w(fs, d)
      sd[p + "mlp.shared_experts.up_proj.weight"] = w(fs, d)
      sd[p + "mlp.shared_experts.down_proj.weight"] = w(d, fs)
  return sd


@functools.lru_cache(maxsize=None)
def _logits_fn(cfg):
  return ref.fast_jit(lambda params, ids: CoECausalLM(cfg).apply({"params": params}, ids)[0])


def _ids(vocab, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=(B, S)).astype(np.int32)


@pytest.mark.parametrize(
  "variant", ["igate-shared2-yarn", "shared_gate-outer-noshared-norope", "yarn-keys-omitted"]
)
def test_reference_state_dict_loads_and_matches_numpy(variant):
  if variant == "igate-shared2-yarn":
    hf = _hf_config()
  elif variant == "yarn-keys-omitted":
    # rope_scaling with only the required keys: the reference's YaRN defaults apply
    # (original_max_position_embeddings 4096, beta_fast 32, beta_slow 1, mscale 1,
    # mscale_all_dim 0, i.e. no softmax-scale correction).
    hf = _hf_config(rope_scaling={"type": "yarn", "factor": 8.0})
  else:
    hf = _hf_config(
      use_igate=False,
      outer_residual=True,
      n_shared_experts=None,
      rope_scaling=None,
      inner_iter=3,
      norm_topk_prob=True,
      routed_scaling_factor=1.5,
    )
  sd = _random_state_dict(hf)
  model, variables = from_hf(hf, sd)  # dropless by default: the authors' routing
  cfg = model.config
  assert cfg.coe.dispatch == "dropless"
  assert (cfg.coe.num_iterations, cfg.coe.independent_gates, cfg.coe.n_routed_experts) == (
    hf["inner_iter"],
    hf["use_igate"],
    5,
  )
  assert cfg.coe.n_shared_experts == (hf["n_shared_experts"] or 0)
  ids = _ids(hf["vocab_size"])
  logits = _logits_fn(cfg)(variables["params"], jnp.asarray(ids))
  want, _, _ = ref.lm_forward(ref.hf_weights(sd, hf), ref.hf_hparams(hf), ids)
  assert np.abs(want).std() > 0.5
  np.testing.assert_allclose(np.asarray(logits), want, **F32)
  # Our shapes are exactly what the model itself would create.
  expected = unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ids)))["params"]
  assert jax.tree.map(lambda a: a.shape, variables["params"]) == jax.tree.map(
    lambda a: a.shape, expected
  )


def test_to_hf_then_from_hf_round_trip():
  cfg = ModelConfig().replace(
    vocab_size=40,
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=6,
    n_routed_experts=5,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=6,
    num_iterations=3,
    dispatch="dropless",
    initializer_range=0.2,
    norm_topk_prob=True,
    routed_scaling_factor=2.0,
    aux_loss_alpha=0.01,
  )
  params = ref.random_params(CoECausalLM(cfg).init, jnp.zeros((B, S), jnp.int32), seed=1)
  hf, sd = to_hf(CoECausalLM(cfg), {"params": params})
  # The reference's names, exactly.
  names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
  for i in range(2):
    p = f"model.layers.{i}."
    names |= {
      p + n
      for n in (
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight",
        "self_attn.kv_a_layernorm.weight",
        "self_attn.kv_b_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.shared_experts.gate_proj.weight",
        "mlp.shared_experts.up_proj.weight",
        "mlp.shared_experts.down_proj.weight",
      )
    }
    names |= {f"{p}mlp.gate.{t}.weight" for t in range(3)}
    names |= {
      f"{p}mlp.experts.{j}.{proj}.weight"
      for j in range(5)
      for proj in ("gate_proj", "up_proj", "down_proj")
    }
  assert set(sd) == names
  assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (2 * 8, 16)  # torch [out, in]
  assert sd["model.layers.1.mlp.experts.4.down_proj.weight"].shape == (16, 6)
  np.testing.assert_array_equal(
    sd["model.layers.1.mlp.experts.4.down_proj.weight"],
    np.asarray(stack_layers(params)["layers"]["mlp"]["routed_experts"]["down_proj"][1, 4]).T,
  )
  assert (hf["inner_iter"], hf["use_igate"], hf["n_routed_experts"], hf["n_shared_experts"]) == (
    3,
    True,
    5,
    1,
  )
  # The numpy forward straight from the exported torch-layout weights matches our model.
  ids = _ids(40, 2)
  logits = _logits_fn(cfg)(params, jnp.asarray(ids))
  want, _, _ = ref.lm_forward(ref.hf_weights(sd, hf), ref.hf_hparams(hf), ids)
  np.testing.assert_allclose(np.asarray(logits), want, **F32)
  assert (hf["model_type"], hf["auto_map"]["AutoModelForCausalLM"]) == (
    "coe_deepseekv2",
    "modeling_coe.CoeForCausalLM",
  )

  model2, variables2 = from_hf(hf, sd)
  assert model2.config == cfg
  assert jax.tree.structure(variables2["params"]) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(variables2["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  logits2 = _logits_fn(model2.config)(variables2["params"], jnp.asarray(ids))
  np.testing.assert_array_equal(np.asarray(logits2), np.asarray(logits))
  # The stacked layout (scan_layers=True) imports and exports the same weights.
  model3, variables3 = from_hf(hf, sd, scan_layers=True)
  assert model3.config == cfg.replace(scan_layers=True) and "layers" in variables3["params"]
  for a, b in zip(jax.tree.leaves(variables3["params"]), jax.tree.leaves(stack_layers(params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  hf3, sd3 = to_hf(model3, variables3)
  assert hf3 == hf and set(sd3) == set(sd)
  for name in sd:
    np.testing.assert_array_equal(sd3[name], sd[name], err_msg=name)


def test_missing_weights_raise_key_error_naming_them():
  hf = _hf_config()
  sd = _random_state_dict(hf)
  del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
  del sd["model.layers.0.mlp.gate.1.weight"]
  with pytest.raises(KeyError) as err:
    from_hf(hf, sd)
  assert "model.layers.1.mlp.experts.3.up_proj.weight" in str(err.value)
  assert "model.layers.0.mlp.gate.1.weight" in str(err.value)
  # A shared-gate checkpoint lacks the per-iteration gates an independent-gate config needs.
  sd = _random_state_dict(_hf_config(use_igate=False))
  with pytest.raises(KeyError, match=r"mlp\.gate\.0\.weight"):
    from_hf(_hf_config(use_igate=True), sd)


@pytest.mark.parametrize(
  "changes,field",
  [
    (dict(q_lora_rank=64), "q_lora_rank"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(num_experts_per_tok=6), "num_experts_per_tok"),  # K > n_routed_experts
  ],
)
def test_unsupported_config_values_raise_config_error(changes, field):
  hf = _hf_config(**changes)
  with pytest.raises(ConfigError, match=field):
    from_hf(hf, _random_state_dict(_hf_config()))


def test_import_routes_dropless_by_default_and_capacity_is_an_override():
  # Seed 2 is a case where the eval capacity factor 2.0 drops assignments (~3% of them).
  hf = _hf_config()
  sd, ids = _random_state_dict(hf, seed=2), _ids(hf["vocab_size"], seed=2)
  weights, hp = ref.hf_weights(sd, hf), ref.hf_hparams(hf)
  dropless, _, _ = ref.lm_forward(weights, hp, ids)
  capped, _, infos = ref.lm_forward(weights, hp, ids, capacity_factor=2.0)
  assert not all(np.all(kept) for info in infos for kept in info["kept"])
  model, variables = from_hf(hf, sd)
  assert model.config.coe.dispatch == "dropless"
  logits = np.asarray(_logits_fn(model.config)(variables["params"], jnp.asarray(ids)))
  np.testing.assert_allclose(logits, dropless, **F32)
  model, variables = from_hf(hf, sd, dispatch="capacity")
  assert (model.config.coe.dispatch, model.config.coe.capacity_factor_eval) == ("capacity", 2.0)
  capacity_logits = np.asarray(_logits_fn(model.config)(variables["params"], jnp.asarray(ids)))
  np.testing.assert_allclose(capacity_logits, capped, **F32)
  assert np.abs(capacity_logits - dropless).max() > 1e-3


def _deepseek_v2_config(**changes):
  """A plain DeepSeek-V2 config.json: no CoE switches, one gate per layer."""
  hf = _hf_config(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], **changes)
  for key in ("inner_iter", "use_igate", "inner_residual", "outer_residual"):
    if key not in changes:
      del hf[key]
  return hf


def test_deepseek_v2_config_imports_as_one_pass_with_its_residual():
  hf = _deepseek_v2_config()
  # What DeepSeek-V2's decoder layer computes: out = h + routed(norm(h)) + shared(norm(h)).
  as_coe = {
    **hf,
    "inner_iter": 1,
    "use_igate": False,
    "inner_residual": False,
    "outer_residual": True,
  }
  sd = _random_state_dict(as_coe)
  assert "model.layers.0.mlp.gate.weight" in sd
  model, variables = from_hf(hf, sd)
  cfg = model.config
  assert (
    cfg.coe.num_iterations,
    cfg.coe.independent_gates,
    cfg.coe.inner_residual,
    cfg.coe.outer_residual,
    cfg.coe.dispatch,
  ) == (1, False, False, True, "dropless")
  ids = _ids(hf["vocab_size"])
  logits = _logits_fn(cfg)(variables["params"], jnp.asarray(ids))
  want, _, _ = ref.lm_forward(ref.hf_weights(sd, as_coe), ref.hf_hparams(as_coe), ids)
  np.testing.assert_allclose(np.asarray(logits), want, **F32)
  # Keys that agree with DeepSeek-V2's computation are accepted.
  assert from_hf(_deepseek_v2_config(inner_iter=1, outer_residual=True), sd)[0].config == cfg


@pytest.mark.parametrize(
  "changes,message",
  [
    (dict(inner_iter=2), "config.json inner_iter: got 2 with model_type 'deepseek_v2'"),
    (
      dict(inner_residual=True),
      "config.json inner_residual: got True with model_type 'deepseek_v2'",
    ),
  ],
)
def test_deepseek_v2_config_with_a_chain_is_refused(changes, message):
  with pytest.raises(ConfigError, match="coe_deepseekv2") as error:
    from_hf(_deepseek_v2_config(**changes), {})
  assert message in str(error.value)


@pytest.mark.parametrize("model_type", [None, "llama"])
def test_unknown_model_type_is_refused(model_type):
  hf = _hf_config(model_type=model_type)
  with pytest.raises(
    ConfigError,
    match=r"config.json model_type: got .*; allowed values: "
    r"coe_deepseekv2, deepseek_v2",
  ):
    from_hf(hf, {})
