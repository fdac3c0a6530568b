"""Tests for coe_jax.data: the resolved spec, text layout, caching, packing, iteration, checks."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from data_helpers import ROWS, small_data_config, texts_of, write_rows
from tokenizers import processors

from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.data.corpus import Corpus
from coe_jax.data.input_pipeline import (
  build_datasets,
  default_data_config,
  format_example,
  resolve_data_spec,
  validate_data_config,
)
from coe_jax.data.tokenized import build_split
from coe_jax.nn.model_config import ConfigError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  """One small synthetic build shared by the iterator and batching tests."""
  tmp = tmp_path_factory.mktemp("synth")
  return build_datasets(small_data_config(tmp), workdir=str(tmp / "run"), seed=0)


# --- the resolved spec and the one-way flow -------------------------------------------------------


def test_the_spec_resolves_patterns_hold_out_and_cache_once_and_is_frozen(tmp_path):
  part0 = write_rows(tmp_path / "part0.jsonl", ROWS[:3])
  part1 = write_rows(tmp_path / "part1.jsonl", ROWS[3:])
  data = small_data_config(
    tmp_path,
    source="json",
    train_files=str(tmp_path / "part*.jsonl"),
    query_column="question",
    response_column="solution",
    val_size=2,
    cache_dir="",
  )
  spec = resolve_data_spec(data, workdir=str(tmp_path / "run"))
  assert spec.train_paths == (str(part0), str(part1)) and spec.val_paths == ()
  assert spec.holds_out_val and spec.cache_root == tmp_path / "run" / "data_cache"
  assert resolve_data_spec(spec) is spec  # resolved once; later stages take it as it is
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.max_length = 8
  data.val_files = str(part1)
  assert not resolve_data_spec(data).holds_out_val
  synthetic_spec = resolve_data_spec(small_data_config(tmp_path))
  assert synthetic_spec.train_paths == () and synthetic_spec.cache_root == tmp_path / "cache"


def test_a_cached_build_never_reads_the_source(tmp_path, monkeypatch):
  spec = resolve_data_spec(small_data_config(tmp_path))
  first = build_datasets(spec)
  reads = []
  monkeypatch.setattr(Corpus, "_read", lambda corpus: reads.append(1) or {})
  again = build_datasets(spec)
  assert again.from_cache and not reads
  np.testing.assert_array_equal(again.train.tokens, first.train.tokens)
  assert again.cache_path == first.cache_path


# --- text format, truncation, padding -------------------------------------------------------------


def test_text_format_has_no_special_tokens(tmp_path):
  base = tokenizer_lib.train_bpe([format_example(r["question"], r["solution"]) for r in ROWS], 300)
  base.post_processor = processors.TemplateProcessing(  # would add eos if special tokens were on
    single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 1)]
  )
  base.save(str(tmp_path / "tokenizer.json"))
  files = write_rows(tmp_path / "rows.jsonl", ROWS)
  data = small_data_config(
    tmp_path,
    source="json",
    train_files=str(files),
    val_files=str(files),
    query_column="question",
    response_column="solution",
    tokenizer=str(tmp_path / "tokenizer.json"),
  )
  data.eos_target = False
  ds = build_datasets(data, workdir=None, seed=0)
  for e, row in enumerate(ROWS):
    text = f"query : {row['question']} response : {row['solution']}"
    ids = ds.train.example(e).tolist()
    assert ids == ds.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids != ds.tokenizer.encode(text).ids  # the post-processor really adds one
    assert ds.eos_id not in ids
    assert ds.tokenizer.decode(ids) == text
  data.eos_target = True  # the reference's end-of-text target: the text, then one EOS
  with_eos = build_datasets(data, workdir=None, seed=0)
  for e in range(len(ROWS)):
    assert with_eos.train.example(e).tolist() == ds.train.example(e).tolist() + [ds.eos_id]


def test_truncation_padding_and_mask():
  tok = tokenizer_lib.train_bpe(["query : aa bb cc response : dd"] * 4, 265)
  long, short = "query : aa bb cc dd ee ff gg hh response : x", "query : a response : b"
  full_long = tok.encode(long, add_special_tokens=False).ids
  full_short = tok.encode(short, add_special_tokens=False).ids
  length = len(full_short) + 3
  assert len(full_long) > length
  split = build_split(tok, [long, short], length, pad_id=0, packing=False)
  batch = split.batch([0, 1])
  assert all(v.dtype == np.int32 and v.shape == (2, length) for v in batch.values())
  np.testing.assert_array_equal(batch["input_ids"][0], full_long[:length])  # right-truncated
  n = len(full_short)
  np.testing.assert_array_equal(batch["input_ids"][1, :n], full_short)
  assert (batch["input_ids"][1, n:] == 0).all()
  np.testing.assert_array_equal(
    batch["attention_mask"], [[1] * length, [1] * n + [0] * (length - n)]
  )
  np.testing.assert_array_equal(batch["segment_ids"], batch["attention_mask"])
  np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(length), (2, 1)))


# --- caching --------------------------------------------------------------------------------------


def test_cache_is_reused_and_invalidated(tmp_path):
  path = write_rows(tmp_path / "rows.jsonl", ROWS)
  data = small_data_config(
    tmp_path,
    source="json",
    train_files=str(path),
    val_files=str(path),
    query_column="question",
    response_column="solution",
    vocab_size=300,
  )
  first = build_datasets(data, workdir=None, seed=0)
  second = build_datasets(data, workdir=None, seed=0)
  assert not first.from_cache and second.from_cache
  assert second.cache_path == first.cache_path
  np.testing.assert_array_equal(first.train.tokens, second.train.tokens)
  np.testing.assert_array_equal(first.val.offsets, second.val.offsets)
  data.max_length = 48
  assert not build_datasets(data, workdir=None, seed=0).from_cache
  assert build_datasets(data, workdir=None, seed=0).from_cache
  write_rows(path, ROWS[::-1])  # new contents (and mtime) -> new key
  os.utime(path, ns=(1, 1))
  changed = build_datasets(data, workdir=None, seed=0)
  assert not changed.from_cache and changed.cache_path != first.cache_path


def test_synthetic_cache_and_workdir_default(tmp_path):
  data = small_data_config(tmp_path, cache_dir="")
  run = tmp_path / "run"
  first = build_datasets(data, workdir=str(run), seed=0)
  assert Path(first.cache_path).parent == run / "data_cache"
  again = build_datasets(data, workdir=str(run), seed=1)
  assert again.from_cache
  assert first.train.num_examples == 300 and first.val.num_examples == 40
  assert not set(texts_of(first.train, first.tokenizer)) & set(texts_of(first.val, first.tokenizer))


# --- packing --------------------------------------------------------------------------------------


def test_packing_segments_and_positions(tmp_path):
  length = 128
  packed = build_datasets(
    small_data_config(tmp_path, packing=True, max_length=length), workdir=None, seed=0
  )
  split = packed.train
  assert split.num_rows < split.num_examples
  batch = split.batch(range(split.num_rows))
  seen = []
  for r in range(split.num_rows):
    first, last = int(split.rows[r]), int(split.rows[r + 1])
    used = 0
    for k, e in enumerate(range(first, last)):
      ids = split.example(e)
      where = np.flatnonzero(batch["segment_ids"][r] == k + 1)
      np.testing.assert_array_equal(where, np.arange(used, used + len(ids)))  # contiguous
      np.testing.assert_array_equal(batch["input_ids"][r, where], ids)
      np.testing.assert_array_equal(batch["positions"][r, where], np.arange(len(ids)))
      used += len(ids)
      seen.append(e)
    assert (batch["segment_ids"][r, used:] == 0).all()
    assert (batch["attention_mask"][r] == (batch["segment_ids"][r] > 0)).all()
    assert (batch["input_ids"][r, used:] == packed.pad_id).all()
    if last < split.num_examples:  # greedy: the next example would not have fit
      assert used + len(split.example(last)) > length
  assert seen == list(range(split.num_examples))
  unpacked = build_datasets(small_data_config(tmp_path, max_length=length), workdir=None, seed=0)
  np.testing.assert_array_equal(unpacked.train.tokens, split.tokens)


# --- iteration ------------------------------------------------------------------------------------


def test_train_iterator_is_deterministic_and_resumes(synth):
  def take(iterator, n):
    return [next(iterator)["input_ids"] for _ in range(n)]

  a, b = synth.train_iterator(32, seed=5), synth.train_iterator(32, seed=5)
  first, second = take(a, 12), take(b, 12)  # 12 * 32 > 300: crosses an epoch boundary
  for x, y in zip(first, second):
    np.testing.assert_array_equal(x, y)
  other = take(synth.train_iterator(32, seed=6), 1)[0]
  assert not np.array_equal(other, first[0])
  probe = synth.train_iterator(32, seed=5)
  take(probe, 5)
  state = json.loads(json.dumps(probe.get_state()))
  assert state == {"epoch": 0, "index": 160}
  restored = synth.train_iterator(32, seed=5)
  restored.set_state(state)
  for x, y in zip(take(restored, 7), first[5:]):
    np.testing.assert_array_equal(x, y)


def test_train_iterator_epochs_cover_every_row(synth):
  iterator = synth.train_iterator(7, seed=0)
  rows = np.concatenate([iterator.next_rows() for _ in range(2 * 300 // 7 + 1)])
  np.testing.assert_array_equal(np.sort(rows[:300]), np.arange(300))
  np.testing.assert_array_equal(np.sort(rows[300:600]), np.arange(300))
  np.testing.assert_array_equal(rows[:300], np.random.default_rng([0, 0]).permutation(300))
  assert iterator.get_state()["epoch"] == 2


def test_val_batches_cover_every_example_once(synth):
  batches = synth.val_batches(16)  # 40 examples -> 16 + 16 + 8 (+ 8 padding rows)
  assert len(batches) == 3
  assert all(b["input_ids"].shape == (16, 96) for b in batches)
  masks = np.concatenate([b["attention_mask"] for b in batches])
  segments = np.concatenate([b["segment_ids"] for b in batches])
  ids = np.concatenate([b["input_ids"] for b in batches])
  assert (masks[40:] == 0).all() and (ids[40:] == synth.pad_id).all()
  assert synth.pad_id == synth.eos_id  # the reference's row layout pads with end-of-text
  for e in range(40):
    n = int((segments[e] > 0).sum())  # the example, its end-of-text (the first pad) included
    np.testing.assert_array_equal(ids[e, :n], synth.val.example(e))
    truncated = n == ids.shape[1] and ids[e, n - 1] != synth.eos_id
    assert masks[e].sum() == (n if truncated else n - 1)


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "changes, field",
  [
    (
      dict(source="csv"),
      r"data\.source: got 'csv'; allowed values: synthetic, json, parquet, hf, tfds",
    ),
    (dict(source="json"), r"data\.train_files"),
    (dict(source="json", train_files="/no/such/file.jsonl"), r"data\.train_files.*no/such"),
    (
      dict(source="parquet", train_files=__file__, val_files=["/no/val*.parquet"]),
      r"data\.val_files",
    ),
    (dict(max_length=1), r"data\.max_length: got 1"),
    (dict(packing="yes"), r"data\.packing"),
    (dict(tokenizer="/no/such/tokenizer.json"), r"data\.tokenizer"),
    (dict(vocab_size=100), r"data\.vocab_size"),
    (dict(val_size=0), r"data\.val_size"),
    (dict(max_train_examples=-1), r"data\.max_train_examples"),
    (dict(trim_vocab=-5), r"data\.trim_vocab: got -5"),
    (dict(source="tfds", tfds_data_dir="/no/such/dir"), r"data\.tfds_data_dir"),
    (dict(source="hf", hf_name=""), r"data\.hf_name"),
    (dict(synthetic_train_size=0), r"data\.synthetic_train_size"),
  ],
)
def test_config_errors_name_the_field(tmp_path, changes, field):
  data = small_data_config(tmp_path).to_dict()  # a plain dict, so wrongly typed values get through
  data.update(changes)
  with pytest.raises(ConfigError, match=field):
    validate_data_config(data)
  with pytest.raises(ConfigError, match=field):
    build_datasets(data, workdir=str(tmp_path / "run"), seed=0)
  assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing loaded


def test_unknown_field_and_defaults(tmp_path):
  data = small_data_config(tmp_path)
  data.tokeniser = "bpe"
  with pytest.raises(ConfigError, match="tokeniser"):
    validate_data_config(data)
  defaults = default_data_config()
  validate_data_config(defaults)
  assert defaults.max_length == 512 and defaults.val_seed == 42 and defaults.val_size == 1000
  defaults.train_files = ["a.jsonl", "b.jsonl"]  # list or string both accepted
  defaults.train_files = "a.jsonl"
