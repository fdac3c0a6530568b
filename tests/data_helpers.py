"""Helpers shared by the data tests: small data configs, rows written as files, shared data.

Plain functions and values (fixtures are in conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections
import pandas as pd
import pytest
import tokenizers

from coe_jax.data.input_pipeline import default_data_config
from coe_jax.data.tokenized import Split

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
MATH_QA = SHARED_DATA / "math_qa"

ROWS = [
  {"question": "What is 2 + 3?", "solution": "2 + 3 = 5\nThe answer is: 5"},
  {
    "question": "Tom has 4 apples and eats 1. How many are left?",
    "solution": "4 - 1 = 3\nThe answer is: 3",
  },
  {
    "question": "A pen costs $2. How much do 6 pens cost?",
    "solution": "6 * 2 = 12\nThe answer is: 12",
  },
  {"question": "What is 10 / 2?", "solution": "10 / 2 = 5\nThe answer is: 5"},
  {"question": "Ünïcode café: what is 1 + 1?", "solution": "1 + 1 = 2\nThe answer is: 2"},
]


def small_data_config(tmp_path: Path, **changes: Any) -> ml_collections.ConfigDict:
  """A fast synthetic config whose caches live in tmp_path."""
  data = default_data_config()
  data.synthetic_train_size = 300
  data.synthetic_val_size = 40
  data.vocab_size = 400
  data.max_length = 96
  data.cache_dir = str(tmp_path / "cache")
  data.update(changes)
  return data


def write_rows(path: Path, rows: list[dict]) -> Path:
  """Writes rows as .jsonl, .json (one array) or .parquet, by suffix."""
  if path.suffix == ".jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  elif path.suffix == ".json":
    path.write_text(json.dumps(rows), encoding="utf-8")
  else:
    pd.DataFrame(rows).to_parquet(path)
  return path


MATH_QA = SHARED_DATA / "math_qa"


def shared_math_qa_config(tmp_path: Path, **changes: Any) -> ml_collections.ConfigDict:
  """`small_data_config` over ../shared's math_qa and olmoe tokenizer; skips when absent."""
  tok_path = SHARED_DATA / "tokenizer" / "olmoe" / "tokenizer.json"
  if not (MATH_QA / "validation.jsonl").is_file() or not tok_path.is_file():
    pytest.skip(f"shared data not found at {SHARED_DATA}")
  return small_data_config(
    tmp_path,
    source="json",
    train_files=str(MATH_QA / "train.jsonl"),
    val_files=[str(MATH_QA / "validation.jsonl")],
    tokenizer=str(tok_path),
    **changes,
  )


def texts_of(split: Split, tok: tokenizers.Tokenizer) -> list[str]:
  """Every example of `split` decoded back to text."""
  return [tok.decode(split.example(e).tolist()) for e in range(split.num_examples)]
