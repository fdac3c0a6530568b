"""The optimiser of DESIGN.md 6: AdamW with a linear warm-up, global-norm clipping and weight
decay on every parameter (the reference's; `train.decay_norm_scales=False` leaves RMSNorm
scales undecayed), as one fused pass over parameters and state (`fused_clip_adamw`).

`make_reference_optimizer` is the same thing as an optax chain (the tests hold the fused
update to it); `learning_rate_schedule` is the warm-up then constant (paper) or cosine rate.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 over warmup_fraction * steps, then constant or cosine to 0."""
  warmup = int(train.warmup_fraction * train.steps)
  rest = max(train.steps - warmup, 1)
  if train.schedule == "cosine":
    after = optax.cosine_decay_schedule(train.lr, rest)
  else:
    after = optax.constant_schedule(train.lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, train.lr, warmup), after], [warmup])


def decay_everything(params):
  """Weight decay on every parameter, RMSNorm scales included (the reference's AdamW)."""
  return jax.tree.map(lambda _: True, params)


def decay_all_but_norm_scales(params):
  """Weight decay on matrices, not on RMSNorm scales (as the HF Trainer excludes norms)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], "key", None) != "scale", params
  )


def decay_mask(train: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """`train.decay_norm_scales` (default True, the reference) as an optax mask function.

  A config without the field is a run saved before it existed: norm scales undecayed.
  """
  if train.get("decay_norm_scales", False):
    return decay_everything
  return decay_all_but_norm_scales


def make_reference_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm + AdamW as an optax chain: what `make_optimizer` computes, unfused."""
  parts = []
  if train.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train.grad_clip))
  parts.append(
    optax.adamw(
      learning_rate_schedule(train),
      b1=train.b1,
      b2=train.b2,
      eps=1e-8,
      weight_decay=train.weight_decay,
      mask=decay_mask(train),
    )
  )
  return optax.chain(*parts)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm + AdamW (weight decay as `decay_mask(train)` says).

  `train.fused_optimizer` (the config default) gives the update as one fused
  elementwise pass per leaf (`fused_clip_adamw`: one read and write of each
  leaf instead of one per transform, equal to the optax chain to float32
  rounding but not bit for bit; experiments/PERF.md 13); False, or a config without the field (a run saved before it
  was the default), gives the optax chain (`make_reference_optimizer`). Both
  keep the chain's state pytree, so checkpoints are interchangeable.
  """
  if train.get("fused_optimizer", False):
    return fused_clip_adamw(
      make_reference_optimizer(train),
      learning_rate_schedule(train),
      b1=train.b1,
      b2=train.b2,
      eps=1e-8,
      weight_decay=train.weight_decay,
      mask=decay_mask(train),
      max_norm=train.grad_clip,
    )
  return make_reference_optimizer(train)


def fused_clip_adamw(
  reference: optax.GradientTransformation,
  schedule: optax.Schedule,
  *,
  b1: float,
  b2: float,
  eps: float,
  weight_decay: float,
  mask: Callable[[Any], Any],
  max_norm: float,
) -> optax.GradientTransformation:
  """The update of `reference` (= chain([clip_by_global_norm(max_norm)], adamw(...))) in one pass.

  State: `reference.init(params)`, i.e. ([clip EmptyState,] (ScaleByAdamState,
  MaskedState, ScaleByScheduleState)); `max_norm <= 0` means no clipping.
  """

  def update(grads, state, params):
    if params is None:
      raise ValueError("fused_clip_adamw needs params (weight decay)")
    *clip_state, (adam, masked, lr_state) = state
    if max_norm > 0:  # optax: g if |g| < max_norm else g / |g| * max_norm
      g_norm = optax.global_norm(grads)
      scale = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)
    else:
      scale = 1.0
    count = optax.safe_increment(adam.count)
    correction1 = 1 - b1 ** count.astype(jnp.float32)
    correction2 = 1 - b2 ** count.astype(jnp.float32)
    lr = schedule(lr_state.count)

    def leaf(g, mu, nu, p, decay):
      g = g * scale.astype(g.dtype) if max_norm > 0 else g
      mu = (1 - b1) * g + b1 * mu
      nu = (1 - b2) * (g * g) + b2 * nu
      direction = (mu / correction1.astype(mu.dtype)) / (
        jnp.sqrt(nu / correction2.astype(nu.dtype)) + eps
      )
      if decay:
        direction = direction + weight_decay * p
      return mu, nu, (-lr * direction).astype(p.dtype)

    out = jax.tree.map(leaf, grads, adam.mu, adam.nu, params, mask(params))
    treedef = jax.tree.structure(grads)
    mu, nu, updates = (treedef.unflatten(parts) for parts in zip(*treedef.flatten_up_to(out)))
    new_state = (
      *clip_state,
      (
        adam._replace(count=count, mu=mu, nu=nu),
        masked,
        lr_state._replace(count=optax.safe_increment(lr_state.count)),
      ),
    )
    return updates, new_state

  return optax.GradientTransformation(reference.init, update)
