"""Tests for coe_jax.analysis: every statistic against hand-made routing with known answers
or a plain numpy loop (the model-facing parts are in test_analysis_model.py)."""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure

from coe_jax import analysis

N = 6  # routed experts of the hand-made routing


def make_routing(
  expert_ids, num_experts=N, probs=None, kept=None, token_mask=None, weights=None
) -> analysis.Routing:
  """A Routing from ids [L, C, b, s, K]; uniform probs, everything kept, all tokens real."""
  ids = np.asarray(expert_ids, np.int32)
  shape = ids.shape
  if probs is None:
    probs = np.full(shape[:4] + (num_experts,), 1.0 / num_experts, np.float32)
  if weights is None:
    weights = np.take_along_axis(np.asarray(probs), ids, axis=-1)
  mask = np.ones(shape[2:4], bool) if token_mask is None else np.asarray(token_mask, bool)
  if kept is None:
    kept = np.broadcast_to(mask[None, None, :, :, None], shape)
  return analysis.Routing(
    expert_ids=ids,
    combine_weights=np.asarray(weights, np.float32),
    kept=np.asarray(kept, bool),
    router_probs=np.asarray(probs, np.float32),
    token_mask=mask,
  )


def random_routing(
  seed=0, layers=2, chain=2, batch=3, seq=5, k=2, num_experts=N, pad_last=2
) -> analysis.Routing:
  """Random distinct-per-token ids, Dirichlet probs, random drops, `pad_last` padded positions."""
  rng = np.random.default_rng(seed)
  ids = np.argsort(rng.random((layers, chain, batch, seq, num_experts)), axis=-1)[..., :k]
  probs = rng.dirichlet(np.ones(num_experts), size=(layers, chain, batch, seq))
  mask = np.ones((batch, seq), bool)
  mask[:, seq - pad_last :] = False
  kept = (rng.random(ids.shape) < 0.7) & mask[None, None, :, :, None]
  return make_routing(ids, num_experts, probs=probs, kept=kept, token_mask=mask)


# ----------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------


def test_load_of_known_routing():
  # One layer, one iteration, K=1 over N=2: three tokens pick expert 0, one picks expert 1.
  routing = make_routing(np.array([0, 0, 0, 1]).reshape(1, 1, 1, 4, 1), num_experts=2)
  load = analysis.expert_load(routing)
  np.testing.assert_array_equal(load.counts[0, 0], [3, 1])
  np.testing.assert_allclose(load.fraction[0, 0], [0.75, 0.25])
  np.testing.assert_allclose(load.cv[0, 0], 0.5)  # std [3, 1] = 1, mean 2
  np.testing.assert_allclose(load.max_over_mean[0, 0], 1.5)


def test_balanced_load_has_zero_cv():
  # Token s picks experts (s, s+1) mod N: every expert is chosen exactly twice.
  ids = np.stack([np.arange(N), (np.arange(N) + 1) % N], axis=-1).reshape(1, 1, 1, N, 2)
  load = analysis.expert_load(make_routing(ids))
  np.testing.assert_array_equal(load.counts, np.full((1, 1, N), 2.0))
  np.testing.assert_allclose(load.cv, 0.0)
  np.testing.assert_allclose(load.max_over_mean, 1.0)


def test_load_against_numpy_loop():
  routing = random_routing(seed=1)
  expected = np.zeros((2, 2, N))
  for l, t, b, s, slot in np.ndindex(routing.expert_ids.shape):
    if routing.token_mask[b, s]:
      expected[l, t, routing.expert_ids[l, t, b, s, slot]] += 1
  load = analysis.expert_load(routing)
  np.testing.assert_array_equal(load.counts, expected)
  np.testing.assert_allclose(load.cv, expected.std(-1) / expected.mean(-1))
  np.testing.assert_allclose(load.max_over_mean, expected.max(-1) / expected.mean(-1))
  np.testing.assert_allclose(load.fraction.sum(-1), 1.0)


# ----------------------------------------------------------------------------
# Entropy and confidence
# ----------------------------------------------------------------------------


def test_uniform_router_has_entropy_log_n():
  routing = make_routing(np.zeros((2, 2, 2, 3, 2), int) + [0, 1])
  confidence = analysis.router_confidence(routing)
  np.testing.assert_allclose(confidence.entropy, math.log(N), rtol=1e-6)
  np.testing.assert_allclose(confidence.normalized_entropy, 1.0, rtol=1e-6)
  np.testing.assert_allclose(confidence.top1_weight, 1.0 / N, rtol=1e-6)


