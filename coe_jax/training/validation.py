"""`Validation`: the validation numbers the training loop logs at its evaluation steps."""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from coe_jax.data.input_pipeline import Datasets
from coe_jax.data.tokenized import Batch
from coe_jax.training.train_step import batch_mean_eval_loss, pooled_eval_loss


class Validation:
  """`val/loss`, the pooled token loss over the validation batches (the first
  `train.max_eval_batches`, 0 = all), and with `train.paper_val` `val/loss_paper`, the
  reference's protocol (DESIGN.md 6: the mean of a few full batches' mean losses)."""

  def __init__(self, eval_step: Callable, batches: list[Batch], paper_batches: list[Batch]):
    self.eval_step = eval_step
    self.batches = batches
    self.paper_batches = paper_batches

  @classmethod
  def for_run(
    cls, eval_step: Callable, datasets: Datasets, train: ml_collections.ConfigDict
  ) -> "Validation":
    """The batches `train` asks for, built once for the whole run."""
    batches = datasets.val_batches(train.eval_batch_size)
    if train.max_eval_batches:
      batches = batches[: train.max_eval_batches]
    paper_batches = (
      datasets.reference_val_batches(train.paper_val_batch_size, train.paper_val_batches)
      if train.paper_val
      else []
    )
    return cls(eval_step, batches, paper_batches)

  def __call__(self, params: Any) -> dict[str, float]:
    """{'val/loss': ..., and 'val/loss_paper' when asked} for `params`."""
    values = {"val/loss": pooled_eval_loss(self.eval_step, params, self.batches)}
    if self.paper_batches:
      values["val/loss_paper"] = batch_mean_eval_loss(self.eval_step, params, self.paper_batches)
    return values
