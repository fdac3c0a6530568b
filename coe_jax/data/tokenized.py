"""Tokenised splits: built once, stored as ragged `.npy` arrays, turned into batches on demand.

A split is stored without padding:

* `tokens` (int32 `[T]`): every example's token ids, each followed by the
  end-of-text token when one is given, right-truncated to `max_length`, concatenated;
* `offsets` (int64 `[E + 1]`): example `e` is `tokens[offsets[e]:offsets[e + 1]]`;
* `rows` (int64 `[R + 1]`): row `r` holds examples `rows[r]` .. `rows[r + 1] - 1`.
  Without packing every row holds one example; with packing, consecutive
  whole examples are packed greedily while they fit in `max_length`.

Batches are padded to `max_length` when they are built, so the cache stays
small (a 100M-token corpus is ~400 MB instead of rows x max_length).

Unpacked rows can be laid out as the reference's (`Split.eos_pad_id`,
DESIGN.md 6): padded with the end-of-text id, and the end-of-text that ends an
example is its first pad (attention_mask 0) while its segment id still covers
it, so the example's last real token targets it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import tokenizers

from coe_jax import storage

ARRAYS = ("tokens", "offsets", "rows")
Batch = dict[str, np.ndarray]


def format_example(query: str, response: str) -> str:
  """The paper's training text for one example (DESIGN.md 6)."""
  return f"query : {query} response : {response}"


def format_prompt(query: str) -> str:
  """The prefix of `format_example` that a model completes with the response."""
  return f"query : {query} response :"