def test_one_hot_router_has_zero_entropy_and_full_confidence():
  ids = np.zeros((1, 1, 1, 4, 1), int)
  probs = np.zeros((1, 1, 1, 4, N))
  probs[..., 0] = 1.0
  confidence = analysis.router_confidence(make_routing(ids, probs=probs))
  np.testing.assert_allclose(confidence.entropy, 0.0, atol=1e-12)
  np.testing.assert_allclose(confidence.top1_weight, 1.0)


def test_entropy_against_numpy_over_real_tokens_only():
  routing = random_routing(seed=2)
  real = routing.token_mask
  probs = routing.router_probs.astype(np.float64)
  expected = np.zeros((2, 2))
  top1 = np.zeros((2, 2))
  for l, t in np.ndindex(2, 2):
    p = probs[l, t][real]
    expected[l, t] = np.mean(-(p * np.log(p)).sum(-1))
    top1[l, t] = routing.combine_weights[l, t][real][:, 0].mean()
  confidence = analysis.router_confidence(routing)
  np.testing.assert_allclose(confidence.entropy, expected, rtol=1e-6)
  np.testing.assert_allclose(confidence.top1_weight, top1, rtol=1e-6)


# ----------------------------------------------------------------------------
# Co-selection and re-selection
# ----------------------------------------------------------------------------


def test_identical_routing_in_both_iterations_reselects_every_token():
  first = np.array([[0, 1], [2, 3], [4, 5], [0, 5]])
  ids = np.stack([first, first[:, ::-1]]).reshape(1, 2, 1, 4, 2)  # same sets, other order
  routing = make_routing(ids)
  again = analysis.reselection(routing)
  np.testing.assert_allclose(again.rate, 1.0)
  np.testing.assert_allclose(again.rate_any_earlier, 1.0)
  np.testing.assert_allclose(again.mean_overlap, 2.0)
  co = analysis.co_selection(routing)
  np.testing.assert_allclose(co.diagonal[0, 0], 1.0)  # every expert was chosen at least once
  np.testing.assert_allclose(co.conditional[0, 0].sum(-1), 2.0)  # rows sum to K


def test_disjoint_routing_never_reselects():
  ids = np.stack([np.array([[0, 1], [2, 3]]), np.array([[4, 5], [0, 1]])]).reshape(1, 2, 1, 2, 2)
  routing = make_routing(ids)
  again = analysis.reselection(routing)
  np.testing.assert_allclose(again.rate, 0.0)
  np.testing.assert_allclose(again.mean_overlap, 0.0)
  np.testing.assert_allclose(analysis.co_selection(routing).diagonal, 0.0)


def test_partial_overlap_rate_and_mean_overlap():
  # Token A: {0,1} -> {1,2} shares one expert; token B: {0,1} -> {2,3} shares none.
  ids = np.array([[[0, 1], [0, 1]], [[1, 2], [2, 3]]]).reshape(1, 2, 1, 2, 2)
  again = analysis.reselection(make_routing(ids))
  np.testing.assert_allclose(again.rate, [[0.5]])
  np.testing.assert_allclose(again.mean_overlap, [[0.5]])


def test_reselection_against_any_earlier_iteration():
  # C=3, K=1: the token uses expert 0, then 1, then 0 again.
  ids = np.array([0, 1, 0]).reshape(1, 3, 1, 1, 1)
  again = analysis.reselection(make_routing(ids))
  np.testing.assert_allclose(again.rate, [[0.0, 0.0]])
  np.testing.assert_allclose(again.rate_any_earlier, [[0.0, 1.0]])


def test_co_selection_against_numpy_loop():
  routing = random_routing(seed=3, chain=3)
  expected = np.zeros((2, 2, N, N))
  for l, t, b, s in np.ndindex(2, 2, 3, 5):
    if routing.token_mask[b, s]:
      for i in routing.expert_ids[l, t, b, s]:
        for j in routing.expert_ids[l, t + 1, b, s]:
          expected[l, t, i, j] += 1
  co = analysis.co_selection(routing)
  np.testing.assert_array_equal(co.counts, expected)
  load_t = analysis.expert_load(routing).counts[:, :-1]
  np.testing.assert_allclose(co.conditional * load_t[..., None], expected)


