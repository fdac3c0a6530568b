"""The input pipeline: `config.data` -> tokenised, cached train/val splits -> numpy batches.

Every example becomes `query : {query} response : {response}` (DESIGN.md 6),
tokenised without special tokens, right-truncated to `max_length` and padded
with the tokenizer's pad id. With `data.eos_target` (default, as the reference
trains) every example that is not truncated ends in the tokenizer's end-of-text
token, so its last real token learns to predict EOS (DESIGN.md 6). Tokenisation runs
once per (data, tokenizer, max_length, packing, eos_target) and is cached as
`.npy` files; later builds memory-map them.

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
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import ml_collections
import numpy as np
import tokenizers

from coe_jax.data import sources, synthetic, tokenized
from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.data.data_config import (  # noqa: F401
  SOURCES,
  DataConfig,
  default_data_config,
  fail,
  validate_data_config,
  with_defaults,
)
from coe_jax.data.iterator import TrainIterator
from coe_jax.data.tokenized import Batch, Split, format_example, format_prompt

__all__ = [
  "Batch",
  "Datasets",
  "Split",
  "TrainIterator",
  "build_datasets",
  "default_data_config",
  "format_example",
  "format_prompt",
  "validate_data_config",
  "SOURCES",
]

CACHE_VERSION = 2  # bump when the cached layout or the text format changes
_log = logging.getLogger(__name__)


# --- datasets -------------------------------------------------------------------------------------


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
    for training (fewer when the split is smaller). Score them with
    `train_step.evaluate_batch_means`: the mean of the per-batch mean losses.
    """
    examples = dataclasses.replace(
      self.val, rows=np.arange(self.val.num_examples + 1, dtype=np.int64), packed=False
    )
    order = np.random.default_rng(seed).permutation(examples.num_rows)
    return [
      examples.batch(order[start : start + batch_size])
      for start in range(0, min(len(order), batch_size * num_batches), batch_size)
    ]


def _hash(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _file_stats(files: list[str]) -> list[list[Any]]:
  return [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]


def _tfds_stats(data: ml_collections.ConfigDict) -> list[list[Any]]:
  """Sizes and mtimes of the prepared TFDS files, so re-preparing invalidates the cache."""
  default = os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))
  root = os.path.expanduser(data.tfds_data_dir or default)
  base = data.tfds_name.split(":")[0]
  files = sorted(glob.glob(os.path.join(root, base, "**", "*"), recursive=True))
  return _file_stats([f for f in files if os.path.isfile(f)])


