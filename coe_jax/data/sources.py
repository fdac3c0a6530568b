"""Raw query/response sources: synthetic, local json/jsonl/parquet, the HF hub and TFDS.

Each source is opened as a `Table`: a row count plus random access to
`(query, response)` pairs, so that a train/validation split and the
`max_*_examples` limits read only the rows they need. Heavy libraries
(`datasets`, `tensorflow_datasets`) are imported only by the sources that
use them; TensorFlow itself is never needed. Local json/parquet files are
checked first (`check_files`): a malformed one raises `DataError` naming the
file, the 1-based line (the item of a JSON array; parquet: the column) and
what is wrong, before anything is cached.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
from typing import Any, Callable, Iterator, Optional, Sequence

from coe_jax.data import synthetic
from coe_jax.nn.model_config import ConfigError, DataError

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
      q, r = self._fetch(list(indices[start : start + chunk]))
      queries.extend(q)
      responses.extend(r)
    return queries, responses


def as_text(value: Any) -> str:
  """A cell as text: bytes are decoded as UTF-8, other non-strings go through `str`."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return value if isinstance(value, str) else str(value)


def holdout(num_rows: int, size: int, seed: int, field: str) -> tuple[list[int], list[int]]:
  """(train, val) row indices: `random.Random(seed).sample(range(num_rows), size)` is val.

  Validation keeps the sampled order; train keeps the source order.
  """
  if size >= num_rows:
    raise ConfigError(
      f"data.{field}: got {size}; it must be smaller than the {num_rows} rows it is held out from"
    )
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
      raise ConfigError(
        f"data.{field}: got {column!r}, but {what} has columns {sorted(ds.column_names)}"
      )

  def fetch(indices: Sequence[int]) -> Pairs:
    start = indices[0]
    if list(indices) == list(range(start, start + len(indices))):
      rows = ds[start : start + len(indices)]  # a contiguous slice is much cheaper than select
    else:
      rows = ds.select(indices)[:]
    return ([as_text(v) for v in rows[query_column]], [as_text(v) for v in rows[response_column]])

  return Table(len(ds), fetch)


def file_table(
  kind: str,
  files: list[str],
  query_column: str,
  response_column: str,
  cache_dir: Optional[str],
  field: str = "train_files",
) -> Table:
  """Local json/jsonl (`kind='json'`) or parquet files through `datasets.load_dataset`.

  Run `check_files` on every file of both splits first: it raises DataError
  naming a malformed file (and line) before `datasets` writes under
  `cache_dir`. `field` ('train_files' or 'val_files') names the config field in
  messages.
  """
  import datasets  # pylint: disable=import-outside-toplevel

  try:
    ds = datasets.load_dataset(kind, data_files={"data": files}, split="data", cache_dir=cache_dir)
  except Exception as error:  # what check_files does not see, e.g. mixed types in other columns
    raise DataError(
      f"data.{field}: the datasets library could not read {files} "
      f"({type(error).__name__}: {str(error)[:300]})"
    ) from error
  return _dataset_table(ds, query_column, response_column, f"{files}")


def check_files(
  kind: str, files: Sequence[str], query_column: str, response_column: str, field: str
) -> None:
  """`check_json_file` (kind 'json') or `check_parquet_file` on each file; writes nothing."""
  check = check_json_file if kind == "json" else check_parquet_file
  for path in files:
    check(path, query_column, response_column, field)


# --- checks of local files, before anything is cached -----------------------------------------

_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _open_binary(path: str) -> Any:
  """`path` for reading bytes, decompressed when its suffix is .gz/.bz2/.xz."""
  return _OPENERS.get(os.path.splitext(path)[1], open)(path, "rb")


def _row_problem(row: Any, query_column: str, response_column: str) -> Optional[str]:
  """What is wrong with one parsed row (a dict of str -> str is right), or None."""
  if not isinstance(row, dict):
    return f"not a JSON object but {type(row).__name__} {json.dumps(row)[:60]}"
  for field, column in (("query_column", query_column), ("response_column", response_column)):
    if column not in row:
      return f"data.{field}={column!r} is not a key of this row (its keys: {sorted(row)[:20]})"
    if not isinstance(row[column], str):
      return (
        f"data.{field}={column!r} holds {type(row[column]).__name__} "
        f"{json.dumps(row[column])[:60]}, not a string"
      )
  return None


