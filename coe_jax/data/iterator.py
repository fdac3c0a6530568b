"""`TrainIterator`: endless, deterministic, resumable training batches over a split's rows."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from coe_jax.data.tokenized import Batch, Split


class TrainIterator:
  """Endless, deterministic batches over a split's rows.

  Epoch `e` visits the rows in `np.random.default_rng([seed, e]).permutation`
  order; a batch that runs past an epoch's end continues into the next one, so
  every epoch covers every row exactly once. `get_state()` / `set_state()` save
  and restore the position for exact resumption.

  The order is global: with `local_rows` (positions within each batch, e.g.
  `sharding.process_rows`) every process walks the same order and builds only
  those rows of each batch, so the state, the same on every process, restores
  on any number of processes.
  """

  def __init__(
    self, split: Split, batch_size: int, seed: int, local_rows: Optional[np.ndarray] = None
  ):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if split.num_rows < 1:
      raise ValueError("the training split is empty")
    self.split, self.batch_size, self.seed = split, batch_size, seed
    self.local_rows = local_rows
    self.epoch, self.index = 0, 0
    self._order_epoch, self._order = -1, np.zeros(0, np.int64)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._order_epoch:
      self._order = np.random.default_rng([self.seed, epoch]).permutation(self.split.num_rows)
      self._order_epoch = epoch
    return self._order

  def next_rows(self) -> np.ndarray:
    """The row indices of the next batch (advances the state)."""
    taken: list[np.ndarray] = []
    need = self.batch_size
    while need:
      order = self._permutation(self.epoch)
      chunk = order[self.index : self.index + need]
      taken.append(chunk)
      need -= len(chunk)
      self.index += len(chunk)
      if self.index == len(order):
        self.epoch, self.index = self.epoch + 1, 0
    return np.concatenate(taken)

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> Batch:
    rows = self.next_rows()
    return self.split.batch(rows if self.local_rows is None else rows[self.local_rows])

  def get_state(self) -> dict[str, int]:
    """The position after the last batch, as JSON-serialisable ints."""
    return {"epoch": int(self.epoch), "index": int(self.index)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()` result."""
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index < self.split.num_rows:
      raise ValueError(f"iterator state {state} does not fit {self.split.num_rows} rows")
    self.epoch, self.index = epoch, index
