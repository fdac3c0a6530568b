"""Routing statistics per layer and iteration, as numpy arrays and tidy pandas tables.

Every function takes a `Routing` (see `coe_jax.analysis.routing`) and counts
real tokens only: padding positions are neither routed load nor dropped.
Iterations are numbered from 0, as in the training metrics
(`train/load_cv_iter/0` is the first pass). Definitions:

* load: routed assignments (token, slot) per expert, whether or not they fitted
  in the expert's capacity; `cv` = std / mean over experts (population std,
  as `CoEAux.load_cv`), `max_over_mean` = busiest expert / mean.
* entropy: mean over tokens of -sum_e p_e log p_e (nats) of the router's
  softmax; log(N) for a uniform router. `top1_weight`: mean combine weight of
  the first choice (the top router probability unless `norm_topk_prob` or a
  routed scaling factor changes the weights).
* co-selection between iterations t and t+1: `counts[i, j]` = tokens that chose
  expert i at t and expert j at t+1; `conditional[i, j]` = counts[i, j] /
  load_t[i], the share of i's tokens that go on to j (each row sums to K).
* re-selection at iteration t >= 1: a token re-selects when one of its K experts
  at t was also among its K experts at t-1 (`rate`) or at any earlier iteration
  (`rate_any_earlier`; equal for C = 2); `mean_overlap` is the mean number of
  shared experts between t-1 and t (0..K). Chance levels are for K-subsets drawn
  uniformly and independently: rate 1 - C(N-K, K) / C(N, K), overlap K^2 / N.
* combinations: a token's combination is the ordered tuple of its expert sets
  (S_0, ..., S_{C-1}), each set unordered. `distinct` counts the different
  combinations the batch's tokens used, against the C(N, K)^C possible.
* drops: assignments of real tokens that did not fit in capacity, per expert.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
from jaxtyping import Float, Int

from coe_jax.analysis.routing import Routing


@dataclasses.dataclass(frozen=True, eq=False)
class LoadStats:
  """Expert load.

  Attributes:
    counts: <float>[layers, C, N] assignments of real tokens per expert.
    fraction: <float>[layers, C, N] counts / all assignments of the iteration.
    cv: <float>[layers, C] coefficient of variation of counts over experts.
    max_over_mean: <float>[layers, C] busiest expert's count / mean count.
  """

  counts: Float[np.ndarray, "layers iterations experts"]
  fraction: Float[np.ndarray, "layers iterations experts"]
  cv: Float[np.ndarray, "layers iterations"]
  max_over_mean: Float[np.ndarray, "layers iterations"]


@dataclasses.dataclass(frozen=True, eq=False)
class ConfidenceStats:
  """How sure the routers are.

  Attributes:
    entropy: <float>[layers, C] mean router entropy over real tokens (nats).
    normalized_entropy: <float>[layers, C] entropy / log(N) (1 = uniform router).
    top1_weight: <float>[layers, C] mean combine weight of the first choice.
  """

  entropy: Float[np.ndarray, "layers iterations"]
  normalized_entropy: Float[np.ndarray, "layers iterations"]
  top1_weight: Float[np.ndarray, "layers iterations"]


@dataclasses.dataclass(frozen=True, eq=False)
class CoSelection:
  """Which expert follows which between consecutive iterations.

  Attributes:
    counts: <float>[layers, C-1, N, N] tokens choosing i at t and j at t+1.
    conditional: <float>[layers, C-1, N, N] counts / tokens choosing i at t
      (0 for experts nobody chose at t); rows sum to K.
  """

  counts: Float[np.ndarray, "layers transitions experts experts"]
  conditional: Float[np.ndarray, "layers transitions experts experts"]

  @property
  def diagonal(self) -> Float[np.ndarray, "layers transitions experts"]:
    """<float>[layers, C-1, N] share of expert i's tokens at t that choose i again at t+1."""
    return np.diagonal(self.conditional, axis1=-2, axis2=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class Reselection:
  """Tokens that go back to an expert they already used.

  Attributes:
    rate: <float>[layers, C-1] share of tokens whose experts at t+1 intersect those at t.
    rate_any_earlier: <float>[layers, C-1] the same against every iteration <= t.
    mean_overlap: <float>[layers, C-1] mean |S_t ∩ S_{t+1}| over tokens (0..K).
    chance_rate: the rate for uniform independent routing, 1 - C(N-K, K) / C(N, K).
    chance_overlap: the overlap for uniform independent routing, K^2 / N.
  """

  rate: Float[np.ndarray, "layers transitions"]
  rate_any_earlier: Float[np.ndarray, "layers transitions"]
  mean_overlap: Float[np.ndarray, "layers transitions"]
  chance_rate: float
  chance_overlap: float


@dataclasses.dataclass(frozen=True, eq=False)
class Combinations:
  """Expert combinations used versus possible.

  Attributes:
    distinct: <int>[layers] distinct (S_0, ..., S_{C-1}) among the batch's tokens.
    distinct_per_iteration: <int>[layers, C] distinct sets S_t per iteration.
    num_tokens: real tokens (an upper bound on `distinct`).
    possible: C(N, K)^C, the combinations a layer can express.
    possible_per_iteration: C(N, K).
  """

  distinct: Int[np.ndarray, "layers"]
  distinct_per_iteration: Int[np.ndarray, "layers iterations"]
  num_tokens: int
  possible: int
  possible_per_iteration: int


@dataclasses.dataclass(frozen=True, eq=False)
class Drops:
  """Assignments dropped over capacity.

  Attributes:
    counts: <float>[layers, C, N] dropped assignments of real tokens per expert.
    per_expert: <float>[layers, C, N] counts / the expert's load (0 when unloaded).
    fraction: <float>[layers, C] dropped / all assignments (as `CoEAux.dropped_fraction`).
  """

  counts: Float[np.ndarray, "layers iterations experts"]
  per_expert: Float[np.ndarray, "layers iterations experts"]
  fraction: Float[np.ndarray, "layers iterations"]


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingStats:
  """Every statistic of one `Routing`; see the module docstring for definitions."""

  load: LoadStats
  confidence: ConfidenceStats
  co_selection: CoSelection
  reselection: Reselection
  combinations: Combinations
  drops: Drops

  @property
  def num_layers(self) -> int:
    return self.load.counts.shape[0]

  @property
  def num_iterations(self) -> int:
    return self.load.counts.shape[1]

  @property
  def num_experts(self) -> int:
    return self.load.counts.shape[2]


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, 0 where the denominator is 0."""
  numerator, denominator = np.broadcast_arrays(
    np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
  )
  out = np.zeros(numerator.shape)
  np.divide(numerator, denominator, out=out, where=denominator != 0)
  return out


def _count_per_expert(routing: Routing, selected: np.ndarray) -> np.ndarray:
  """<float>[layers, C, N]: real-token assignments per expert where `selected` [L, C, b, s, K]."""
  layers, chain = routing.num_layers, routing.num_iterations
  n = routing.num_experts
  ids = routing.real_tokens(routing.expert_ids)  # Shape: [L, C, tokens, K]
  group = np.arange(layers * chain).reshape(layers, chain, 1, 1) * n
  weights = routing.real_tokens(selected).astype(np.float64)
  counts = np.bincount((group + ids).ravel(), weights=weights.ravel(), minlength=layers * chain * n)
  return counts.reshape(layers, chain, n)


def expert_load(routing: Routing) -> LoadStats:
  """Load per expert, layer and iteration; see `LoadStats`."""
  counts = _count_per_expert(routing, np.ones(routing.expert_ids.shape, bool))
  mean = counts.mean(axis=-1)
  return LoadStats(
    counts=counts,
    fraction=_safe_divide(counts, counts.sum(-1, keepdims=True)),
    cv=_safe_divide(counts.std(axis=-1), mean),
    max_over_mean=_safe_divide(counts.max(axis=-1), mean),
  )


def router_confidence(routing: Routing) -> ConfidenceStats:
  """Router entropy and top-1 weight per layer and iteration; see `ConfidenceStats`."""
  probs = routing.real_tokens(routing.router_probs).astype(np.float64)  # Shape: [L, C, tokens, N]
  plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
  tokens = max(routing.num_tokens, 1)
  entropy = -plogp.sum(axis=(-1, -2)) / tokens
  top1 = routing.real_tokens(routing.combine_weights)[..., 0].astype(np.float64).sum(-1) / tokens
  return ConfidenceStats(
    entropy=entropy, top1_weight=top1, normalized_entropy=entropy / math.log(routing.num_experts)
  )


def co_selection(routing: Routing) -> CoSelection:
  """Expert i at iteration t followed by expert j at t+1; see `CoSelection`."""
  n, layers = routing.num_experts, routing.num_layers
  transitions = routing.num_iterations - 1
  ids = routing.real_tokens(routing.expert_ids)  # Shape: [L, C, tokens, K]
  pairs = ids[:, :-1, :, :, None] * n + ids[:, 1:, :, None, :]  # Shape: [L, C-1, tokens, K, K]
  group = np.arange(layers * transitions).reshape(layers, transitions, 1, 1, 1) * n * n
  counts = np.bincount((group + pairs).ravel(), minlength=layers * transitions * n * n)
  counts = counts.reshape(layers, transitions, n, n).astype(np.float64)
  chosen_at_t = expert_load(routing).counts[:, :-1, :, None]
  return CoSelection(counts=counts, conditional=_safe_divide(counts, chosen_at_t))


def _shared_experts(ids_a: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
  """Per token, how many of `ids_b` [..., K] appear in `ids_a` [..., K'] (ids unique per token)."""
  return (ids_b[..., :, None] == ids_a[..., None, :]).any(axis=-1).sum(axis=-1)


def reselection(routing: Routing) -> Reselection:
  """Tokens going back to experts they already used; see `Reselection`."""
  ids = routing.real_tokens(routing.expert_ids)  # Shape: [L, C, tokens, K]
  layers, chain, tokens, k = ids.shape
  n = routing.num_experts
  rate = np.zeros((layers, chain - 1))
  rate_any = np.zeros((layers, chain - 1))
  overlap = np.zeros((layers, chain - 1))
  for t in range(1, chain):
    shared_previous = _shared_experts(ids[:, t - 1], ids[:, t])  # Shape: [L, tokens]
    earlier = np.moveaxis(ids[:, :t], 1, -2).reshape(layers, tokens, t * k)
    shared_earlier = _shared_experts(earlier, ids[:, t])
    denominator = max(tokens, 1)
    rate[:, t - 1] = (shared_previous > 0).sum(-1) / denominator
    rate_any[:, t - 1] = (shared_earlier > 0).sum(-1) / denominator
    overlap[:, t - 1] = shared_previous.sum(-1) / denominator
  return Reselection(
    rate=rate,
    rate_any_earlier=rate_any,
    mean_overlap=overlap,
    chance_rate=chance_reselection_rate(n, k),
    chance_overlap=k * k / n,
  )


def chance_reselection_rate(num_experts: int, k: int) -> float:
  """P(two independent uniform K-subsets of N experts intersect) = 1 - C(N-K, K) / C(N, K)."""
  return 1.0 - math.comb(num_experts - k, k) / math.comb(num_experts, k)


def possible_combinations(num_experts: int, k: int, num_iterations: int) -> int:
  """C(N, K)^C: ordered choices of a K-subset per iteration (C = 1: plain MoE)."""
  return math.comb(num_experts, k) ** num_iterations


def _distinct_rows(rows: np.ndarray) -> int:
  return int(np.unique(rows, axis=0).shape[0]) if rows.shape[0] else 0


def expert_combinations(routing: Routing) -> Combinations:
  """Distinct expert combinations used per layer versus possible; see `Combinations`."""
  sets = np.sort(routing.real_tokens(routing.expert_ids), axis=-1)  # Shape: [L, C, tokens, K]
  layers, chain, tokens, k = sets.shape
  per_layer = np.moveaxis(sets, 1, 2).reshape(layers, tokens, chain * k)
  distinct = np.array([_distinct_rows(per_layer[l]) for l in range(layers)], np.int64)
  per_iteration = np.array(
    [[_distinct_rows(sets[l, t]) for t in range(chain)] for l in range(layers)], np.int64
  ).reshape(layers, chain)
  n = routing.num_experts
  return Combinations(
    distinct=distinct,
    distinct_per_iteration=per_iteration,
    num_tokens=tokens,
    possible=possible_combinations(n, k, chain),
    possible_per_iteration=math.comb(n, k),
  )


def dropped(routing: Routing) -> Drops:
  """Assignments of real tokens dropped over capacity; see `Drops`."""
  counts = _count_per_expert(routing, ~routing.kept)
  load = expert_load(routing).counts
  return Drops(
    counts=counts,
    per_expert=_safe_divide(counts, load),
    fraction=_safe_divide(counts.sum(-1), load.sum(-1)),
  )


def analyze(routing: Routing) -> RoutingStats:
  """Every statistic of `routing`."""
  return RoutingStats(
    load=expert_load(routing),
    confidence=router_confidence(routing),
    co_selection=co_selection(routing),
    reselection=reselection(routing),
    combinations=expert_combinations(routing),
    drops=dropped(routing),
  )


# ----------------------------------------------------------------------------
# Tidy tables
# ----------------------------------------------------------------------------


def _transition_column(values: np.ndarray, layer: int, t: int) -> float:
  """Value of a [layers, C-1] statistic for iteration t (NaN at t = 0, which follows nothing)."""
  return float(values[layer, t - 1]) if t > 0 else float("nan")


def iteration_table(stats: RoutingStats) -> pd.DataFrame:
  """One row per (layer, iteration): load CV and max/mean, entropy, top-1 weight,
  dropped fraction, re-selection against the previous iteration and distinct sets."""
  rows = []
  for layer in range(stats.num_layers):
    for t in range(stats.num_iterations):
      rows.append(
        dict(
          layer=layer,
          iteration=t,
          load_cv=stats.load.cv[layer, t],
          load_max_over_mean=stats.load.max_over_mean[layer, t],
          entropy=stats.confidence.entropy[layer, t],
          normalized_entropy=stats.confidence.normalized_entropy[layer, t],
          top1_weight=stats.confidence.top1_weight[layer, t],
          dropped_fraction=stats.drops.fraction[layer, t],
          reselection_rate=_transition_column(stats.reselection.rate, layer, t),
          reselection_rate_any_earlier=_transition_column(
            stats.reselection.rate_any_earlier, layer, t
          ),
          mean_overlap=_transition_column(stats.reselection.mean_overlap, layer, t),
          distinct_sets=int(stats.combinations.distinct_per_iteration[layer, t]),
        )
      )
  return pd.DataFrame(rows)


def expert_table(stats: RoutingStats) -> pd.DataFrame:
  """One row per (layer, iteration, expert): load, its share, drops and the dropped share."""
  layers, chain, n = stats.load.counts.shape
  index = pd.MultiIndex.from_product(
    [range(layers), range(chain), range(n)], names=["layer", "iteration", "expert"]
  )
  return pd.DataFrame(
    dict(
      load=stats.load.counts.ravel(),
      load_fraction=stats.load.fraction.ravel(),
      dropped=stats.drops.counts.ravel(),
      dropped_fraction=stats.drops.per_expert.ravel(),
    ),
    index=index,
  ).reset_index()


def layer_table(stats: RoutingStats) -> pd.DataFrame:
  """One row per layer: distinct combinations versus tokens and versus possible; the
  re-selection rate, mean overlap and co-selection diagonal averaged over transitions,
  with their chance levels (all NaN for C = 1, which has no transitions)."""
  combos, again = stats.combinations, stats.reselection
  has_transitions = stats.num_iterations > 1
  nan = float("nan")
  rows = []
  for layer in range(stats.num_layers):
    rows.append(
      dict(
        layer=layer,
        distinct_combinations=int(combos.distinct[layer]),
        tokens=combos.num_tokens,
        possible_combinations=combos.possible,
        used_share_of_possible=combos.distinct[layer] / combos.possible,
        reselection_rate=again.rate[layer].mean() if has_transitions else nan,
        chance_reselection_rate=again.chance_rate if has_transitions else nan,
        mean_overlap=again.mean_overlap[layer].mean() if has_transitions else nan,
        chance_overlap=again.chance_overlap if has_transitions else nan,
        co_selection_diagonal=stats.co_selection.diagonal[layer].mean() if has_transitions else nan,
      )
    )
  return pd.DataFrame(rows)