def data_key(data: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything that fixes the raw examples of both splits (not the tokenizer)."""
  key: dict[str, Any] = {
    "version": CACHE_VERSION,
    "source": data.source,
    "max_train": data.max_train_examples,
    "max_val": data.max_val_examples,
  }
  if data.source == "synthetic":
    key.update(
      generator=synthetic.SYNTHETIC_VERSION,
      train=data.synthetic_train_size,
      val=data.synthetic_val_size,
      seed=data.synthetic_seed,
    )
  elif data.source in ("json", "parquet"):
    key.update(
      train=_file_stats(sources.expand_files(data.train_files)),
      val=_file_stats(sources.expand_files(data.val_files)),
    )
  elif data.source == "hf":
    key.update(name=data.hf_name, split=data.hf_split)
  else:
    key.update(
      name=data.tfds_name,
      data_dir=os.path.abspath(os.path.expanduser(data.tfds_data_dir))
      if data.tfds_data_dir
      else "",
      train_split=data.tfds_train_split,
      val_split=data.tfds_val_split,
      columns=[data.tfds_query_feature, data.tfds_answer_feature],
      files=_tfds_stats(data),
    )
  if data.source in ("json", "parquet", "hf"):
    key["columns"] = [data.query_column, data.response_column]
  if _uses_holdout(data):
    key.update(val_size=data.val_size, val_seed=data.val_seed)
  if data.strip_text:  # absent when False: the key of caches written before the field
    key["strip_text"] = True
  return key


def _uses_holdout(data: ml_collections.ConfigDict) -> bool:
  if data.source in ("json", "parquet"):
    return not sources.expand_files(data.val_files)
  return data.source == "hf" or (data.source == "tfds" and not data.tfds_val_split)


def _table_opener(data: ml_collections.ConfigDict, hf_cache: str) -> Callable[[str], sources.Table]:
  """A function opening the 'train' or 'val' side of a non-synthetic source."""
  if data.source in ("json", "parquet"):
    return lambda which: sources.file_table(
      data.source,
      sources.expand_files(data[f"{which}_files"]),
      data.query_column,
      data.response_column,
      hf_cache,
      field=f"{which}_files",
    )
  if data.source == "hf":
    return lambda which: sources.hub_table(
      data.hf_name, data.hf_split, data.query_column, data.response_column
    )
  return lambda which: sources.tfds_table(
    data.tfds_name,
    data[f"tfds_{which}_split"],
    data.tfds_data_dir,
    data.tfds_query_feature,
    data.tfds_answer_feature,
  )


def _open_tables(
  data: ml_collections.ConfigDict, hf_cache: str
) -> tuple[sources.Table, list[int], sources.Table, list[int]]:
  """(train table, train rows, val table, val rows) before the max_* limits."""
  if data.source == "synthetic":
    size = data.synthetic_train_size + data.synthetic_val_size
    table = sources.synthetic_table(size, data.synthetic_seed)
    train, val = sources.holdout(size, data.synthetic_val_size, data.val_seed, "synthetic_val_size")
    return table, train, table, val
  open_table = _table_opener(data, hf_cache)
  train_table = open_table("train")
  if _uses_holdout(data):
    train, val = sources.holdout(train_table.num_rows, data.val_size, data.val_seed, "val_size")
    return train_table, train, train_table, val
  val_table = open_table("val")
  return (
    train_table,
    list(range(train_table.num_rows)),
    val_table,
    list(range(val_table.num_rows)),
  )


class _Texts:
  """Reads and formats both splits' texts once, on first use."""

  def __init__(self, data: ml_collections.ConfigDict, hf_cache: str):
    self._data, self._hf_cache = data, hf_cache
    self._texts: Optional[dict[str, list[str]]] = None

  def get(self) -> dict[str, list[str]]:
    if self._texts is None:
      _check_local_files(self._data)
      train_table, train, val_table, val = _open_tables(self._data, self._hf_cache)
      if self._data.max_train_examples:
        train = train[: self._data.max_train_examples]
      if self._data.max_val_examples:
        val = val[: self._data.max_val_examples]
      strip = self._data.strip_text
      self._texts = {
        "train": _format(train_table.read(train), strip),
        "val": _format(val_table.read(val), strip),
      }
    return self._texts

  def train_texts(self) -> list[str]:
    return self.get()["train"]


def _check_local_files(data: ml_collections.ConfigDict) -> None:
  """Raises DataError for a malformed json/parquet file of either split, before any is cached."""
  if data.source in ("json", "parquet"):
    for field in ("train_files", "val_files"):
      sources.check_files(
        data.source,
        sources.expand_files(data[field]),
        data.query_column,
        data.response_column,
        field,
      )


def _format(pairs: sources.Pairs, strip: bool) -> list[str]:
  texts = [format_example(q, r) for q, r in zip(*pairs)]
  return [t.strip() for t in texts] if strip else texts


def resolve_cache_dir(data: ml_collections.ConfigDict, workdir: Optional[str]) -> Path:
  """`data.cache_dir`, else `<workdir>/data_cache`, else `~/.cache/coe_jax` (or $COE_JAX_CACHE)."""
  if data.cache_dir:
    return Path(os.path.expanduser(data.cache_dir))
  if workdir:
    return Path(workdir) / "data_cache"
  return tokenizer_lib.default_cache_root()


def _load_tokenizer(
  data: ml_collections.ConfigDict, cache: Path, raw_key: str, texts: _Texts
) -> tokenizers.Tokenizer:
  workdir = str(cache / "tokenizers" / f"bpe-{_hash([raw_key, data.vocab_size])}")
  tok = tokenizer_lib.load_tokenizer(
    data.tokenizer,
    workdir=workdir,
    vocab_size=data.vocab_size,
    train_texts=texts.train_texts,
    train_key=raw_key,
  )
  if not data.trim_vocab:
    return tok
  key = _hash([raw_key, tokenizer_lib.tokenizer_fingerprint(tok), data.trim_vocab])
  path = cache / "tokenizers" / f"trim-{key}" / "tokenizer.json"
  declared = tokenizer_lib.special_tokens(tok)
  if path.is_file():
    return tokenizer_lib.with_special_tokens(tokenizers.Tokenizer.from_file(str(path)), declared)
  trimmed = tokenizer_lib.trim_vocabulary(tok, texts.train_texts(), data.trim_vocab)
  trimmed = tokenizer_lib.with_special_tokens(trimmed, declared)
  tokenizer_lib.write_text_atomic(path, trimmed.to_str())
  _log.info(
    "Trimmed the tokenizer to %d tokens (data.trim_vocab=%d); cached in %s",
    trimmed.get_vocab_size(with_added_tokens=True),
    data.trim_vocab,
    path,
  )
  return trimmed


def build_datasets(
  data: DataConfig,
  *,
  workdir: Optional[str] = None,
  seed: int = 0,
  save_tokenizer: bool = True,
  reference_padding: bool = True,
) -> Datasets:
  """Validates `data`, loads or builds the tokenised splits and returns them.

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
  data = with_defaults(data)
  validate_data_config(data)
  cache = resolve_cache_dir(data, workdir)
  created = not cache.exists()
  try:
    return _build_datasets(data, cache, workdir if save_tokenizer else None, reference_padding)
  except BaseException:
    if created:  # a failed first build (bad file, full disk) leaves no cache directory behind
      shutil.rmtree(cache, ignore_errors=True)
    raise


def _build_datasets(
  data: DataConfig, cache: Path, workdir: Optional[str], reference_padding: bool
) -> Datasets:
  """`build_datasets` once `data` is valid; the tokenizer copy goes to `workdir` unless None."""
  raw_key = _hash(data_key(data))
  texts = _Texts(data, str(cache / "hf_datasets"))
  tok = _load_tokenizer(data, cache, raw_key, texts)
  eos = _eos_target_id(data, tok)
  full_key = [raw_key, tokenizer_lib.tokenizer_fingerprint(tok), data.max_length, data.packing, eos]
  directory = cache / f"{data.source}-{_hash(full_key)}"
  args = (data.max_length, tokenizer_lib.pad_id(tok), data.packing)
  layout = _row_layout(eos if reference_padding and not data.packing else None)
  splits = tokenized.load_splits(directory, ("train", "val"), *args)
  if splits is not None:
    _log.info("Loaded tokenised data from cache %s", directory)
    _save_tokenizer_copy(tok, workdir)
    return Datasets(tok, layout(splits["train"]), layout(splits["val"]), str(directory), True, 0.0)
  start = time.perf_counter()
  splits = {
    name: tokenized.build_split(tok, t, *args, eos_id=eos) for name, t in texts.get().items()
  }
  seconds = time.perf_counter() - start
  meta = {
    "key": data_key(data),
    "tokenizer": full_key[1],
    "max_length": data.max_length,
    "packing": data.packing,
    "eos_target_id": eos,
    "seconds": seconds,
    **{f"{n}_examples": s.num_examples for n, s in splits.items()},
  }
  tokenized.save_splits(directory, splits, meta)
  _save_tokenizer_copy(tok, workdir)  # only once the data has been read without error
  _log.info(
    "Tokenised %d train / %d val examples in %.1f s; cached in %s",
    splits["train"].num_examples,
    splits["val"].num_examples,
    seconds,
    directory,
  )
  return Datasets(
    tok, layout(splits["train"]), layout(splits["val"]), str(directory), False, seconds
  )


def _row_layout(eos_pad_id: Optional[int]) -> Callable[[Split], Split]:
  """How batches of a split are laid out: the reference's (padded with `eos_pad_id`) or ours."""
  return lambda split: dataclasses.replace(split, eos_pad_id=eos_pad_id)


def _eos_target_id(data: ml_collections.ConfigDict, tok: tokenizers.Tokenizer) -> Optional[int]:
  """The id appended to every example (`data.eos_target`), or None when off."""
  if not data.eos_target:
    return None
  eos = tokenizer_lib.eos_id(tok)
  if eos is None:
    fail(
      "eos_target",
      f"is True, but the tokenizer {data.tokenizer!r} has no end-of-text token "
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