def test_reselection_against_numpy_loop():
  routing = random_routing(seed=4, chain=3, k=3)
  rate = np.zeros((2, 2))
  rate_any = np.zeros((2, 2))
  overlap = np.zeros((2, 2))
  real = [(b, s) for b, s in np.ndindex(3, 5) if routing.token_mask[b, s]]
  for l, t in np.ndindex(2, 2):
    for b, s in real:
      now = set(routing.expert_ids[l, t + 1, b, s])
      shared = now & set(routing.expert_ids[l, t, b, s])
      earlier = set(routing.expert_ids[l, : t + 1, b, s].ravel())
      rate[l, t] += bool(shared) / len(real)
      rate_any[l, t] += bool(now & earlier) / len(real)
      overlap[l, t] += len(shared) / len(real)
  again = analysis.reselection(routing)
  np.testing.assert_allclose(again.rate, rate)
  np.testing.assert_allclose(again.rate_any_earlier, rate_any)
  np.testing.assert_allclose(again.mean_overlap, overlap)


def test_chance_levels_by_enumeration():
  n, k = 5, 2
  subsets = list(itertools.combinations(range(n), k))
  pairs = list(itertools.product(subsets, subsets))
  intersecting = sum(bool(set(a) & set(b)) for a, b in pairs) / len(pairs)
  overlap = sum(len(set(a) & set(b)) for a, b in pairs) / len(pairs)
  assert analysis.chance_reselection_rate(n, k) == pytest.approx(intersecting)
  ids = np.zeros((1, 2, 1, 1, k), int) + np.arange(k)
  again = analysis.reselection(make_routing(ids, num_experts=n))
  assert again.chance_overlap == pytest.approx(overlap)


# ----------------------------------------------------------------------------
# Combinations
# ----------------------------------------------------------------------------


def test_possible_combinations_of_the_paper_runs():
  # CoE(C=2, K=4) versus MoE(K=8) over N=64: C(64,4)^2 = 635376^2 against C(64,8) = 4426165368,
  # about 91x (not the 823x the issue quotes for the same formula).
  assert analysis.possible_combinations(64, 4, 2) == 635376**2
  assert analysis.possible_combinations(64, 8, 1) == 4426165368
  ratio = analysis.possible_combinations(64, 4, 2) / analysis.possible_combinations(64, 8, 1)
  assert ratio == pytest.approx(91.208, rel=1e-4)


def test_distinct_combinations_of_known_routing():
  # Tokens 0 and 1 use the same sets (slot order differs); token 2 differs only at t=1;
  # token 3 is padding with a set nobody else used.
  first = np.array([[0, 1], [1, 0], [0, 1], [4, 5]])
  second = np.array([[2, 3], [3, 2], [2, 4], [4, 5]])
  ids = np.stack([first, second]).reshape(1, 2, 1, 4, 2)
  combos = analysis.expert_combinations(make_routing(ids, token_mask=[[1, 1, 1, 0]]))
  np.testing.assert_array_equal(combos.distinct, [2])
  np.testing.assert_array_equal(combos.distinct_per_iteration, [[1, 2]])
  assert combos.num_tokens == 3
  assert combos.possible == math.comb(N, 2) ** 2
  assert combos.possible_per_iteration == math.comb(N, 2)


def test_distinct_combinations_against_python_sets():
  routing = random_routing(seed=5, chain=3, batch=6, seq=4, pad_last=1)
  combos = analysis.expert_combinations(routing)
  for l in range(2):
    used = {
      tuple(frozenset(routing.expert_ids[l, t, b, s]) for t in range(3))
      for b, s in np.ndindex(6, 4)
      if routing.token_mask[b, s]
    }
    assert combos.distinct[l] == len(used)


# ----------------------------------------------------------------------------
# Drops
# ----------------------------------------------------------------------------


def test_dropped_per_expert_ignores_padding():
  # K=1, N=2: tokens 0-2 pick expert 0 (token 2 dropped), token 3 picks 1 (kept),
  # token 4 is padding (not kept, but not dropped either).
  ids = np.array([0, 0, 0, 1, 1]).reshape(1, 1, 1, 5, 1)
  kept = np.array([1, 1, 0, 1, 0], bool).reshape(1, 1, 1, 5, 1)
  drops = analysis.dropped(
    make_routing(ids, num_experts=2, kept=kept, token_mask=[[1, 1, 1, 1, 0]])
  )
  np.testing.assert_array_equal(drops.counts[0, 0], [1, 0])
  np.testing.assert_allclose(drops.per_expert[0, 0], [1 / 3, 0])
  np.testing.assert_allclose(drops.fraction[0, 0], 1 / 4)


