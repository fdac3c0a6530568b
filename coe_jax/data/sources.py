"""Raw query/response sources: synthetic, local json/jsonl/parquet, the HF hub and TFDS.

Each source is opened as a `Table`: a row count plus random access to
`(query, response)` pairs, so that a train/validation split and the
`max_*_examples` limits read only the rows they need. Heavy libraries
(`datasets`, `tensorflow_datasets`) are imported only by the sources that
use them; TensorFlow itself is never needed.
"""

from __future__ import annotations

import glob
import os
import random
from typing import Any, Callable, Optional, Sequence

from coe_jax.data import synthetic
from coe_jax.model_config import ConfigError

Pairs = tuple[list[str], list[str]]
_LOCAL_MATH_QA = "../shared/data/math_qa/{train,validation}.jsonl"


class Table:
  """`num_rows` rows read through `fetch(indices) -> (queries, responses)`."""

  def __init__(self, num_rows: int, fetch: Callable[[Sequence[int]], Pairs]):
    self.num_rows = num_rows
    self._fetch = fetch

  def read(self, indices: Sequence[int], chunk: int = 8192) -> Pairs:
    """Queries and responses of `indices`, in that order."""
    queries: list[str] = []
    responses: list[str] = []
    for start in range(0, len(indices), chunk):
      q, r = self._fetch(list(indices[start:start + chunk]))
      queries.extend(q)
      responses.extend(r)
    return queries, responses


def as_text(value: Any) -> str:
  """A cell as text: bytes are decoded as UTF-8, other non-strings go through `str`."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return value if isinstance(value, str) else str(value)


def expand_files(spec: Any) -> list[str]:
  """`train_files`/`val_files` (a path, glob, comma-separated string or list) as sorted paths."""
  if spec is None or spec == "":
    return []
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  paths: list[str] = []
  for item in (str(i).strip() for i in items):
    if not item:
      continue
    item = os.path.expanduser(item)
    matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
    paths.extend(matches)
  return paths


def holdout(num_rows: int, size: int, seed: int, field: str) -> tuple[list[int], list[int]]:
  """(train, val) row indices: `random.Random(seed).sample(range(num_rows), size)` is val.

  Validation keeps the sampled order; train keeps the source order.
  """
  if size >= num_rows:
    raise ConfigError(f"data.{field}: got {size}; it must be smaller than the {num_rows} rows it "
                      "is held out from")
  val = random.Random(seed).sample(range(num_rows), size)
  taken = set(val)
  return [i for i in range(num_rows) if i not in taken], val


# --- synthetic --------------------------------------------------------------------------------

def synthetic_table(num_rows: int, seed: int) -> Table:
  """The embedded generated corpus (`synthetic.generate_examples`)."""
  examples = synthetic.generate_examples(num_rows, seed)

  def fetch(indices: Sequence[int]) -> Pairs:
    return [examples[i]["query"] for i in indices], [examples[i]["response"] for i in indices]
  return Table(num_rows, fetch)


# --- Hugging Face datasets (local json/parquet or the hub) ---------------------------------------

def _dataset_table(ds: Any, query_column: str, response_column: str, what: str) -> Table:
  for field, column in (("query_column", query_column), ("response_column", response_column)):
    if column not in ds.column_names:
      raise ConfigError(f"data.{field}: got {column!r}, but {what} has columns "
                        f"{sorted(ds.column_names)}")

  def fetch(indices: Sequence[int]) -> Pairs:
    start = indices[0]
    if list(indices) == list(range(start, start + len(indices))):
      rows = ds[start:start + len(indices)]  # a contiguous slice is much cheaper than select
    else:
      rows = ds.select(indices)[:]
    return ([as_text(v) for v in rows[query_column]], [as_text(v) for v in rows[response_column]])
  return Table(len(ds), fetch)


def file_table(kind: str, files: list[str], query_column: str, response_column: str,
               cache_dir: Optional[str]) -> Table:
  """Local json/jsonl (`kind='json'`) or parquet files through `datasets.load_dataset`."""
  import datasets  # pylint: disable=import-outside-toplevel
  ds = datasets.load_dataset(kind, data_files={"data": files}, split="data", cache_dir=cache_dir)
  return _dataset_table(ds, query_column, response_column, f"{files}")


def hub_table(name: str, split: str, query_column: str, response_column: str) -> Table:
  """A dataset on the Hugging Face hub (e.g. meta-math/MetaMathQA); a clear error offline."""
  import datasets  # pylint: disable=import-outside-toplevel
  try:
    ds = datasets.load_dataset(name, split=split)
  except Exception as error:  # ConnectionError offline, DatasetNotFoundError, ...
    raise ConfigError(
        f"data.source='hf': could not load data.hf_name={name!r} (split {split!r}) from the "
        f"Hugging Face hub ({type(error).__name__}: {str(error)[:200]}). Without a network, "
        "use local files instead: config.data.source='json' with config.data.train_files and "
        f"config.data.val_files, e.g. {_LOCAL_MATH_QA}.") from error
  return _dataset_table(ds, query_column, response_column, f"hub dataset {name!r}")


# --- TensorFlow Datasets, read without TensorFlow -------------------------------------------------

def tfds_table(name: str, split: str, data_dir: Optional[str], query_feature: str,
               answer_feature: str) -> Table:
  """A prepared TFDS dataset (array_record files) read through `tfds.data_source`, no TF."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as error:  # not prepared, unknown name, tfrecord-only files, ...
    raise ConfigError(
        f"data.tfds_name: could not open {name!r} split {split!r} in data.tfds_data_dir="
        f"{data_dir!r} ({type(error).__name__}: {str(error)[:300]}). Prepare it there with "
        "file_format='array_record' (readable without TensorFlow).") from error
  features = set(source.dataset_info.features.keys())
  for field, feature in (("tfds_query_feature", query_feature),
                         ("tfds_answer_feature", answer_feature)):
    if feature not in features:
      raise ConfigError(
          f"data.{field}: got {feature!r}, but {name!r} has features {sorted(features)}")

  def fetch(indices: Sequence[int]) -> Pairs:
    records = source.__getitems__(indices)
    return ([as_text(r[query_feature]) for r in records],
            [as_text(r[answer_feature]) for r in records])
  return Table(len(source), fetch)
