"""`config.data`: the data section of a training config, its defaults and its validation.

`default_data_config()` is the embedded synthetic corpus with a BPE tokenizer
trained on it; `validate_data_config` raises one `ConfigError` naming the
first bad `data.*` field and the allowed values, before any file is read.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any, Mapping, Union

import ml_collections
from ml_collections import config_dict

from coe_jax.data import sources
from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.errors import ConfigError

SOURCES = ("synthetic", "json", "parquet", "hf", "tfds")


def _any_type(default: Any) -> config_dict.FieldReference:
  """A field that takes a string or a list (ConfigDict otherwise locks the type)."""
  return config_dict.FieldReference(default, field_type=object)


def default_data_config() -> ml_collections.ConfigDict:
  """`config.data`: the embedded synthetic corpus with a BPE tokenizer trained on it."""
  return ml_collections.ConfigDict(
    dict(
      # Where examples come from: 'synthetic' (embedded generator), 'json' / 'parquet'
      # (local files), 'hf' (Hugging Face hub, hf_name) or 'tfds' (prepared TFDS, no TF).
      source="synthetic",
      # json/parquet training files: a path, a glob, a comma-separated string or a list.
      train_files=_any_type(""),
      # json/parquet validation files; '' holds out val_size random train rows (val_seed).
      val_files=_any_type(""),
      query_column="query",  # json/parquet/hf column holding the question
      response_column="response",  # json/parquet/hf column holding the worked answer
      # 'bpe' (byte-level BPE trained on the training texts), a tokenizer.json path (or its
      # directory), or a hub name such as 'deepseek-ai/DeepSeek-V2-Lite' (needs a network).
      tokenizer="bpe",
      vocab_size=2048,  # vocabulary of the trained tokenizer when tokenizer='bpe'
      # Keep only the N tokens most frequent in the training texts (plus special tokens, byte
      # symbols and the BPE pieces they are merged from; see tokenizer.trim_vocabulary) to
      # shrink the output head of small models; 0 = the tokenizer's whole vocabulary.
      trim_vocab=0,
      max_length=512,  # tokens per row: longer examples are right-truncated, shorter padded
      # Append the tokenizer's end-of-text token to every example before truncation, as the
      # reference does by padding with EOS and scoring the first pad (DESIGN.md 6): untruncated
      # examples learn to stop; truncated ones get no EOS. False = no end-of-text target.
      eos_target=True,
      # Strip each example's text of leading and trailing whitespace, as the reference's dataset
      # does (DESIGN.md 6); False is what runs saved before this field keep on resume.
      strip_text=True,
      packing=False,  # pack several whole examples per row (segment_ids / positions)
      cache_dir="",  # tokenised-data cache; '' = <workdir>/data_cache, else ~/.cache/coe_jax
      hf_name="meta-math/MetaMathQA",  # hub dataset for source='hf'
      hf_split="train",  # split of hf_name that train and validation are drawn from
      val_size=1000,  # rows held out for validation (hf; json/tfds without a val split)
      val_seed=42,  # random.Random(val_seed).sample(range(n), size) picks held-out rows (all sources)
      tfds_name="math_dataset/arithmetic__add_or_sub",  # TFDS 'name[/config][:version]'
      tfds_data_dir="",  # directory holding the prepared TFDS data; '' = TFDS default
      tfds_query_feature="question",  # TFDS text feature used as the query
      tfds_answer_feature="answer",  # TFDS text feature used as the response
      tfds_train_split="train",  # TFDS split (slicing allowed, e.g. 'train[:10%]') to train on
      tfds_val_split="test",  # TFDS validation split; '' holds out val_size train rows
      synthetic_train_size=20000,  # generated training problems (source='synthetic')
      synthetic_val_size=500,  # generated validation problems, disjoint from training
      synthetic_seed=0,  # seed of the generated corpus (the train order uses config.seed)
      max_train_examples=0,  # keep only the first N training examples; 0 = all
      max_val_examples=0,  # keep only the first N validation examples; 0 = all
    )
  )


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


def _check_files(data: ml_collections.ConfigDict, field: str, required: bool) -> None:
  value = data[field]
  if not isinstance(value, (str, list, tuple)):
    fail(field, f"got {value!r}; must be a path, a glob, a comma-separated string or a list")
  if required and not sources.expand_files(value):
    fail(field, f"got {value!r}; source={data.source!r} needs at least one file")
  items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
  for item in (i.strip() for i in items if i.strip()):
    path = os.path.expanduser(item)
    found = glob.glob(path) if glob.has_magic(path) else [path] if os.path.isfile(path) else []
    if not found:
      fail(field, f"{item!r} matches no file (cwd {os.getcwd()!r})")


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


def _check_source_fields(data: ml_collections.ConfigDict) -> None:
  source = data.source
  if source in ("json", "parquet"):
    _check_files(data, "train_files", required=True)
    _check_files(data, "val_files", required=False)
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
  data = with_defaults(data)
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
  _check_source_fields(data)
