"""The corpus of a `DataSpec`: both splits' raw examples, read once, and the key that fixes them.

`Corpus(spec)` opens the spec's source through `sources` (a `Table` per side),
splits train from validation (the source's own validation split, or
`sources.holdout` rows), applies the `max_*_examples` limits and formats every
example as training text (DESIGN.md 6). Nothing is read until the texts are
first asked for: a cached build never opens the source. Local json/parquet files
of both splits are checked first, so a malformed one raises a `DataError` naming
the file and line before anything is cached.

`Corpus.key()` is everything that fixes the raw examples (not the tokenizer):
the cache keys of trained tokenizers and tokenised splits start from it.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Optional

from coe_jax.data import sources, synthetic
from coe_jax.data.data_config import DataSpec
from coe_jax.data.tokenized import format_example

CACHE_VERSION = 2  # bump when the cached layout or the text format changes
SIDES = ("train", "val")


class Corpus:
  """The formatted train and validation texts `spec` names, read on first use."""

  def __init__(self, spec: DataSpec):
    self.spec = spec
    self._texts: Optional[dict[str, list[str]]] = None

  def texts(self) -> dict[str, list[str]]:
    """{'train': texts, 'val': texts}, in split order; read and formatted on the first call."""
    if self._texts is None:
      self._texts = self._read()
    return self._texts

  def train_texts(self) -> list[str]:
    """The training texts (what a BPE tokenizer is trained on and a vocabulary trimmed to)."""
    return self.texts()["train"]

  def key(self) -> dict[str, Any]:
    """Everything that fixes the raw examples of both splits (not the tokenizer)."""
    spec = self.spec
    key: dict[str, Any] = {
      "version": CACHE_VERSION,
      "source": spec.source,
      "max_train": spec.max_train_examples,
      "max_val": spec.max_val_examples,
    }
    if spec.source == "synthetic":
      key.update(
        generator=synthetic.SYNTHETIC_VERSION,
        train=spec.synthetic_train_size,
        val=spec.synthetic_val_size,
        seed=spec.synthetic_seed,
      )
    elif spec.source in ("json", "parquet"):
      key.update(train=_file_stats(spec.train_paths), val=_file_stats(spec.val_paths))
    elif spec.source == "hf":
      key.update(name=spec.hf_name, split=spec.hf_split)
    else:
      key.update(_tfds_key(spec))
    if spec.source in ("json", "parquet", "hf"):
      key["columns"] = [spec.query_column, spec.response_column]
    if spec.holds_out_val:
      key.update(val_size=spec.val_size, val_seed=spec.val_seed)
    if spec.strip_text:  # absent when False: the key of caches written before the field
      key["strip_text"] = True
    return key

  def _read(self) -> dict[str, list[str]]:
    spec = self.spec
    if spec.source in ("json", "parquet"):
      for side, paths in zip(SIDES, (spec.train_paths, spec.val_paths)):
        sources.check_files(
          spec.source, paths, spec.query_column, spec.response_column, f"{side}_files"
        )
    train_table, train, val_table, val = _open_tables(spec)
    if spec.max_train_examples:
      train = train[: spec.max_train_examples]
    if spec.max_val_examples:
      val = val[: spec.max_val_examples]
    return {
      "train": _format(train_table.read(train), spec.strip_text),
      "val": _format(val_table.read(val), spec.strip_text),
    }


def _format(pairs: sources.Pairs, strip: bool) -> list[str]:
  texts = [format_example(q, r) for q, r in zip(*pairs)]
  return [t.strip() for t in texts] if strip else texts


def _open_table(spec: DataSpec, side: str) -> sources.Table:
  """The 'train' or 'val' side of a source other than 'synthetic'."""
  if spec.source in ("json", "parquet"):
    return sources.file_table(
      spec.source,
      list(spec.train_paths if side == "train" else spec.val_paths),
      spec.query_column,
      spec.response_column,
      str(spec.cache_root / "hf_datasets"),
      field=f"{side}_files",
    )
  if spec.source == "hf":
    return sources.hub_table(spec.hf_name, spec.hf_split, spec.query_column, spec.response_column)
  return sources.tfds_table(
    spec.tfds_name,
    spec.tfds_train_split if side == "train" else spec.tfds_val_split,
    spec.tfds_data_dir,
    spec.tfds_query_feature,
    spec.tfds_answer_feature,
  )


def _open_tables(spec: DataSpec) -> tuple[sources.Table, list[int], sources.Table, list[int]]:
  """(train table, train rows, val table, val rows) before the max_* limits."""
  if spec.source == "synthetic":
    size = spec.synthetic_train_size + spec.synthetic_val_size
    table = sources.synthetic_table(size, spec.synthetic_seed)
    train, val = sources.holdout(size, spec.synthetic_val_size, spec.val_seed, "synthetic_val_size")
    return table, train, table, val
  train_table = _open_table(spec, "train")
  if spec.holds_out_val:
    train, val = sources.holdout(train_table.num_rows, spec.val_size, spec.val_seed, "val_size")
    return train_table, train, train_table, val
  val_table = _open_table(spec, "val")
  return train_table, list(range(train_table.num_rows)), val_table, list(range(val_table.num_rows))


def _file_stats(files: tuple[str, ...]) -> list[list[Any]]:
  return [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]


def _tfds_key(spec: DataSpec) -> dict[str, Any]:
  """The TFDS dataset and split names, and its prepared files' sizes and mtimes (re-preparing
  invalidates the cache)."""
  default = os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))
  root = os.path.expanduser(spec.tfds_data_dir or default)
  files = sorted(
    glob.glob(os.path.join(root, spec.tfds_name.split(":")[0], "**", "*"), recursive=True)
  )
  data_dir = spec.tfds_data_dir
  return dict(
    name=spec.tfds_name,
    data_dir=os.path.abspath(os.path.expanduser(data_dir)) if data_dir else "",
    train_split=spec.tfds_train_split,
    val_split=spec.tfds_val_split,
    columns=[spec.tfds_query_feature, spec.tfds_answer_feature],
    files=_file_stats(tuple(f for f in files if os.path.isfile(f))),
  )
