"""experiments/ab_changes.py: each variant undoes exactly its change, and only while tracing."""

import jax
import pytest
from absl import app

from coe_jax.nn import dispatch, model
from coe_jax.nn.head_matmul import head_dot_general
from coe_jax.training import train_step
from experiments import ab_changes


def test_each_variant_undoes_its_change_inside_the_context_only():
  current_loss, current_dispatch = train_step.cross_entropy_sum, dispatch.blocked_dispatch
  current_terms = train_step.training_loss_terms
  with ab_changes.undone("plain_head+optax_loss+unchained+logits_loss"):
    assert train_step.training_loss_terms is train_step.logits_loss_terms
    assert model.head_dot_general is jax.lax.dot_general
    assert train_step.cross_entropy_sum is ab_changes.optax_cross_entropy_sum
    assert dispatch.blocked_dispatch is not current_dispatch
  assert model.head_dot_general is head_dot_general
  assert train_step.cross_entropy_sum is current_loss
  assert dispatch.blocked_dispatch is current_dispatch
  assert train_step.training_loss_terms is current_terms
  with ab_changes.undone("current"):
    assert model.head_dot_general is head_dot_general


def test_an_unknown_variant_is_refused_with_the_allowed_ones():
  with pytest.raises(
    app.UsageError, match="allowed: current, optax_loss, plain_head, unchained, logits_loss"
  ):
    ab_changes.undone("faster")
