"""Tests for coe_jax.data: synthetic corpus, tokenizers, sources, caching, packing, iteration."""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from data_helpers import MATH_QA, ROWS, shared_math_qa_config, small_data_config, write_rows
from tokenizers import processors

from coe_jax.data import synthetic
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
from coe_jax.nn.model_config import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
ANSWER_LINE = re.compile(r"\nThe answer is: (-?\d+)$")
STEP = re.compile(r"(\d+(?: ?[-+*/] ?\d+)+) = (\d+)")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def texts_of(split, tok) -> list[str]:
  return [tok.decode(split.example(e).tolist()) for e in range(split.num_examples)]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  """One small synthetic build shared by the iterator and batching tests."""
  tmp = tmp_path_factory.mktemp("synth")
  return build_datasets(small_data_config(tmp), workdir=str(tmp / "run"), seed=0)


# --- synthetic corpus -----------------------------------------------------------------------------


def _check_steps(response: str) -> None:
  """Every `a op b ... = c` step is correct and the last one is the final answer."""
  steps = STEP.findall(response.replace("$", ""))
  assert steps, response
  for lhs, rhs in steps:
    tokens = re.findall(r"\d+|[-+*/]", lhs)
    value = Fraction(int(tokens[0]))
    for op, x in zip(tokens[1::2], tokens[2::2]):
      value = OPS[op](value, Fraction(int(x)))
    assert value == int(rhs), (lhs, rhs, response)
  assert ANSWER_LINE.search(response).group(1) == steps[-1][1]


def test_synthetic_is_deterministic_varied_and_correct():
  a = synthetic.generate_examples(600, seed=3)
  assert a == synthetic.generate_examples(600, seed=3)
  assert a != synthetic.generate_examples(600, seed=4)
  assert synthetic.generate_examples(50, seed=3) == a[:50]
  assert len({e["query"] for e in a}) == 600
  for example in a:
    assert set(example) == {"query", "response"}
    assert ANSWER_LINE.search(example["response"]), example
    _check_steps(example["response"])
  joined = " ".join(e["query"] for e in a)
  for marker in ("$", "years old", "%", "per hour", "/", "rows of", "What is", "cookies"):
    assert marker in joined, marker
  assert len({e["query"].split()[0] for e in a}) >= 20  # many names and openings
  assert len(synthetic.template_names()) >= 6


def test_addition_examples_format():
  examples = synthetic.addition_examples(200, seed=7)
  assert examples == synthetic.addition_examples(200, seed=7)
  assert len({e["query"] for e in examples}) == 200
  for e in examples:
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", e["query"]).groups())
    assert 10 <= a <= 99 and 10 <= b <= 99
    assert e["response"] == f"{a} + {b} = {a + b}\nThe answer is: {a + b}"
  three = synthetic.addition_examples(5, seed=0, digits=3)
  assert all(len(e["query"].split()[2]) == 3 for e in three)


# --- tokenizers -----------------------------------------------------------------------------------


def test_bpe_tokenizer_is_cached_with_special_tokens(tmp_path):
  texts = [format_example(e["query"], e["response"]) for e in synthetic.generate_examples(200, 0)]
  calls = []

  def train_texts():
    calls.append(1)
    return texts

  tok = tokenizer_lib.load_tokenizer(
    "bpe", workdir=str(tmp_path), train_texts=train_texts, vocab_size=320
  )
  assert (tmp_path / "tokenizer.json").is_file()
  assert tok.get_vocab_size() == 320
  assert tokenizer_lib.pad_id(tok) == tok.token_to_id("<|padding|>") == 0
  assert tokenizer_lib.eos_id(tok) == tok.token_to_id("<|endoftext|>") == 1
  again = tokenizer_lib.load_tokenizer(
    "bpe", workdir=str(tmp_path), train_texts=train_texts, vocab_size=320
  )
  assert len(calls) == 1  # reused, not retrained
  assert tokenizer_lib.tokenizer_fingerprint(again) == tokenizer_lib.tokenizer_fingerprint(tok)
  bigger = tokenizer_lib.load_tokenizer(
    "bpe", workdir=str(tmp_path), train_texts=train_texts, vocab_size=360
  )
  assert len(calls) == 2 and bigger.get_vocab_size() == 360
  ids = tok.encode(texts[0], add_special_tokens=False).ids
  assert tok.decode(ids) == texts[0]


