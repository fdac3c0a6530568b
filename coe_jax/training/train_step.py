"""The pure train and eval steps (DESIGN.md 6) and the state they update.

The train step is a pure function `(state, batch, rng) -> (state, metrics)`,
jitted once with the state donated. It optimises cross-entropy plus the summed
router losses and reports them separately (`loss` is cross-entropy alone, as
the paper reports it). Targets: every real position predicts the next token of
its segment (`next_token_targets`), end-of-text included.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from coe_jax.nn.layers import compute_dtype
from coe_jax.nn.model import CoECausalLM
from coe_jax.training import sharding
from coe_jax.training.cross_entropy import shift_left, token_cross_entropy_sum
from coe_jax.training.head_loss import head_cross_entropy_sum, head_loss_chunks
from coe_jax.training.optimizer import make_optimizer

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `tx` is static (not saved)."""

  step: jax.Array
  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)


def next_token_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """targets [b, s-1] and weights: predict token t+1 from t where both lie in one example.

  `segment_ids` (0 on padding) mark each example's extent, its end-of-text target
  included: with the reference's row layout that end-of-text is a pad of the
  attention mask, so the example's last real token still targets it, exactly the
  reference's `loss_mask = attention_mask[:, :-1]` (DESIGN.md 6).
  """
  ids, seg = batch["input_ids"], batch["segment_ids"]
  targets = ids[:, 1:]
  weights = (seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
  return targets, weights.astype(jnp.float32)


def cross_entropy_sum(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(sum of token cross-entropies, number of target tokens) of one batch."""
  targets, weights = next_token_targets(batch)
  count = jnp.sum(weights)
  targets, weights = shift_left(targets, weights)  # full length: no [b, s-1, V] copies
  return token_cross_entropy_sum(logits, targets, weights), count


def _forward(model: CoECausalLM, params, batch: Batch, train: bool, features_only: bool = False):
  return model.apply(
    {"params": params},
    batch["input_ids"],
    batch["attention_mask"],
    batch["positions"],
    batch["segment_ids"],
    train=train,
    features_only=features_only,
  )


def training_loss_terms(model: CoECausalLM, params, batch: Batch):
  """(CE sum, target count, ModelAux) in train mode.

  On one device the head and the loss are fused (`head_loss.head_cross_entropy_sum`: its
  gradient is made in the forward pass, the logits never held whole). On a mesh of several
  devices through the logits: there the batch's sharding already divides each device's
  logits, and in the fused op's chunk loop XLA would all-gather an FSDP-sharded head and
  reduce-scatter its gradient once a chunk (experiments/PERF.md 35).
  """
  mesh = sharding.active_mesh()
  if mesh is not None and mesh.size > 1:
    return logits_loss_terms(model, params, batch)
  hidden, aux = _forward(model, params, batch, train=True, features_only=True)
  targets, weights = next_token_targets(batch)
  count = jnp.sum(weights)
  targets, weights = shift_left(targets, weights)
  b, s, d = hidden.shape
  kernel = params["lm_head"]["kernel"]
  platform = model.config.coe.target_platform
  chunks = head_loss_chunks(b, s, d, kernel.shape[1], platform)
  dtype = compute_dtype(model.config.dtype)
  return head_cross_entropy_sum(hidden, kernel, targets, weights, chunks, dtype), count, aux


def logits_loss_terms(model: CoECausalLM, params, batch: Batch):
  """`training_loss_terms` through the model's logits (on a mesh; PERF.md 35's before)."""
  logits, aux = _forward(model, params, batch, train=True)
  return (*cross_entropy_sum(logits, batch), aux)


def training_objective(
  model: CoECausalLM,
  params,
  batch: Batch,
  total_tokens: Optional[jax.Array] = None,
  grad_accum_steps: int = 1,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any]]:
  """What the train step differentiates, on one (micro-)batch.

  Summed target cross-entropy over `total_tokens` (default: this batch's targets) plus the
  router losses over `grad_accum_steps`. Returns (objective, (CE sum, target count, ModelAux)).
  """
  ce_sum, count, aux = training_loss_terms(model, params, batch)
  if total_tokens is None:
    total_tokens = jnp.maximum(count, 1.0)
  router = (aux.aux_loss + aux.z_loss) / grad_accum_steps
  return ce_sum / total_tokens + router, (ce_sum, count, aux)


def make_train_step(
  model: CoECausalLM, grad_accum_steps: int = 1, log_routing_stats: bool = True
) -> Callable:
  """Returns the pure `train_step(state, batch, rng) -> (state, metrics)`.

  The objective is mean token cross-entropy over the whole batch (all
  micro-batches pooled, so accumulation is exact) plus the router losses,
  averaged over micro-batches. `rng` is unused by the model (no dropout) and
  kept so stochastic extensions need no signature change.
  """

  def objective(params, micro: Batch, total_tokens):
    return training_objective(model, params, micro, total_tokens, grad_accum_steps)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    del rng
    _, weights = next_token_targets(batch)
    total_tokens = jnp.maximum(weights.sum(), 1.0)
    micro_batches = jax.tree.map(
      lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch
    )
    micro_batches = sharding.constrain_micro_batches(micro_batches)  # no-op without a mesh

    def accumulate(grads_sum, micro):
      (_, (ce_sum, count, aux)), grads = grad_fn(state.params, micro, total_tokens)
      return jax.tree.map(jnp.add, grads_sum, grads), (ce_sum, count, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (ce_sums, counts, auxes) = jax.lax.scan(accumulate, zeros, micro_batches)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {
      "loss": ce_sums.sum() / jnp.maximum(counts.sum(), 1.0),
      "aux_loss": auxes.aux_loss.mean(),
      "z_loss": auxes.z_loss.mean(),
      "grad_norm": optax.global_norm(grads),
      "dropped_fraction": auxes.layers.dropped_fraction.mean(),
      "target_tokens": counts.sum(),
    }
    if log_routing_stats:
      # Per iteration, averaged over layers and micro-batches: shape [C].
      metrics["dropped_fraction_iter"] = auxes.layers.dropped_fraction.mean(axis=(0, 1))
      metrics["load_cv_iter"] = auxes.layers.load_cv.mean(axis=(0, 1))
      metrics["router_entropy_iter"] = auxes.layers.router_entropy.mean(axis=(0, 1))
    return new_state, metrics

  return train_step


def make_eval_step(model: CoECausalLM) -> Callable:
  """`eval_step(params, batch) -> (CE sum, target count)` in eval mode (eval capacity)."""

  def eval_step(params, batch: Batch):
    logits, _ = _forward(model, params, batch, train=False)
    return cross_entropy_sum(logits, batch)

  return eval_step


def pooled_eval_loss(
  eval_step: Callable, params, batches: Iterable[dict], *, with_count: bool = False
) -> float | tuple[float, float]:
  """Mean token cross-entropy over `batches` (and the number of targets if `with_count`)."""
  total, count = 0.0, 0.0
  for batch in batches:
    ce_sum, n = eval_step(params, batch)
    total += float(ce_sum)
    count += float(n)
  loss = total / max(count, 1.0)
  return (loss, count) if with_count else loss


def batch_mean_eval_loss(eval_step: Callable, params, batches: list[dict]) -> float:
  """Mean over `batches` of each batch's mean token cross-entropy: the reference's
  validation number (DESIGN.md 6), unlike `pooled_eval_loss`'s mean over every target."""
  means = []
  for batch in batches:
    ce_sum, n = eval_step(params, batch)
    means.append(float(ce_sum) / max(float(n), 1.0))
  return float(np.mean(means)) if means else float("nan")


def init_train_state(
  model: CoECausalLM, train: ml_collections.ConfigDict, seed: int, seq_len: int
) -> TrainState:
  """Fresh params and optimizer state, initialised in one jitted program (not op by op)."""
  tx = make_optimizer(train)

  def create(key: jax.Array) -> TrainState:
    # Plain arrays: the logical axes `init` boxes them with lay out the state
    # (`sharding.state_shardings`), they are not part of it.
    params = nn.meta.unbox(model.init(key, jnp.zeros((1, seq_len), jnp.int32)))["params"]
    return TrainState.create(params, tx)

  return jax.jit(create)(jax.random.key(seed))
