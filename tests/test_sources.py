"""Tests for coe_jax.data.sources and corpus: local files, malformed input, hub, TFDS, real data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import (
  MATH_QA,
  ROWS,
  shared_math_qa_config,
  small_data_config,
  texts_of,
  write_rows,
)

from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.data.input_pipeline import build_datasets, format_example
from coe_jax.nn.model_config import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


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
