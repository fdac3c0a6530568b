"""The input pipeline: `config.data` -> tokenised, cached train/val splits -> numpy batches.

The data flows one way, each stage reading only what the one before produced:

1. `resolve_data_spec(config.data, workdir)` (`data_config`) validates the fields
   once and resolves them into a frozen `DataSpec` (paths, hold-out, cache directory);
2. `Corpus(spec)` (`corpus`, through `sources`) reads both splits' raw examples and
   formats them as text, once and only when a later stage needs them, and names
   them by a key (`Corpus.key`);
3. the tokenizer is loaded once (`_load_tokenizer`: a file, the hub, or a BPE trained
   on the training texts, then trimmed when `trim_vocab` asks), cached by that key;
4. the splits are tokenised once per (corpus key, tokenizer, max_length, packing,
   end-of-text target) and cached as `.npy` files (`tokenized`); later builds
   memory-map them without reading the source;
5. `Datasets` hands out batches: `train_iterator` (a `TrainIterator`) and the
   validation batches.

Every example becomes `query : {query} response : {response}` (DESIGN.md 6),
tokenised without special tokens, right-truncated to `max_length` and padded
with the tokenizer's pad id. With `data.eos_target` (default, as the reference
trains) every example that is not truncated ends in the tokenizer's end-of-text
token, so its last real token learns to predict EOS (DESIGN.md 6).

Batches are dicts of int32 `[B, L]` numpy arrays: `input_ids`, `attention_mask`
(1 on real tokens), `segment_ids` (1, 2, ... per packed example, 0 on padding;
equal to `attention_mask` without packing) and `positions` (restarting at 0 per
packed example; `arange(L)` without packing). The train step takes targets
`input_ids[:, 1:]` with weight `attention_mask[:, 1:] * (segment_ids[:, 1:] ==
segment_ids[:, :-1])`: exactly the reference's `loss_mask = attention_mask[:, :-1]`
targets when the EOS it pads with is kept as the example's last real token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import tokenizers

from coe_jax.data import tokenized
from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.data.corpus import SIDES, Corpus
from coe_jax.data.data_config import (
  SOURCES,
  DataConfig,
  DataSpec,
  default_data_config,
  fail,
  resolve_data_spec,
  validate_data_config,
)
from coe_jax.data.iterator import TrainIterator
from coe_jax.data.tokenized import Batch, Split, format_example, format_prompt

__all__ = [
  "Batch",
  "DataSpec",
  "Datasets",
  "Split",
  "TrainIterator",
  "build_datasets",
  "default_data_config",
  "format_example",
  "format_prompt",
  "resolve_data_spec",
  "validate_data_config",
  "SOURCES",
]

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Datasets:
  """Tokenised train/val splits with their tokenizer."""

  tokenizer: tokenizers.Tokenizer
  train: Split
  val: Split
  cache_path: str  # directory holding the cached arrays
  from_cache: bool  # True when the arrays were loaded, not tokenised, by this build
  tokenize_seconds: float  # time spent reading and tokenising (0.0 on a cache hit)

  @property
  def pad_id(self) -> int:
    """The id filling padded positions: end-of-text in the reference's row layout."""
    if self.train.eos_pad_id is not None and not self.train.packed:
      return self.train.eos_pad_id
    return tokenizer_lib.pad_id(self.tokenizer)

  @property
  def eos_id(self) -> Optional[int]:
    return tokenizer_lib.eos_id(self.tokenizer)

  @property
  def vocab_size(self) -> int:
    """The tokenizer's vocabulary size, added tokens included."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def train_iterator(
    self, batch_size: int, seed: int, local_rows: Optional[np.ndarray] = None
  ) -> TrainIterator:
    """Endless shuffled training batches, or only their `local_rows` (see `TrainIterator`)."""
    return TrainIterator(self.train, batch_size, seed, local_rows)

  def val_batches(self, batch_size: int) -> list[Batch]:
    """Every validation row once, in order; the last batch is topped up with all-pad rows."""
    batches = []
    for start in range(0, self.val.num_rows, batch_size):
      rows = range(start, min(start + batch_size, self.val.num_rows))
      batches.append(self.val.batch(rows, pad_rows=batch_size - len(rows)))
    return batches

  def reference_val_batches(
    self, batch_size: int = 64, num_batches: int = 2, seed: int = 0
  ) -> list[Batch]:
    """The examples the reference scores for its validation number (DESIGN.md 6).

    The validation examples shuffled once (`np.random.default_rng(seed)`; the
    reference's torch sampler draws another permutation, so the examples differ
    but the protocol is the same), then the first `num_batches` full batches of
    `batch_size` examples, one example per row even when the split is packed
    for training (fewer when the split is smaller; a short last batch is topped
    up with all-pad rows, which change no batch's mean loss, so that every batch
    splits over a mesh). Score them with `train_step.batch_mean_eval_loss`: the
    mean of the per-batch mean losses.
    """
    examples = dataclasses.replace(
      self.val, rows=np.arange(self.val.num_examples + 1, dtype=np.int64), packed=False
    )
    order = np.random.default_rng(seed).permutation(examples.num_rows)
    batches = []
    for start in range(0, min(len(order), batch_size * num_batches), batch_size):
      rows = order[start : start + batch_size]
      batches.append(examples.batch(rows, pad_rows=batch_size - len(rows)))
    return batches


def build_datasets(
  data: Union[DataConfig, DataSpec],
  *,
  workdir: Optional[str] = None,
  seed: int = 0,
  save_tokenizer: bool = True,
  reference_padding: bool = True,
) -> Datasets:
  """The tokenised splits of `data` (a config section, or a spec resolved already).

  `save_tokenizer=False` skips the `<workdir>/tokenizer.json` copy (processes
  other than 0 of a multi-process run). `reference_padding` (a model with
  `pad_semantics='reference'`) lays unpacked rows with an end-of-text target out
  as the reference's (`Split.eos_pad_id`); False keeps the end-of-text a real
  token and pads with the tokenizer's pad id.

  `seed` does not change the data (the corpus and split are fixed by `data`,
  so runs with different seeds compare on the same validation set); the
  training order comes from `Datasets.train_iterator(batch_size, seed)`.
  """
  del seed
  spec = resolve_data_spec(data, workdir)
  created = not spec.cache_root.exists()
  try:
    return _build(spec, workdir if save_tokenizer else None, reference_padding)
  except BaseException:
    if created:  # a failed first build (bad file, full disk) leaves no cache directory behind
      shutil.rmtree(spec.cache_root, ignore_errors=True)
    raise


def _build(spec: DataSpec, tokenizer_copy_dir: Optional[str], reference_padding: bool) -> Datasets:
  """Corpus -> tokenizer -> splits, each once; the tokenizer copy goes to a non-None dir."""
  corpus = Corpus(spec)
  corpus_key = corpus.key()
  raw_key = _hash(corpus_key)
  tok = _load_tokenizer(spec, corpus, raw_key)
  eos = _eos_target_id(spec, tok)
  full_key = [raw_key, tokenizer_lib.tokenizer_fingerprint(tok), spec.max_length, spec.packing, eos]
  directory = spec.cache_root / f"{spec.source}-{_hash(full_key)}"
  splits = tokenized.load_splits(
    directory, SIDES, spec.max_length, tokenizer_lib.pad_id(tok), spec.packing
  )
  from_cache, seconds = splits is not None, 0.0
  if from_cache:
    _log.info("Loaded tokenised data from cache %s", directory)
  else:
    meta = {"key": corpus_key, "tokenizer": full_key[1], "eos_target_id": eos}
    splits, seconds = _tokenise_and_cache(spec, corpus, tok, directory, meta)
  _save_tokenizer_copy(tok, tokenizer_copy_dir)  # only once the data has been read without error
  eos_pad_id = eos if reference_padding and not spec.packing else None
  train, val = (dataclasses.replace(splits[side], eos_pad_id=eos_pad_id) for side in SIDES)
  return Datasets(tok, train, val, str(directory), from_cache, seconds)


def _tokenise_and_cache(
  spec: DataSpec, corpus: Corpus, tok: tokenizers.Tokenizer, directory: Path, meta: dict
) -> tuple[dict[str, Split], float]:
  """(both splits tokenised from the corpus' texts, seconds taken), saved in `directory`."""
  eos = meta["eos_target_id"]
  start = time.perf_counter()
  splits = {
    side: tokenized.build_split(
      tok, texts, spec.max_length, tokenizer_lib.pad_id(tok), spec.packing, eos_id=eos
    )
    for side, texts in corpus.texts().items()
  }
  seconds = time.perf_counter() - start
  meta = {
    **meta,
    "max_length": spec.max_length,
    "packing": spec.packing,
    "seconds": seconds,
    **{f"{side}_examples": split.num_examples for side, split in splits.items()},
  }
  tokenized.save_splits(directory, splits, meta)
  _log.info(
    "Tokenised %d train / %d val examples in %.1f s; cached in %s",
    splits["train"].num_examples,
    splits["val"].num_examples,
    seconds,
    directory,
  )
  return splits, seconds


def _hash(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _load_tokenizer(spec: DataSpec, corpus: Corpus, raw_key: str) -> tokenizers.Tokenizer:
  """`spec.tokenizer` (a BPE trains on the corpus' training texts), trimmed per `trim_vocab`.

  Trained and trimmed tokenizers are cached under `<cache>/tokenizers`, keyed by the
  corpus key (`raw_key`), so the corpus is read only when one must be made.
  """
  cache = spec.cache_root / "tokenizers"
  tok = tokenizer_lib.load_tokenizer(
    spec.tokenizer,
    workdir=str(cache / f"bpe-{_hash([raw_key, spec.vocab_size])}"),
    vocab_size=spec.vocab_size,
    train_texts=corpus.train_texts,
    train_key=raw_key,
  )
  if not spec.trim_vocab:
    return tok
  key = _hash([raw_key, tokenizer_lib.tokenizer_fingerprint(tok), spec.trim_vocab])
  path = cache / f"trim-{key}" / "tokenizer.json"
  declared = tokenizer_lib.special_tokens(tok)
  if path.is_file():
    return tokenizer_lib.with_special_tokens(tokenizers.Tokenizer.from_file(str(path)), declared)
  trimmed = tokenizer_lib.trim_vocabulary(tok, corpus.train_texts(), spec.trim_vocab)
  trimmed = tokenizer_lib.with_special_tokens(trimmed, declared)
  tokenizer_lib.write_text_atomic(path, trimmed.to_str())
  _log.info(
    "Trimmed the tokenizer to %d tokens (data.trim_vocab=%d); cached in %s",
    trimmed.get_vocab_size(with_added_tokens=True),
    spec.trim_vocab,
    path,
  )
  return trimmed


def _eos_target_id(spec: DataSpec, tok: tokenizers.Tokenizer) -> Optional[int]:
  """The id appended to every example (`data.eos_target`), or None when off."""
  if not spec.eos_target:
    return None
  eos = tokenizer_lib.eos_id(tok)
  if eos is None:
    fail(
      "eos_target",
      f"is True, but the tokenizer {spec.tokenizer!r} has no end-of-text token "
      f"(looked for {', '.join(tokenizer_lib.EOS_CANDIDATES)}); allowed values: False, or a "
      "tokenizer that has one",
    )
  return eos


def _save_tokenizer_copy(tok: tokenizers.Tokenizer, workdir: Optional[str]) -> None:
  """Keeps the run's exact tokenizer as `<workdir>/tokenizer.json` (for decoding later), with
  the special tokens it declares beside it."""
  if not workdir:
    return
  path = Path(workdir) / "tokenizer.json"
  if path.is_file() and path.read_text(encoding="utf-8") == tok.to_str():
    if tokenizer_lib.special_tokens(tokenizer_lib.load_file(path)) == (
      tokenizer_lib.special_tokens(tok)
    ):
      return
  tokenizer_lib.save_file(tok, path)