def _jsonl_rows(f: Any) -> Iterator[tuple[int, Any]]:
  """(1-based line, parsed row) for each non-blank line; DataError-ready ValueErrors otherwise."""
  for line_no, raw in enumerate(f, start=1):
    try:
      text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
      raise ValueError(f"line {line_no}: not UTF-8 text ({error})") from None
    if not text.strip():
      continue
    try:
      yield line_no, json.loads(text)
    except json.JSONDecodeError as error:
      raise ValueError(
        f"line {line_no}: invalid JSON ({error.msg} at column {error.colno})"
      ) from None


def _first_byte(path: str) -> bytes:
  """The first non-whitespace byte of the (decompressed) file, b'' if none."""
  with _open_binary(path) as f:
    while chunk := f.read(4096):
      stripped = chunk.lstrip()
      if stripped:
        return stripped[:1]
  return b""


def check_json_file(
  path: str, query_column: str, response_column: str, field: str = "train_files"
) -> None:
  """Raises DataError naming `path`, the 1-based line (item for a JSON array) and the problem.

  JSON Lines: every non-blank line must be a JSON object whose query and
  response columns hold strings. A file starting with '[' is one JSON array
  of such objects. Reads the file once; writes nothing.
  """
  try:
    if _first_byte(path) == b"[":
      _check_json_array(path, query_column, response_column)
      return
    rows = 0
    with _open_binary(path) as f:
      for line_no, row in _jsonl_rows(f):
        problem = _row_problem(row, query_column, response_column)
        if problem:
          raise ValueError(f"line {line_no}: {problem}")
        rows += 1
  except (ValueError, OSError, EOFError) as error:
    raise DataError(f"data.{field}: {path}, {error}") from None
  if not rows:
    raise DataError(
      f"data.{field}: {path}: empty (no rows) ; at least one JSON object with "
      f"{query_column!r} and {response_column!r} strings, one a line"
    )


def _check_json_array(path: str, query_column: str, response_column: str) -> None:
  with _open_binary(path) as f:
    raw = f.read()
  try:
    rows = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as error:
    raise ValueError(f"not UTF-8 text ({error})") from None
  except json.JSONDecodeError as error:
    raise ValueError(
      f"line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})"
    ) from None
  if not isinstance(rows, list) or not rows:
    raise ValueError("empty (no rows) or not a JSON array of objects")
  for item, row in enumerate(rows, start=1):
    problem = _row_problem(row, query_column, response_column)
    if problem:
      raise ValueError(f"item {item} of the JSON array: {problem}")


def check_parquet_file(
  path: str, query_column: str, response_column: str, field: str = "train_files"
) -> None:
  """Raises DataError naming `path` when it is not parquet or lacks a column (reads the schema)."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  try:
    names = pq.read_schema(path).names
  except Exception as error:  # pyarrow.ArrowInvalid for a file that is not parquet, OSError
    raise DataError(
      f"data.{field}: {path}: not a readable parquet file "
      f"({type(error).__name__}: {str(error)[:200]})"
    ) from None
  for name, column in (("query_column", query_column), ("response_column", response_column)):
    if column not in names:
      raise DataError(
        f"data.{field}: {path}: data.{name}={column!r} is not a column of this "
        f"file (its columns: {sorted(names)[:20]})"
      )


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
      f"config.data.val_files, e.g. {_LOCAL_MATH_QA}."
    ) from error
  return _dataset_table(ds, query_column, response_column, f"hub dataset {name!r}")


# --- TensorFlow Datasets, read without TensorFlow -------------------------------------------------


def tfds_table(
  name: str, split: str, data_dir: Optional[str], query_feature: str, answer_feature: str
) -> Table:
  """A prepared TFDS dataset (array_record files) read through `tfds.data_source`, no TF."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as error:  # not prepared, unknown name, tfrecord-only files, ...
    raise ConfigError(
      f"data.tfds_name: could not open {name!r} split {split!r} in data.tfds_data_dir="
      f"{data_dir!r} ({type(error).__name__}: {str(error)[:300]}). Prepare it there with "
      "file_format='array_record' (readable without TensorFlow)."
    ) from error
  features = set(source.dataset_info.features.keys())
  for field, feature in (
    ("tfds_query_feature", query_feature),
    ("tfds_answer_feature", answer_feature),
  ):
    if feature not in features:
      raise ConfigError(
        f"data.{field}: got {feature!r}, but {name!r} has features {sorted(features)}"
      )

  def fetch(indices: Sequence[int]) -> Pairs:
    records = source.__getitems__(indices)
    return (
      [as_text(r[query_feature]) for r in records],
      [as_text(r[answer_feature]) for r in records],
    )

  return Table(len(source), fetch)
