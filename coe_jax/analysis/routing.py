"""The routing decisions of a model on one batch, gathered from what its CoE layers sow.

`CoELayer` sows, per iteration, the chosen experts, their combine weights,
whether each assignment fitted in its expert's capacity and the router's
softmax. `collect_routing` runs a model with the 'intermediates' collection
mutable and returns them as one `Routing` of numpy arrays with a leading
[layers, iterations] pair of axes, plus the batch's token mask: every statistic
in `coe_jax.analysis.statistics` is computed over real tokens only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jaxtyping import Bool, Float, Int

from coe_jax.nn.model import stack_layers

ROUTING_NAMES = ("expert_ids", "combine_weights", "kept", "router_probs")


@dataclasses.dataclass(frozen=True, eq=False)
class Routing:
  """Routing of every layer and iteration of a model on one batch (numpy arrays).

  Attributes:
    expert_ids: <int>[layers, C, batch, seq, K] chosen routed experts, best first.
    combine_weights: <float>[layers, C, batch, seq, K] their combine weights.
    kept: <bool>[layers, C, batch, seq, K] whether each assignment was processed
      (False when dropped over capacity, and for padding tokens, which are not
      dispatched at all).
    router_probs: <float>[layers, C, batch, seq, N_routed] the routers' softmax.
    token_mask: <bool>[batch, seq] True on real tokens, False on padding.
  """

  expert_ids: Int[np.ndarray, "layers iterations batch seq k"]
  combine_weights: Float[np.ndarray, "layers iterations batch seq k"]
  kept: Bool[np.ndarray, "layers iterations batch seq k"]
  router_probs: Float[np.ndarray, "layers iterations batch seq experts"]
  token_mask: Bool[np.ndarray, "batch seq"]

  def __post_init__(self):
    shape = self.expert_ids.shape
    if len(shape) != 5:
      raise ValueError(f"expert_ids: got shape {shape}; expected [layers, C, batch, seq, K]")
    for name in ("combine_weights", "kept"):
      if getattr(self, name).shape != shape:
        raise ValueError(f"{name}: got shape {getattr(self, name).shape}; expected {shape}")
    if self.router_probs.shape[:4] != shape[:4]:
      raise ValueError(
        f"router_probs: got shape {self.router_probs.shape}; expected {shape[:4] + ('N_routed',)}"
      )
    if self.token_mask.shape != shape[2:4]:
      raise ValueError(f"token_mask: got shape {self.token_mask.shape}; expected {shape[2:4]}")

  @property
  def num_layers(self) -> int:
    return self.expert_ids.shape[0]

  @property
  def num_iterations(self) -> int:
    """C, the number of routed passes per layer (1 for MoE)."""
    return self.expert_ids.shape[1]

  @property
  def num_experts(self) -> int:
    """N_routed, the experts a router chooses from (the shared expert is not routed)."""
    return self.router_probs.shape[-1]

  @property
  def k(self) -> int:
    """Experts chosen per token and iteration."""
    return self.expert_ids.shape[-1]

  @property
  def num_tokens(self) -> int:
    """Real (non-padding) tokens in the batch."""
    return int(self.token_mask.sum())

  def real_tokens(self, array: np.ndarray) -> np.ndarray:
    """`array` [layers, C, batch, seq, ...] restricted to real tokens: [layers, C, tokens, ...]."""
    return array[:, :, self.token_mask]


def _find_routing_dict(tree: Mapping[str, Any]) -> Mapping[str, Any]:
  """The sub-dict of a sown 'intermediates' tree that holds `expert_ids`."""
  if "expert_ids" in tree:
    return tree
  for value in tree.values():
    if isinstance(value, Mapping):
      try:
        return _find_routing_dict(value)
      except KeyError:
        continue
  raise KeyError(
    "no sown 'expert_ids' in the intermediates; was a CoE layer applied with "
    "mutable=['intermediates']?"
  )


def routing_from_intermediates(
  intermediates: Mapping[str, Any], token_mask: Optional[np.ndarray] = None
) -> Routing:
  """Builds a `Routing` from the 'intermediates' a model or a single `CoELayer` sowed.

  Args:
    intermediates: the collection returned by `apply(..., mutable=['intermediates'])`
      (with or without its outer 'intermediates' key). Under `CoECausalLM` each
      entry is a 1-tuple of a [layers, C, batch, seq, ...] array (per-layer
      `layers_i` entries are stacked into it); under a bare
      `CoELayer` it is [C, batch, seq, ...] and gets a layer axis of size 1.
    token_mask: <int|bool>[batch, seq] 1 on real tokens; None means all real.
  """
  tree = stack_layers(intermediates.get("intermediates", intermediates))  # layers_i -> [layers]
  found = _find_routing_dict(tree)
  missing = [name for name in ROUTING_NAMES if name not in found]
  if missing:
    raise KeyError(f"sown routing lacks {missing}")
  arrays = {name: np.asarray(found[name][0]) for name in ROUTING_NAMES}
  if arrays["expert_ids"].ndim == 4:
    arrays = {name: value[None] for name, value in arrays.items()}
  batch_seq = arrays["expert_ids"].shape[2:4]
  mask = np.ones(batch_seq, bool) if token_mask is None else np.asarray(token_mask) > 0
  return Routing(token_mask=mask, **arrays)


def collect_routing(
  model: nn.Module, variables: Mapping[str, Any], batch: Mapping[str, Any], *, train: bool = False
) -> Routing:
  """Runs `model` on `batch` and returns the routing of every layer and iteration.

  Args:
    model: a `coe_jax.nn.model.CoECausalLM`.
    variables: its variables, `{'params': ...}`.
    batch: <int32>[batch, seq] arrays `input_ids` and optionally `attention_mask`
      (1 on real tokens), `positions`, `segment_ids`, as the input pipeline yields.
    train: route with the training capacity factor (what the train step saw)
      instead of the evaluation one. Nothing else differs: the model has no dropout.
  """
  input_ids = np.asarray(batch["input_ids"])
  mask = batch.get("attention_mask")
  mask = np.ones_like(input_ids) if mask is None else np.asarray(mask)
  intermediates = _sowing_forward(model, train)(
    variables, input_ids, mask, batch.get("positions"), batch.get("segment_ids")
  )
  return routing_from_intermediates(jax.device_get(intermediates), mask)


@functools.lru_cache(maxsize=8)
def _sowing_forward(model: nn.Module, train: bool):
  """Jitted `(variables, input_ids, mask, positions, segment_ids) -> intermediates`."""

  def forward(variables, input_ids, mask, positions, segment_ids):
    _, state = model.apply(
      variables, input_ids, mask, positions, segment_ids, train=train, mutable=["intermediates"]
    )
    return state["intermediates"]

  return jax.jit(forward)


def concatenate_routing(routings: Sequence[Routing]) -> Routing:
  """Joins the routing of several batches along the batch axis (same seq length)."""
  if not routings:
    raise ValueError("concatenate_routing: got no routing")
  fields = {
    f.name: np.concatenate(
      [getattr(r, f.name) for r in routings], axis=0 if f.name == "token_mask" else 2
    )
    for f in dataclasses.fields(Routing)
  }
  return Routing(**fields)