def test_load_tokenizer_paths_and_errors(tmp_path):
  tok = tokenizer_lib.train_bpe(["query : a response : b"] * 5, 270)
  (tmp_path / "tok").mkdir()
  tok.save(str(tmp_path / "tok" / "tokenizer.json"))
  by_dir = tokenizer_lib.load_tokenizer(str(tmp_path / "tok"))
  by_file = tokenizer_lib.load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
  assert tokenizer_lib.tokenizer_fingerprint(by_dir) == tokenizer_lib.tokenizer_fingerprint(by_file)
  with pytest.raises(ConfigError, match="data.tokenizer"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing.json"))
  bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
  assert tokenizer_lib.pad_id(bare) == 0 and tokenizer_lib.eos_id(bare) is None


def test_hub_tokenizer_offline_error(monkeypatch):
  import huggingface_hub.constants

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(ConfigError, match=r"config\.data\.tokenizer.*tokenizer\.json"):
    tokenizer_lib.load_tokenizer("deepseek-ai/DeepSeek-V2-Lite-not-cached-anywhere")


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


# --- local file sources ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_file_sources(tmp_path, suffix):
  train = write_rows(tmp_path / f"train{suffix}", ROWS[:4])
  val = write_rows(tmp_path / f"val{suffix}", ROWS[4:])
  source = "parquet" if suffix == ".parquet" else "json"
  data = small_data_config(
    tmp_path,
    source=source,
    train_files=[str(train)],
    val_files=str(val),
    query_column="question",
    response_column="solution",
    vocab_size=300,
  )
  ds = build_datasets(data, workdir=str(tmp_path / "run"), seed=0)
  assert (ds.train.num_examples, ds.val.num_examples) == (4, 1)
  assert texts_of(ds.train, ds.tokenizer) == [
    format_example(r["question"], r["solution"]) for r in ROWS[:4]
  ]
  assert texts_of(ds.val, ds.tokenizer) == [
    format_example(ROWS[4]["question"], ROWS[4]["solution"])
  ]
  assert (tmp_path / "run" / "tokenizer.json").is_file()
  data.query_column = "prompt"
  with pytest.raises(ConfigError, match="data.query_column.*'prompt'.*question"):
    build_datasets(data, workdir=None, seed=0)


def test_globs_holdout_and_limits(tmp_path):
  rows = [
    {"q": f"What is {i} + 1?", "a": f"{i} + 1 = {i + 1}\nThe answer is: {i + 1}"} for i in range(30)
  ]
  write_rows(tmp_path / "part0.jsonl", rows[:15])
  write_rows(tmp_path / "part1.jsonl", rows[15:])
  data = small_data_config(
    tmp_path,
    source="json",
    train_files=str(tmp_path / "part*.jsonl"),
    query_column="q",
    response_column="a",
    val_size=5,
    val_seed=42,
    vocab_size=300,
  )
  ds = build_datasets(data, workdir=None, seed=0)
  val_ids = __import__("random").Random(42).sample(range(30), 5)
  expected_val = [format_example(rows[i]["q"], rows[i]["a"]) for i in val_ids]
  assert texts_of(ds.val, ds.tokenizer) == expected_val
  assert ds.train.num_examples == 25
  assert not set(texts_of(ds.train, ds.tokenizer)) & set(expected_val)
  data.max_train_examples, data.max_val_examples = 7, 2
  limited = build_datasets(data, workdir=None, seed=0)
  assert (limited.train.num_examples, limited.val.num_examples) == (7, 2)
  assert texts_of(limited.val, limited.tokenizer) == expected_val[:2]


# --- malformed files ------------------------------------------------------------------------------


def _jsonl_lines(*lines: str) -> str:
  good = [json.dumps(r) for r in ROWS]
  return "\n".join(good[:2] + list(lines) + good[2:]) + "\n"  # the bad lines start at line 3


@pytest.mark.parametrize("tokenizer", ["bpe", "file"])
@pytest.mark.parametrize(
  "bad_line, message",
  [
    (
      '{"question": "What is 1 + 1?", "solution": "2"',
      "line 3: invalid JSON (Expecting ',' delimiter at column 47)",
    ),
    (
      '{"question": "What is 1 + 1?", "answer": "2"}',
      "line 3: data.response_column='solution' is not a key of this row (its keys: "
      "['answer', 'question'])",
    ),
    ('["What is 1 + 1?", "2"]', 'line 3: not a JSON object but list ["What is 1 + 1?", "2"]'),
    (
      '{"question": "What is 1 + 1?", "solution": 2}',
      "line 3: data.response_column='solution' holds int 2, not a string",
    ),
  ],
)
def test_malformed_jsonl_line_names_file_and_line_and_writes_nothing(
  tmp_path, bad_line, message, tokenizer
):
  good = write_rows(tmp_path / "good.jsonl", ROWS)
  bad = tmp_path / "bad.jsonl"
  bad.write_text(_jsonl_lines(bad_line), encoding="utf-8")
  if tokenizer == "file":  # a ready tokenizer: nothing needs the data before the splits do
    tokenizer = str(tmp_path / "tok.json")
    tokenizer_lib.train_bpe([format_example(r["question"], r["solution"]) for r in ROWS], 300).save(
      tokenizer
    )
  data = small_data_config(
    tmp_path,
    source="json",
    train_files=str(bad),
    val_files=str(good),
    query_column="question",
    response_column="solution",
    vocab_size=300,
    tokenizer=tokenizer,
  )
  with pytest.raises(DataError) as error:
    build_datasets(data, workdir=str(tmp_path / "run"), seed=0)
  assert str(error.value) == f"data.train_files: {bad}, {message}"
  assert isinstance(error.value, ConfigError)
  assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_malformed_validation_file_and_json_array_name_their_field_and_item(tmp_path):
  good = write_rows(tmp_path / "good.jsonl", ROWS)
  bad = write_rows(tmp_path / "bad.json", ROWS[:1] + [{"question": "q"}])
  data = small_data_config(
    tmp_path,
    source="json",
    train_files=str(good),
    val_files=str(bad),
    query_column="question",
    response_column="solution",
    vocab_size=300,
  )
  with pytest.raises(
    DataError,
    match=re.escape(
      f"data.val_files: {bad}, item 2 of the JSON array: data.response_column='solution' "
      "is not a key of this row (its keys: ['question'])"
    ),
  ):
    build_datasets(data, workdir=None, seed=0)
  assert not (tmp_path / "cache").exists()


def test_parquet_without_the_column_names_the_file(tmp_path):
  good = write_rows(tmp_path / "good.parquet", ROWS)
  bad = write_rows(tmp_path / "bad.parquet", [{"question": r["question"]} for r in ROWS])
  data = small_data_config(
    tmp_path,
    source="parquet",
    train_files=str(good),
    val_files=str(bad),
    query_column="question",
    response_column="solution",
    vocab_size=300,
  )
  with pytest.raises(
    DataError,
    match=re.escape(
      f"data.val_files: {bad}: data.response_column='solution' is not a column of this file "
      "(its columns: ['question'])"
    ),
  ):
    build_datasets(data, workdir=None, seed=0)
  assert not (tmp_path / "cache").exists()


# --- the resolved spec and the one-way flow --------------------------------------------------------


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


# --- vocabulary trimming --------------------------------------------------------------------------


def _bpe_for_trimming() -> tuple[tokenizers.Tokenizer, list[str]]:
  texts = [format_example(e["query"], e["response"]) for e in synthetic.generate_examples(300, 0)]
  return tokenizer_lib.train_bpe(texts, 700), texts


def test_trim_vocabulary_keeps_frequent_tokens_and_encodes_everything():
  tok, texts = _bpe_for_trimming()
  trimmed = tokenizer_lib.trim_vocabulary(tok, texts, keep=40)
  size = trimmed.get_vocab_size(with_added_tokens=True)
  assert 256 + 2 + 40 <= size < tok.get_vocab_size(with_added_tokens=True)
  # specials keep working under their new ids
  assert tokenizer_lib.pad_id(trimmed) == trimmed.token_to_id("<|padding|>")
  assert tokenizer_lib.eos_id(trimmed) == trimmed.token_to_id("<|endoftext|>")
  assert sorted(trimmed.get_vocab(with_added_tokens=True).values()) == list(range(size))
  # the 40 most frequent tokens survive, with the same strings
  counts: dict[int, int] = {}
  for enc in tok.encode_batch(texts, add_special_tokens=False):
    for i in enc.ids:
      counts[i] = counts.get(i, 0) + 1
  top = sorted(counts, key=lambda i: (-counts[i], i))[:40]
  assert all(trimmed.token_to_id(tok.id_to_token(i)) is not None for i in top)
  # every text still round-trips (dropped tokens are spelled with smaller kept pieces) ...
  unseen = ["Ünïcode zebra quokka 12345", "query : xyz response : 7 * 8 = 56"]
  for text in texts[:50] + unseen:
    ids = trimmed.encode(text, add_special_tokens=False).ids
    assert max(ids) < size and trimmed.decode(ids) == tok.decode(tok.encode(text).ids) == text
  # ... and a text made only of kept tokens is split exactly as before: trimmed on a few texts
  # with room for all their tokens, those texts keep every token and their splitting
  few = texts[:5]
  exact = tokenizer_lib.trim_vocabulary(tok, few, keep=10_000)
  assert exact.get_vocab_size() < tok.get_vocab_size()  # still trimmed to these texts
  for text in few:
    before = [tok.id_to_token(i) for i in tok.encode(text, add_special_tokens=False).ids]
    after = [exact.id_to_token(i) for i in exact.encode(text, add_special_tokens=False).ids]
    assert after == before and len(set(before)) > 20


def test_trim_vocabulary_rejects_non_bpe():
  word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
  with pytest.raises(ConfigError, match="data.trim_vocab"):
    tokenizer_lib.trim_vocabulary(word_level, ["a b"], keep=1)


def test_trim_vocab_config_builds_a_smaller_cached_tokenizer(tmp_path):
  full = build_datasets(
    small_data_config(tmp_path, max_length=512), workdir=str(tmp_path / "full"), seed=0
  )  # long rows: nothing truncated, so the texts compare whole
  data = small_data_config(tmp_path, max_length=512, trim_vocab=60)
  trimmed = build_datasets(data, workdir=str(tmp_path / "run"), seed=0)
  assert trimmed.vocab_size < full.vocab_size
  assert int(trimmed.train.tokens.max()) < trimmed.vocab_size
  assert trimmed.train.tokens.size >= full.train.tokens.size  # rare tokens take more pieces
  assert texts_of(trimmed.val, trimmed.tokenizer) == texts_of(full.val, full.tokenizer)
  saved = tokenizers.Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json"))
  assert tokenizer_lib.tokenizer_fingerprint(saved) == tokenizer_lib.tokenizer_fingerprint(
    trimmed.tokenizer
  )  # generation and evaluation decode with the run's own copy
  again = build_datasets(data, workdir=str(tmp_path / "run2"), seed=0)
  assert again.from_cache and again.vocab_size == trimmed.vocab_size


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


# --- remote / optional sources --------------------------------------------------------------------


def test_hf_source_offline_error(tmp_path, monkeypatch):
  import datasets
  import huggingface_hub.constants

  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  data = small_data_config(tmp_path, source="hf", hf_name="meta-math/MetaMathQA")
  with pytest.raises(ConfigError) as error:
    build_datasets(data, workdir=None, seed=0)
  message = str(error.value)
  assert "meta-math/MetaMathQA" in message
  assert "config.data.source='json'" in message and "train_files" in message
  assert "math_qa" in message


TINY_QA = [
  ("What is 1 + 1?", "2"),
  ("What is 2 * 3?", "6"),
  ("What is 9 - 4?", "5"),
  ("What is 8 / 2?", "4"),
  ("What is 7 + 5?", "12"),
  ("What is 3 * 3?", "9"),
]


def _prepare_tiny_tfds(data_dir: Path) -> str:
  """Builds a 6 + 2 example question/answer TFDS dataset as array_record files, without TF."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class CoeJaxTinyQa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Tiny math questions with a train and a test split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict(
        {"question": tfds.features.Text(), "answer": tfds.features.Text()}
      )
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {
        "train": self._generate_examples(TINY_QA),
        "test": self._generate_examples([("What is 4 + 4?", "8"), ("What is 6 - 1?", "5")]),
      }

    def _generate_examples(self, pairs):
      for i, (question, answer) in enumerate(pairs):
        yield i, {"question": question, "answer": answer}

  builder = CoeJaxTinyQa(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder.name


def test_tfds_source_without_tensorflow(tmp_path):
  name = _prepare_tiny_tfds(tmp_path / "tfds")
  data = small_data_config(
    tmp_path, source="tfds", tfds_name=name, tfds_data_dir=str(tmp_path / "tfds"), vocab_size=300
  )
  ds = build_datasets(data, workdir=None, seed=0)
  train = sorted(texts_of(ds.train, ds.tokenizer))
  assert train == sorted(format_example(q, a) for q, a in TINY_QA)
  assert sorted(texts_of(ds.val, ds.tokenizer)) == sorted(
    [format_example("What is 4 + 4?", "8"), format_example("What is 6 - 1?", "5")]
  )
  data.tfds_val_split, data.val_size = "", 2  # hold out from train instead
  held = build_datasets(data, workdir=None, seed=0)
  assert (held.train.num_examples, held.val.num_examples) == (4, 2)
  assert "tensorflow" not in sys.modules
  data.tfds_query_feature = "problem"
  with pytest.raises(ConfigError, match="data.tfds_query_feature"):
    build_datasets(data, workdir=None, seed=0)


def test_tensorflow_datasets_is_imported_lazily(tmp_path):
  code = (
    "import sys; from coe_jax.data import build_datasets, default_data_config; "
    "import coe_jax.data.sources; "
    "assert 'tensorflow_datasets' not in sys.modules and 'datasets' not in sys.modules"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --- the workplace's real data --------------------------------------------------------------------


@pytest.mark.shared_data
def test_shared_math_qa_with_olmoe_tokenizer(tmp_path):
  data = shared_math_qa_config(tmp_path, max_length=512, max_train_examples=20, max_val_examples=8)
  ds = build_datasets(data, workdir=None, seed=0)
  # The reference's row layout pads with the end-of-text id (DeepSeek-V2's pad is its EOS).
  assert (ds.vocab_size, ds.pad_id, ds.eos_id) == (50280, 50279, 50279)
  assert ds.tokenizer.token_to_id("<|padding|>") == 1  # declared, unused by that layout
  assert (ds.train.num_examples, ds.val.num_examples) == (20, 8)
  with open(MATH_QA / "validation.jsonl", encoding="utf-8") as f:
    rows = [json.loads(next(f)) for _ in range(8)]
  batch = ds.val_batches(8)[0]
  for e, row in enumerate(rows):
    text = f"query : {row['query']} response : {row['response']}".strip()
    expected = (ds.tokenizer.encode(text, add_special_tokens=False).ids + [50279])[:512]
    n = int((batch["segment_ids"][e] > 0).sum())
    assert batch["input_ids"][e, :n].tolist() == expected
    assert (batch["input_ids"][e, n:] == 50279).all()
    assert expected[:2] == ds.tokenizer.encode("query :", add_special_tokens=False).ids


@pytest.mark.shared_data
def test_shared_olmoe_tokenizer_trimmed(tmp_path):
  data = shared_math_qa_config(
    tmp_path, max_length=2048, max_train_examples=400, max_val_examples=20, trim_vocab=1000
  )
  ds = build_datasets(data, workdir=None, seed=0)
  assert 1000 < ds.vocab_size < 3000  # + 256 bytes, 28 added tokens and merge halves
  assert ds.eos_id == ds.tokenizer.token_to_id("<|endoftext|>") == ds.pad_id  # declared
  with open(MATH_QA / "validation.jsonl", encoding="utf-8") as f:
    rows = [json.loads(next(f)) for _ in range(20)]
  expected = [format_example(r["query"], r["response"]).strip() for r in rows]
  assert texts_of(ds.val, ds.tokenizer) == expected