def encode(
  tok: tokenizers.Tokenizer,
  texts: Sequence[str],
  max_length: int,
  eos_id: Optional[int] = None,
  chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, offsets): `texts` tokenised without special tokens, each cut to `max_length`.

  With `eos_id`, every example is `text ids + [eos_id]` cut to `max_length`:
  the reference pads with its end-of-text token and scores the first pad
  (DESIGN.md 6), so an example shorter than `max_length` learns to end with EOS and
  a truncated one (text ids >= max_length) has no EOS target.
  """
  suffix = [] if eos_id is None else [int(eos_id)]
  pieces: list[np.ndarray] = []
  lengths = np.zeros(len(texts), np.int64)
  for start in range(0, len(texts), chunk):
    for i, enc in enumerate(
      tok.encode_batch(list(texts[start : start + chunk]), add_special_tokens=False)
    ):
      ids = np.asarray((enc.ids + suffix)[:max_length], np.int32)
      lengths[start + i] = len(ids)
      pieces.append(ids)
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return tokens, offsets


def pack_rows(lengths: np.ndarray, max_length: int, packing: bool) -> np.ndarray:
  """Row boundaries over examples: one per row, or greedy runs that fit in `max_length`."""
  if not packing:
    return np.arange(len(lengths) + 1, dtype=np.int64)
  bounds = [0]
  used = 0
  for e, length in enumerate(lengths.tolist()):
    if used and used + length > max_length:
      bounds.append(e)
      used = 0
    used += length
  if len(lengths):
    bounds.append(len(lengths))
  return np.asarray(bounds, np.int64)


@dataclasses.dataclass
class Split:
  """One tokenised split (see the module docstring) and how to batch it."""

  tokens: np.ndarray
  offsets: np.ndarray
  rows: np.ndarray
  max_length: int
  pad_id: int
  packed: bool
  # Unpacked rows only: lay rows out as the reference's, padded with this end-of-text id,
  # which is also the first pad of every example it ends (see the module docstring).
  eos_pad_id: Optional[int] = None

  @property
  def num_examples(self) -> int:
    """Examples (query/response pairs) in the split."""
    return len(self.offsets) - 1

  @property
  def num_rows(self) -> int:
    """Rows of `max_length` tokens (== num_examples unless packed)."""
    return len(self.rows) - 1

  @property
  def num_tokens(self) -> int:
    """Real (non-pad) tokens after truncation."""
    return int(self.offsets[-1])

  @property
  def lengths(self) -> np.ndarray:
    """Tokens per example after truncation."""
    return np.diff(self.offsets)

  def example(self, e: int) -> np.ndarray:
    """The token ids of example `e`."""
    return np.asarray(self.tokens[self.offsets[e] : self.offsets[e + 1]])

  def batch(self, row_indices: Iterable[int], pad_rows: int = 0) -> Batch:
    """int32 `input_ids`, `attention_mask`, `segment_ids`, `positions`, each `[B, max_length]`.

    `pad_rows` extra all-padding rows (mask 0) are appended.
    """
    row_indices = list(row_indices)
    size = len(row_indices) + pad_rows
    shape = (size, self.max_length)
    eos_pads = self.eos_pad_id is not None and not self.packed
    input_ids = np.full(shape, self.eos_pad_id if eos_pads else self.pad_id, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    positions = (
      np.zeros(shape, np.int32)
      if self.packed
      else np.tile(np.arange(self.max_length, dtype=np.int32), (size, 1))
    )
    for b, r in enumerate(row_indices):
      self._fill_row(int(r), input_ids[b], segment_ids[b], positions[b])
    attention_mask = segment_ids > 0
    if eos_pads:  # the example's end-of-text is the reference's first pad
      rows, last = np.arange(size), attention_mask.sum(axis=1) - 1
      ends = (last >= 0) & (input_ids[rows, np.maximum(last, 0)] == self.eos_pad_id)
      attention_mask[rows[ends], last[ends]] = False
    return {
      "input_ids": input_ids,
      "attention_mask": attention_mask.astype(np.int32),
      "segment_ids": segment_ids,
      "positions": positions,
    }

  def _fill_row(self, r: int, ids: np.ndarray, segs: np.ndarray, pos: np.ndarray) -> None:
    first, last = int(self.rows[r]), int(self.rows[r + 1])
    start, stop = int(self.offsets[first]), int(self.offsets[last])
    ids[: stop - start] = self.tokens[start:stop]
    for k, e in enumerate(range(first, last)):
      a, b = int(self.offsets[e]) - start, int(self.offsets[e + 1]) - start
      segs[a:b] = k + 1
      if self.packed:
        pos[a:b] = np.arange(b - a, dtype=np.int32)


def build_split(
  tok: tokenizers.Tokenizer,
  texts: Sequence[str],
  max_length: int,
  pad_id: int,
  packing: bool,
  eos_id: Optional[int] = None,
) -> Split:
  """Tokenises `texts` (each ending in `eos_id` unless truncated) and lays them out in rows."""
  tokens, offsets = encode(tok, texts, max_length, eos_id)
  rows = pack_rows(np.diff(offsets), max_length, packing)
  return Split(tokens, offsets, rows, max_length, pad_id, packing)


def save_splits(directory: Path, splits: dict[str, Split], meta: dict) -> None:
  """Writes every split's arrays and `meta.json` into `directory`, atomically.

  A full or read-only disk raises a one-line `StorageError` (the bytes needed) and
  leaves nothing behind.
  """
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir()
    for name, split in splits.items():
      for array in ARRAYS:
        np.save(tmp / f"{name}_{array}.npy", getattr(split, array))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
  except OSError as error:  # a full or read-only disk: no partial cache stays behind
    shutil.rmtree(tmp, ignore_errors=True)
    needed = sum(getattr(s, a).nbytes for s in splits.values() for a in ARRAYS)
    failure = storage.storage_error(error, "the token cache", str(directory), needed)
    if failure is None:
      raise
    raise failure from error
  try:
    os.replace(tmp, directory)
  except OSError:  # another process finished first; its identical copy stays
    shutil.rmtree(tmp, ignore_errors=True)


def _load_array(path: Path) -> np.ndarray:
  try:
    return np.load(path, mmap_mode="r")
  except ValueError:  # numpy cannot memory-map an empty array
    return np.load(path)


def load_splits(
  directory: Path, names: Sequence[str], max_length: int, pad_id: int, packing: bool
) -> dict[str, Split] | None:
  """The cached splits in `directory` (memory-mapped), or None when it is incomplete."""
  if not (directory / "meta.json").is_file():
    return None
  splits = {}
  for name in names:
    arrays = {a: _load_array(directory / f"{name}_{a}.npy") for a in ARRAYS}
    splits[name] = Split(max_length=max_length, pad_id=pad_id, packed=packing, **arrays)
  return splits