def test_padding_changes_no_statistic():
  routing = random_routing(seed=6, pad_last=2)
  real = routing.token_mask[0].sum()
  trimmed = analysis.Routing(
    expert_ids=routing.expert_ids[:, :, :, :real],
    combine_weights=routing.combine_weights[:, :, :, :real],
    kept=routing.kept[:, :, :, :real],
    router_probs=routing.router_probs[:, :, :, :real],
    token_mask=routing.token_mask[:, :real],
  )
  full, short = analysis.analyze(routing), analysis.analyze(trimmed)
  for name in ("load", "confidence", "co_selection", "reselection", "combinations", "drops"):
    for leaf_a, leaf_b in zip(
      jax.tree.leaves(vars(getattr(full, name))), jax.tree.leaves(vars(getattr(short, name)))
    ):
      np.testing.assert_allclose(leaf_a, leaf_b, err_msg=name)


# ----------------------------------------------------------------------------
# Tables and plots
# ----------------------------------------------------------------------------


def test_tables_are_tidy():
  routing = random_routing(seed=7)
  stats = analysis.analyze(routing)
  per_iteration = analysis.iteration_table(stats)
  assert len(per_iteration) == 2 * 2
  assert per_iteration.loc[per_iteration.iteration == 0, "reselection_rate"].isna().all()
  np.testing.assert_allclose(per_iteration.load_cv, stats.load.cv.ravel())
  np.testing.assert_allclose(
    per_iteration.loc[per_iteration.iteration == 1, "reselection_rate"],
    stats.reselection.rate[:, 0],
  )
  per_expert = analysis.expert_table(stats)
  assert len(per_expert) == 2 * 2 * N
  sums = per_expert.groupby(["layer", "iteration"]).load.sum()
  np.testing.assert_allclose(sums, routing.num_tokens * routing.k)
  per_layer = analysis.layer_table(stats)
  np.testing.assert_array_equal(per_layer.distinct_combinations, stats.combinations.distinct)


def test_plots_return_figures():
  stats = analysis.analyze(random_routing(seed=8, chain=2))
  load = analysis.plot_load(stats.load, layer=1)
  assert isinstance(load, Figure) and len(load.axes) == 2  # one panel per iteration
  heat = analysis.plot_co_selection(stats.co_selection, layer=0)
  np.testing.assert_allclose(
    heat.axes[0].images[0].get_array(), stats.co_selection.conditional[0, 0]
  )
  assert isinstance(analysis.plot_dropped(stats.drops), Figure)
  table = analysis.iteration_table(stats)
  summary = analysis.plot_iteration_summary({"a": table, "b": table})
  assert len(summary.axes) == len(analysis.plots.DEFAULT_SUMMARY_COLUMNS)


def test_co_selection_plot_needs_two_iterations():
  stats = analysis.analyze(random_routing(seed=9, chain=1))
  assert stats.co_selection.counts.shape == (2, 0, N, N)
  with pytest.raises(ValueError, match="C >= 2"):
    analysis.plot_co_selection(stats.co_selection)


# ----------------------------------------------------------------------------
# Building routing: from a layer's intermediates, from several batches
# ----------------------------------------------------------------------------


def test_routing_from_the_intermediates_of_a_single_coe_layer():
  # A bare CoELayer sows [C, batch, seq, ...] arrays (no layer axis), each in a 1-tuple.
  routing = random_routing(seed=12, layers=1)
  sown = {name: (getattr(routing, name)[0],) for name in analysis.routing.ROUTING_NAMES}
  rebuilt = analysis.routing_from_intermediates({"intermediates": sown}, routing.token_mask)
  for name in analysis.routing.ROUTING_NAMES + ("token_mask",):
    np.testing.assert_array_equal(getattr(rebuilt, name), getattr(routing, name))


def test_concatenate_routing_joins_batches():
  a, b = random_routing(seed=10), random_routing(seed=11)
  joined = analysis.concatenate_routing([a, b])
  np.testing.assert_allclose(
    analysis.expert_load(joined).counts,
    analysis.expert_load(a).counts + analysis.expert_load(b).counts,
  )
