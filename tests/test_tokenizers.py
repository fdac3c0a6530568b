"""Tests for coe_jax.data.tokenizer: loading, BPE training and caching, special tokens, trimming."""

from __future__ import annotations

import pytest
import tokenizers
from data_helpers import small_data_config, texts_of

from coe_jax.data import synthetic
from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.data.input_pipeline import build_datasets, format_example
from coe_jax.nn.model_config import ConfigError

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
