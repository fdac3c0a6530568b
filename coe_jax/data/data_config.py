"""`config.data`: its fields and defaults, their validation, and the resolved `DataSpec`.

`default_data_config()` is the embedded synthetic corpus with a BPE tokenizer
trained on it (the fields, types and defaults are `DataFields`). The input
pipeline starts from `resolve_data_spec(config.data, workdir)`: it validates the
fields once, raising one `ConfigError` naming the first bad `data.*` field and
the allowed values before any file is read, and resolves what they name (file
patterns to paths, the cache directory) into a frozen `DataSpec` that every later
stage reads instead of the config.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import ml_collections
from ml_collections import config_dict

from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.errors import ConfigError

SOURCES = ("synthetic", "json", "parquet", "hf", "tfds")
FilePatterns = Union[str, Sequence[str]]  # a path, a glob, a comma-separated string or a list


@dataclasses.dataclass(frozen=True)
class DataFields:
  """The fields of `config.data` with their types and defaults (`default_data_config()`)."""

  # Where examples come from: 'synthetic' (embedded generator), 'json' / 'parquet'
  # (local files), 'hf' (Hugging Face hub, hf_name) or 'tfds' (prepared TFDS, no TF).
  source: str = "synthetic"
  # json/parquet training files: a path, a glob, a comma-separated string or a list.
  train_files: FilePatterns = ""
  # json/parquet validation files; '' holds out val_size random train rows (val_seed).
  val_files: FilePatterns = ""
  query_column: str = "query"  # json/parquet/hf column holding the question
  response_column: str = "response"  # json/parquet/hf column holding the worked answer
  # 'bpe' (byte-level BPE trained on the training texts), a tokenizer.json path (or its
  # directory), or a hub name such as 'deepseek-ai/DeepSeek-V2-Lite' (needs a network).
  tokenizer: str = "bpe"
  vocab_size: int = 2048  # vocabulary of the trained tokenizer when tokenizer='bpe'
  # Keep only the N tokens most frequent in the training texts (plus special tokens, byte
  # symbols and the BPE pieces they are merged from; see tokenizer.trim_vocabulary) to
  # shrink the output head of small models; 0 = the tokenizer's whole vocabulary.
  trim_vocab: int = 0
  max_length: int = 512  # tokens per row: longer examples are right-truncated, shorter padded
  # Append the tokenizer's end-of-text token to every example before truncation, as the
  # reference does by padding with EOS and scoring the first pad (DESIGN.md 6): untruncated
  # examples learn to stop; truncated ones get no EOS. False = no end-of-text target.
  eos_target: bool = True
  # Strip each example's text of leading and trailing whitespace, as the reference's dataset
  # does (DESIGN.md 6); False is what runs saved before this field keep on resume.
  strip_text: bool = True
  packing: bool = False  # pack several whole examples per row (segment_ids / positions)
  cache_dir: str = ""  # tokenised-data cache; '' = <workdir>/data_cache, else ~/.cache/coe_jax
  hf_name: str = "meta-math/MetaMathQA"  # hub dataset for source='hf'
  hf_split: str = "train"  # split of hf_name that train and validation are drawn from
  val_size: int = 1000  # rows held out for validation (hf; json/tfds without a val split)
  # random.Random(val_seed).sample(range(n), val_size) picks the held-out rows (all sources)
  val_seed: int = 42
  tfds_name: str = "math_dataset/arithmetic__add_or_sub"  # TFDS 'name[/config][:version]'
  tfds_data_dir: str = ""  # directory holding the prepared TFDS data; '' = TFDS default
  tfds_query_feature: str = "question"  # TFDS text feature used as the query
  tfds_answer_feature: str = "answer"  # TFDS text feature used as the response
  tfds_train_split: str = "train"  # TFDS split (slicing allowed, e.g. 'train[:10%]') to train on
  tfds_val_split: str = "test"  # TFDS validation split; '' holds out val_size train rows
  synthetic_train_size: int = 20000  # generated training problems (source='synthetic')
  synthetic_val_size: int = 500  # generated validation problems, disjoint from training
  synthetic_seed: int = 0  # seed of the generated corpus (the train order uses config.seed)
  max_train_examples: int = 0  # keep only the first N training examples; 0 = all
  max_val_examples: int = 0  # keep only the first N validation examples; 0 = all


@dataclasses.dataclass(frozen=True)
class DataSpec(DataFields):
  """`config.data` validated and resolved, once (`resolve_data_spec`): what the pipeline reads.

  Besides the fields, it holds what they resolve to: the json/parquet paths of each split
  (patterns expanded, sorted; empty for other sources), whether validation rows are held
  out of the training rows, and the cache directory.
  """

  train_paths: tuple[str, ...] = ()
  val_paths: tuple[str, ...] = ()
  holds_out_val: bool = False  # validation rows are val_size rows sampled from the training rows
  cache_root: Path = Path()  # where tokenised splits and trained tokenizers are cached


def default_data_config() -> ml_collections.ConfigDict:
  """`config.data`: the embedded synthetic corpus with a BPE tokenizer trained on it."""
  defaults = {field.name: field.default for field in dataclasses.fields(DataFields)}
  for name in ("train_files", "val_files"):  # a string or a list (ConfigDict locks the type)
    defaults[name] = config_dict.FieldReference(defaults[name], field_type=object)
  return ml_collections.ConfigDict(defaults)


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


# --- validation -----------------------------------------------------------------------------------


def fail(field: str, message: str) -> None:
  raise ConfigError(f"data.{field}: {message}")


def _check_int(data: ml_collections.ConfigDict, field: str, minimum: int) -> None:
  value = data[field]
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    fail(field, f"got {value!r}; must be an integer >= {minimum}")


def _check_str(data: ml_collections.ConfigDict, field: str) -> None:
  value = data[field]
  if not isinstance(value, str) or not value:
    fail(field, f"got {value!r}; must be a non-empty string")


def _check_files(data: ml_collections.ConfigDict, field: str, required: bool) -> tuple[str, ...]:
  """The paths `data[field]` names (`expand_files`), each pattern checked to match a file."""
  value = data[field]
  if not isinstance(value, (str, list, tuple)):
    fail(field, f"got {value!r}; must be a path, a glob, a comma-separated string or a list")
  paths = tuple(expand_files(value))
  if required and not paths:
    fail(field, f"got {value!r}; source={data.source!r} needs at least one file")
  items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
  for item in (i.strip() for i in items if i.strip()):
    path = os.path.expanduser(item)
    found = glob.glob(path) if glob.has_magic(path) else [path] if os.path.isfile(path) else []
    if not found:
      fail(field, f"{item!r} matches no file (cwd {os.getcwd()!r})")
  return paths


def _check_tokenizer(data: ml_collections.ConfigDict) -> None:
  _check_str(data, "tokenizer")
  spec = data.tokenizer
  if spec == "bpe":
    _check_int(data, "vocab_size", 259)  # 256 bytes + pad + eos + at least one merge
  elif tokenizer_lib.looks_like_path(spec):
    path = os.path.expanduser(spec)
    if not (os.path.isfile(path) or os.path.isfile(os.path.join(path, "tokenizer.json"))):
      fail(
        "tokenizer",
        f"got {spec!r}, which is not a tokenizer.json file or a directory "
        "holding one; allowed values: 'bpe', a tokenizer.json path, or a hub name",
      )


def _check_source_fields(data: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
  """Checks the fields of `data.source`; returns the (train, val) json/parquet paths."""
  source = data.source
  paths: tuple[tuple[str, ...], ...] = ((), ())
  if source in ("json", "parquet"):
    paths = (
      _check_files(data, "train_files", required=True),
      _check_files(data, "val_files", required=False),
    )
  if source in ("json", "parquet", "hf"):
    _check_str(data, "query_column")
    _check_str(data, "response_column")
  if source == "hf":
    _check_str(data, "hf_name")
    _check_str(data, "hf_split")
  if source == "tfds":
    _check_tfds(data)
  if source == "synthetic":
    _check_int(data, "synthetic_train_size", 1)
    _check_int(data, "synthetic_val_size", 1)
    _check_int(data, "synthetic_seed", 0)
  return paths


def _check_tfds(data: ml_collections.ConfigDict) -> None:
  for field in ("tfds_name", "tfds_query_feature", "tfds_answer_feature", "tfds_train_split"):
    _check_str(data, field)
  if not isinstance(data.tfds_val_split, str):
    fail("tfds_val_split", f"got {data.tfds_val_split!r}; must be a split name or ''")
  if data.tfds_data_dir and not os.path.isdir(os.path.expanduser(data.tfds_data_dir)):
    fail("tfds_data_dir", f"got {data.tfds_data_dir!r}, which is not a directory")
  if importlib.util.find_spec("tensorflow_datasets") is None:
    fail(
      "source",
      "got 'tfds', but tensorflow-datasets is not installed "
      "(pip install 'coe_jax[tfds]'; TensorFlow itself is not needed)",
    )


DataConfig = Union[ml_collections.ConfigDict, Mapping[str, Any]]


def with_defaults(data: DataConfig) -> ml_collections.ConfigDict:
  """`data` over the defaults (missing fields take default values), as a fresh ConfigDict."""
  allowed = default_data_config().to_dict()
  unknown = sorted(set(data.keys()) - set(allowed))
  if unknown:
    raise ConfigError(f"data config: unknown field(s) {unknown}; allowed fields: {sorted(allowed)}")
  return ml_collections.ConfigDict({**allowed, **{k: data[k] for k in data.keys()}})


def validate_data_config(data: DataConfig) -> None:
  """Raises ConfigError naming the first bad `config.data` field; reads no data."""
  _validate(with_defaults(data))


def _validate(data: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
  """`validate_data_config` of `data` (with defaults); returns the (train, val) file paths."""
  if data.source not in SOURCES:
    fail("source", f"got {data.source!r}; allowed values: {', '.join(SOURCES)}")
  _check_int(data, "max_length", 2)
  for field in ("packing", "eos_target", "strip_text"):
    if not isinstance(data[field], bool):
      fail(field, f"got {data[field]!r}; allowed values: True, False")
  if not isinstance(data.cache_dir, str):
    fail("cache_dir", f"got {data.cache_dir!r}; must be a directory path or ''")
  for field in ("max_train_examples", "max_val_examples", "val_seed", "trim_vocab"):
    _check_int(data, field, 0)
  _check_int(data, "val_size", 1)
  _check_tokenizer(data)
  return _check_source_fields(data)


def resolve_cache_dir(data: DataConfig, workdir: Optional[str]) -> Path:
  """`data.cache_dir`, else `<workdir>/data_cache`, else `~/.cache/coe_jax` (or $COE_JAX_CACHE)."""
  if data["cache_dir"]:
    return Path(os.path.expanduser(data["cache_dir"]))
  if workdir:
    return Path(workdir) / "data_cache"
  return tokenizer_lib.default_cache_root()


def resolve_data_spec(data: Union[DataConfig, DataSpec], workdir: Optional[str] = None) -> DataSpec:
  """`data` validated once (a `ConfigError` naming the first bad field) and resolved; reads no data.

  A `DataSpec` is returned as it is: it was resolved already.
  """
  if isinstance(data, DataSpec):
    return data
  data = with_defaults(data)
  train_paths, val_paths = _validate(data)
  fields = {
    name: tuple(value) if isinstance(value, list) else value for name, value in data.items()
  }
  if data.source in ("json", "parquet"):
    holds_out_val = not val_paths
  else:
    holds_out_val = data.source == "hf" or (data.source == "tfds" and not data.tfds_val_split)
  return DataSpec(
    **fields,
    train_paths=train_paths,
    val_paths=val_paths,
    holds_out_val=holds_out_val,
    cache_root=resolve_cache_dir(data, workdir),
  )
