"""Tests for configs/*.py: every paper run loads at both scales, counts match hand counts, tiny keeps ratios.

Analytic only: no paper-size model is ever initialised here.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from coe_jax import config_lib
from coe_jax.nn.params import count_params
from coe_jax.training import train_config
from experiments.ablation import SUITES, load_config, memory_saving_percent

PAPER_RUNS = SUITES["paper"]

# The paper's runs by hand: (C, routed experts chosen K, routed experts, shared experts, layers,
# independent gates). N=64 is 63 routed + 1 shared; dense-style K=N=8 is 8 routed, no shared (DESIGN.md 7).
HAND = {
  "moe_k8": (1, 8, 63, 1, 4, True),
  "coe_c2": (2, 4, 63, 1, 4, True),
  "coe_c2_k8": (2, 8, 63, 1, 4, True),
  "moe_k16": (1, 16, 63, 1, 4, True),
  "moe_k24": (1, 24, 63, 1, 4, True),
  "coe_c2_n48": (2, 4, 47, 1, 4, True),
  "moe_k8_n48": (1, 8, 47, 1, 4, True),
  "moe_k8_l8": (1, 8, 63, 1, 8, True),
  "moe_k8_l12": (1, 8, 63, 1, 12, True),
  "coe_c2_k8_outer_residual": (2, 8, 63, 1, 4, True),
  "coe_c2_k8_shared_gate": (2, 8, 63, 1, 4, False),
  "dense_c1": (1, 8, 8, 0, 4, True),
  "dense_c2": (2, 8, 8, 0, 4, True),
}

# Paper-scale sizes (DESIGN.md 5): hidden, expert width, vocabulary, MLA dims.
HIDDEN, FFN, VOCAB, HEADS = 1024, 704, 102400, 8
KV_RANK, NOPE, ROPE, V_DIM = 512, 128, 64, 128


def hand_count(
  c: int, k: int, routed: int, shared: int, layers: int, independent: bool
) -> tuple[int, int]:
  """(total, active per token) parameters of a paper-scale run, written out from DESIGN.md 5."""
  expert = 3 * HIDDEN * FFN  # gate, up, down
  attention = (
    HIDDEN * HEADS * (NOPE + ROPE)  # q projection
    + HIDDEN * (KV_RANK + ROPE)
    + KV_RANK  # kv down projection and its norm
    + KV_RANK * HEADS * (NOPE + V_DIM)  # kv up projection
    + HEADS * V_DIM * HIDDEN
  )  # output projection
  routers = (c if independent else 1) * routed * HIDDEN
  norms_per_layer = 2 * HIDDEN  # before attention and before the experts
  per_layer_fixed = attention + shared * expert + routers + norms_per_layer
  fixed = 2 * VOCAB * HIDDEN + HIDDEN + layers * per_layer_fixed  # embedding, head, final norm
  total = fixed + layers * routed * expert
  active = fixed + layers * min(c * k, routed) * expert
  return total, active


@pytest.mark.parametrize("scale", config_lib.SCALES)
@pytest.mark.parametrize("name", PAPER_RUNS)
def test_config_loads_and_validates(name, scale):
  config = load_config(name, scale)
  model_config = train_config.validate_config(config)
  assert config.scale == scale
  assert model_config.coe.num_iterations == config.paper.c
  # The paper's runs are the reference's: dropless routing and end-of-text targets (DESIGN.md 3, 6).
  assert model_config.coe.dispatch == "dropless"
  assert config.data.eos_target
  assert config.train.paper_val == (scale == "paper")


def test_suite_lists_every_paper_config_file():
  from experiments.ablation import CONFIG_DIR

  on_disk = {p.stem for p in CONFIG_DIR.glob("*.py")} - {"base", "demo", "__init__"}
  assert set(PAPER_RUNS) == on_disk


@pytest.mark.parametrize("name", PAPER_RUNS)
def test_paper_scale_counts_match_hand_counts(name):
  counts = count_params(config_lib.model_config_from(load_config(name, "paper")))
  total, active = hand_count(*HAND[name])
  assert counts.total == total
  assert counts.active_per_token == active


def test_moe_baseline_routed_experts_are_the_papers_544m():
  counts = count_params(config_lib.model_config_from(load_config("moe_k8", "paper")))
  assert counts.routed_experts == 4 * 63 * 3 * 1024 * 704 == 544_997_376


def test_n48_memory_saving_is_the_papers_17_6_percent():
  """Total parameters (embeddings and head included) give ~17.7%, within 0.5 point of 17.6%."""
  coe, moe = (
    count_params(config_lib.model_config_from(load_config(n, "paper")))
    for n in ("coe_c2_n48", "moe_k8")
  )
  saving = memory_saving_percent(coe.total, moe.total)
  assert abs(saving - 17.6) < 0.5
  by_hand = [hand_count(*HAND[n])[0] for n in ("coe_c2_n48", "moe_k8")]
  assert saving == pytest.approx(memory_saving_percent(*by_hand))


def _shape(name: str, scale: str) -> tuple[int, Fraction, int]:
  """(C, K / N with the shared expert counted in N, layers) of a config at a scale."""
  model = load_config(name, scale).model
  n = model.n_routed_experts + model.n_shared_experts
  return model.num_iterations, Fraction(model.num_experts_per_tok, n), model.num_layers


@pytest.mark.parametrize("name", PAPER_RUNS)
def test_tiny_keeps_c_and_k_over_n(name):
  paper_c, paper_ratio, _ = _shape(name, "paper")
  tiny_c, tiny_ratio, _ = _shape(name, "tiny")
  assert tiny_c == paper_c
  assert tiny_ratio == paper_ratio


@pytest.mark.parametrize("name", PAPER_RUNS)
def test_tiny_keeps_layer_ratio_to_the_baseline(name):
  paper_layers, tiny_layers = _shape(name, "paper")[2], _shape(name, "tiny")[2]
  paper_base, tiny_base = _shape("moe_k8", "paper")[2], _shape("moe_k8", "tiny")[2]
  assert Fraction(tiny_layers, tiny_base) == Fraction(paper_layers, paper_base)


@pytest.mark.parametrize("name", PAPER_RUNS)
def test_configs_differ_from_the_baseline_only_in_model_fields_the_paper_varies(name):
  varied = {
    "num_iterations",
    "num_experts_per_tok",
    "n_routed_experts",
    "n_shared_experts",
    "num_layers",
    "outer_residual",
    "independent_gates",
  }
  for scale in config_lib.SCALES:
    base, config = load_config("moe_k8", scale), load_config(name, scale)
    assert config.train.to_dict() == base.train.to_dict()
    assert config.data.to_dict() == base.data.to_dict()
    changed = {k for k in base.model.keys() if base.model[k] != config.model[k]}
    assert changed <= varied
