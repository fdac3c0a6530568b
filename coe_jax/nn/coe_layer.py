"""The Chain-of-Experts layer: C routed passes through one pool of experts.

DESIGN.md 2, as the reference code computes it:

    u0 = RMSNorm(h)                        # once, before the chain
    for t in 1..C:
      m_t = RoutedExperts_t(u_{t-1}) + SharedExperts(u_{t-1})
      u_t = (u_{t-1} if inner_residual else 0) + m_t
    out = (h + u_C) if outer_residual else u_C        # residual_style='reference'
    out = h + sum_t m_t                               # residual_style='textbook'

The iterations run under `jax.lax.scan` over router weights stacked on a
leading [C] axis (one router per iteration, or one broadcast router when
`independent_gates=False`); the experts are shared by every iteration.
The scan is unrolled (C is 1-3 in the paper): XLA then schedules and fuses
across iterations, at the price of compile time linear in C (experiments/PERF.md 4).
C = 1 is the plain MoE layer.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from coe_jax.nn import dispatch as dispatch_lib
from coe_jax.nn import tuning
from coe_jax.nn.coe_config import CoEConfig
from coe_jax.nn.expert_parallel import ExpertParallel
from coe_jax.nn.experts import RoutedExperts, SharedExperts, swiglu
from coe_jax.nn.layers import RMSNorm, compute_dtype, torch_linear_default_init
from coe_jax.nn.logical_axes import CHAIN, EMBED, EXPERT_LOGITS, param_init
from coe_jax.nn.router import RouterOutput, route

ROUTED_EXPERTS = "routed_experts"  # the param collection holding the stacked [E, ...] experts


@flax.struct.dataclass
class CoEAux:
  """Losses and cheap routing statistics of one CoE layer.

  Attributes:
    aux_loss: <float32>[] load-balancing loss summed over iterations.
    z_loss: <float32>[] router z-loss summed over iterations.
    dropped_fraction: <float32>[C] share of (token, slot) assignments dropped.
    load_cv: <float32>[C] coefficient of variation of the per-expert load.
    router_entropy: <float32>[C] mean entropy (nats) of the router's softmax.
    expert_load: <float32>[C, N_routed] assignments per expert.
    expert_dropped: <float32>[C, N_routed] dropped assignments per expert.
  """

  aux_loss: Array
  z_loss: Array
  dropped_fraction: Array
  load_cv: Array
  router_entropy: Array
  expert_load: Array
  expert_dropped: Array


def _iteration_stats(probs, expert_ids, kept, token_mask, num_experts):
  """Routing statistics over real tokens (token_mask <float32>[b, s], 1 = real)."""
  valid = token_mask[..., None]  # [b, s, 1]
  one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32) * valid[..., None]
  load = one_hot.sum(axis=(0, 1, 2))
  dropped = (one_hot * (~kept)[..., None]).sum(axis=(0, 1, 2))
  num_assignments = jnp.maximum(valid.sum() * expert_ids.shape[-1], 1.0)
  entropy_per_token = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  entropy = jnp.sum(entropy_per_token * token_mask) / jnp.maximum(token_mask.sum(), 1.0)
  load_cv = jnp.std(load) / jnp.maximum(jnp.mean(load), 1e-9)
  return dict(
    dropped_fraction=dropped.sum() / num_assignments,
    load_cv=load_cv,
    router_entropy=entropy,
    expert_load=load,
    expert_dropped=dropped,
  )


class CoELayer(nn.Module):
  """A Chain-of-Experts feed-forward block (norm included), usable in any Flax model.

  Call: `(h <float>[batch, seq, hidden], train: bool, token_mask=None, route_pads=False) ->
  (out <compute dtype>[batch, seq, hidden], CoEAux)`. `h` is the residual
  stream after attention. `train` picks the train or eval capacity factor.
  `token_mask` <int|bool>[batch, seq] marks real tokens; padding is left out of
  the routing statistics, and the load-balancing loss sees every position (as
  in the reference). With `route_pads=False` padding takes no expert capacity
  and gets no routed output; with True it is routed like any token, as the
  reference's MoE (which takes no mask) does.

  Params: `norm/scale` [hidden]; `router` <float32>[C or 1, N_routed, hidden];
  `routed_experts/...` (stacked on a leading [N_routed] axis);
  `shared_experts/...` when n_shared_experts > 0.

  Sown into 'intermediates' (when that collection is mutable): `expert_ids`
  <int32>[C, batch, seq, K], `combine_weights` <float32>[C, batch, seq, K],
  `kept` <bool>[C, batch, seq, K], `router_probs` <float32>[C, batch, seq, N_routed].

  Attributes:
    config: the layer's `CoEConfig` (a `ModelConfig` passes `model_config.coe`).
    expert_fn: one expert, `(weights, x <[..., hidden]>) -> <[..., hidden]>`, applied to
      one expert's slice of the stacked weights. SwiGLU (the paper's) by default. Any
      other function runs with capacity dispatch and with dropless 'gather' ('auto' then
      means 'gather'); 'blocked' and 'ragged_dot' are written for SwiGLU and refuse it.
    router_fn: the router of one iteration, called as `coe_jax.nn.router.route` is
      (`(u, weight <[N_routed, hidden]>, *, k, norm_topk_prob, routed_scaling_factor,
      aux_loss_alpha, z_loss_coef) -> RouterOutput`); `route` (greedy top-K) by default.
      Another routing rule (e.g. a benchmark's fixed balanced draw) needs no new module.
    routed_experts_module: module class creating the stacked routed weights, called as
      `routed_experts_module(num_experts, hidden_size, intermediate_size, init_std)` and
      returning a pytree whose leaves have a leading [num_experts] axis.
    shared_experts_module: module class creating the shared expert's weights, called as
      `shared_experts_module(hidden_size, intermediate_size * n_shared, init_std)`.
    expert_parallel: None (default) computes the layer as plain JAX under any host
      mesh; an `ExpertParallel` runs the routed pass per device under shard_map,
      the experts split over its `expert_axis` (see `coe_jax.nn.expert_parallel`).
  """

  config: CoEConfig
  expert_fn: Callable[[Any, Array], Array] = swiglu
  router_fn: Callable[..., RouterOutput] = route
  routed_experts_module: Callable[..., nn.Module] = RoutedExperts
  shared_experts_module: Callable[..., nn.Module] = SharedExperts
  expert_parallel: Optional[ExpertParallel] = None

  @nn.compact
  def __call__(
    self,
    h: Float[Array, "batch seq hidden"],
    train: bool = False,
    token_mask: Optional[Array] = None,
    route_pads: bool = False,
  ) -> tuple[Float[Array, "batch seq hidden"], CoEAux]:
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    batch, seq, hidden = h.shape
    num_experts, chain = cfg.n_routed_experts, cfg.num_iterations

    u0 = RMSNorm(cfg.rms_norm_eps, dtype, name="norm")(h)
    router_weights = self.param(
      "router",
      param_init(torch_linear_default_init(hidden), (CHAIN, EXPERT_LOGITS, EMBED)),
      (cfg.num_router_weights, num_experts, hidden),
      jnp.float32,
    )
    if not cfg.independent_gates:
      router_weights = jnp.broadcast_to(router_weights, (chain, num_experts, hidden))
    routed = self.routed_experts_module(
      num_experts, hidden, cfg.moe_intermediate_size, cfg.initializer_range, name=ROUTED_EXPERTS
    )()
    routed = jax.tree.map(lambda w: w.astype(dtype), routed)
    shared = None
    if cfg.n_shared_experts > 0:
      shared = self.shared_experts_module(
        hidden, cfg.shared_intermediate_size, cfg.initializer_range, name="shared_experts"
      )()
      shared = jax.tree.map(lambda w: w.astype(dtype), shared)

    blocked = tuning.resolve_dropless_impl(cfg.dropless_impl, cfg.target_platform) == "blocked"
    defer = train and cfg.defer_weight_grads and cfg.dispatch == "dropless" and blocked
    if defer and self.expert_fn is swiglu and self._runs_locally(batch):
      routed = dispatch_lib.chain_weights(
        routed,
        chain,
        batch * seq * cfg.num_experts_per_tok,
        dropless_tile=cfg.dropless_tile,
        dropless_tile_sizes=cfg.dropless_tile_sizes,
        target_platform=cfg.target_platform,
      )
    capacity_factor = cfg.capacity_factor_train if train else cfg.capacity_factor_eval
    sow_probs = self.is_mutable_collection("intermediates")
    real = jnp.ones((batch, seq), bool) if token_mask is None else token_mask > 0
    dispatch_mask = None if token_mask is None or route_pads else real
    expert_pass = self._expert_pass(shared, capacity_factor, dispatch_mask, real)

    def iteration(carry, router_weight):
      u, m_sum, routed = carry  # routed: each pass reads the weights the previous one returned
      m, routing, kept, routed = expert_pass(u, router_weight, routed)
      u_next = (u + m) if cfg.inner_residual else m
      per_iter = dict(
        expert_ids=routing.expert_ids,
        combine_weights=routing.combine_weights,
        kept=kept,
        aux_loss=routing.aux_loss,
        z_loss=routing.z_loss,
        **_iteration_stats(
          routing.probs, routing.expert_ids, kept, real.astype(jnp.float32), num_experts
        ),
      )
      if sow_probs:
        per_iter["router_probs"] = routing.probs
      return (u_next, m_sum + m, routed), per_iter

    (u_last, m_sum, _), per_iter = jax.lax.scan(
      iteration, (u0, jnp.zeros_like(u0), routed), router_weights, unroll=True
    )

    for name in ("expert_ids", "combine_weights", "kept", "router_probs"):
      if name in per_iter:
        self.sow("intermediates", name, per_iter[name])

    if cfg.residual_style == "textbook":
      out = h.astype(dtype) + m_sum
    elif cfg.outer_residual:
      out = h.astype(dtype) + u_last
    else:
      out = u_last
    aux = CoEAux(
      aux_loss=per_iter["aux_loss"].sum(),
      z_loss=per_iter["z_loss"].sum(),
      dropped_fraction=per_iter["dropped_fraction"],
      load_cv=per_iter["load_cv"],
      router_entropy=per_iter["router_entropy"],
      expert_load=per_iter["expert_load"],
      expert_dropped=per_iter["expert_dropped"],
    )
    return out, aux

  def _runs_locally(self, batch: int) -> bool:
    """Whether the routed passes run as plain JAX on this layer's whole batch (no
    `expert_parallel`, or one that does not apply to `batch` rows)."""
    return self.expert_parallel is None or not self.expert_parallel.applies_to(batch)

  def _expert_pass(self, shared, capacity_factor: float, token_mask, real):
    """`(u, router_weight, routed) -> (m, routing, kept, routed)`, per device under
    `expert_parallel` (whose passes return `routed` as given)."""
    cfg = self.config

    def local_pass(u, router_weight, routed, shared, token_mask, expert_axis=None):
      batch, seq, _ = u.shape
      capacity = dispatch_lib.expert_capacity(
        batch * seq,
        cfg.num_experts_per_tok,
        cfg.n_routed_experts,
        capacity_factor,
        cfg.min_capacity,
      )
      return expert_pass(
        u,
        router_weight,
        routed,
        shared,
        cfg,
        capacity,
        token_mask,
        expert_axis,
        self.expert_fn,
        self.router_fn,
      )

    if self._runs_locally(real.shape[0]):
      return lambda u, router_weight, routed: local_pass(
        u, router_weight, routed, shared, token_mask
      )
    parallel = self.expert_parallel
    if cfg.n_routed_experts % parallel.expert_shards:
      raise ValueError(
        f"expert_parallel: n_routed_experts={cfg.n_routed_experts} does not split "
        f"over the {parallel.expert_shards} devices of axis "
        f"{parallel.expert_axis!r}"
      )
    sharded = parallel.wrap(lambda *args: local_pass(*args)[:3])
    mask = jnp.ones_like(real) if token_mask is None else token_mask
    return lambda u, router_weight, routed: (
      *sharded(u, router_weight, routed, shared, mask),
      routed,
    )


def expert_pass(
  u,
  router_weight,
  routed,
  shared,
  cfg: CoEConfig,
  capacity: int,
  token_mask=None,
  expert_axis=None,
  expert_fn: Callable = swiglu,
  router_fn: Callable[..., RouterOutput] = route,
):
  """m = RoutedExperts(u) + SharedExperts(u) for one iteration; returns (m, routing, kept,
  routed), the last the routed weights for the next pass (`DispatchOutput.weights`).

  `expert_axis`: inside shard_map, the mesh axis `routed` is split over. `router_fn`
  picks the experts (`CoELayer.router_fn`).
  """
  batch, seq, hidden = u.shape
  with jax.named_scope("router"):  # named scopes: what `experiments.profile_step` groups by
    routing = router_fn(
      u,
      router_weight,
      k=cfg.num_experts_per_tok,
      norm_topk_prob=cfg.norm_topk_prob,
      routed_scaling_factor=cfg.routed_scaling_factor,
      aux_loss_alpha=cfg.aux_loss_alpha,
      z_loss_coef=cfg.router_z_loss_coef,
    )
  flat_ids = routing.expert_ids.reshape(batch * seq, -1)
  flat_weights = routing.combine_weights.reshape(batch * seq, -1)
  result = dispatch_lib.dispatch_to_experts(
    u.reshape(batch * seq, hidden),
    flat_ids,
    flat_weights,
    routed,
    mode=cfg.dispatch,
    capacity=capacity,
    dropless_impl=cfg.dropless_impl,
    dropless_tile=cfg.dropless_tile,
    dropless_tile_sizes=cfg.dropless_tile_sizes,
    target_platform=cfg.target_platform,
    token_mask=None if token_mask is None else token_mask.reshape(-1),
    expert_axis=expert_axis,
    expert_fn=expert_fn,
  )
  m = result.output.reshape(batch, seq, hidden)
  if shared is not None:
    with jax.named_scope("shared_expert"):
      m = m + expert_fn(shared, u)
  routed_out = routed if result.weights is None else result.weights
  return m.astype(u.dtype), routing, result.kept.reshape(batch, seq, -1), routed_out
