"""The reference trainer's targets and validation number (DESIGN.md 6).

The loss targets of a batch are exactly the reference trainer's.

The reference tokenises `query : .. response : ..` without special tokens,
right-truncates and right-pads to max_length with its pad token, which is the
end-of-text token, and scores `loss_mask = attention_mask[:, :-1]` against
`input_ids[:, 1:]`: every real position predicts the next token, the last real
one predicting the first pad, i.e. EOS. `reference_targets` rebuilds that in
numpy; our batches (padded or packed) must give the same (position, target)
pairs, no more, no fewer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import ROWS, shared_math_qa_config
from model_helpers import tiny_model_config
from run_helpers import small_config

from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.data.input_pipeline import Datasets, build_datasets, format_example
from coe_jax.data.tokenized import build_split
from coe_jax.nn.model import CoECausalLM
from coe_jax.training.metrics import read_metrics
from coe_jax.training.train import train_and_evaluate
from coe_jax.training.train_step import (
  batch_mean_eval_loss,
  make_eval_step,
  next_token_targets,
  pooled_eval_loss,
)

TEXTS = [format_example(r["question"], r["solution"]) for r in ROWS]
EOS = 1  # train_bpe's <|endoftext|>


def reference_targets(text_ids: list[int], max_length: int, eos: int) -> dict[int, int]:
  """{position: target} the reference scores for one example padded with EOS."""
  n = min(len(text_ids), max_length)
  input_ids = list(text_ids[:max_length]) + [eos] * (max_length - n)
  loss_mask = ([1] * n + [0] * (max_length - n))[:-1]
  return {t: input_ids[t + 1] for t in range(max_length - 1) if loss_mask[t]}


def our_targets(batch: dict, row: int, segment: int | None = None) -> dict[int, int]:
  """{position within the segment (or row): target} with weight 1 in our batch."""
  targets, weights = (np.asarray(a) for a in next_token_targets(batch))
  where = np.flatnonzero(weights[row] > 0)
  if segment is None:
    return {int(t): int(targets[row, t]) for t in where}
  seg = batch["segment_ids"][row]
  start = int(np.flatnonzero(seg == segment)[0])
  return {int(t) - start: int(targets[row, t]) for t in where if seg[t] == segment}


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_bpe(TEXTS * 4, 300)


@pytest.mark.parametrize("cut", ["all_truncated", "mixed", "none_truncated"])
def test_padded_batch_targets_equal_the_reference(tok, cut):
  text_ids = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
  lengths = sorted(len(ids) for ids in text_ids)
  max_length = {
    "all_truncated": lengths[0] - 1,
    "mixed": lengths[len(lengths) // 2],
    "none_truncated": lengths[-1] + 5,
  }[cut]
  assert tok.token_to_id("<|endoftext|>") == EOS
  split = build_split(tok, TEXTS, max_length, pad_id=0, packing=False, eos_id=EOS)
  batch = split.batch(range(len(TEXTS)))
  for row, ids in enumerate(text_ids):
    expected = reference_targets(ids, max_length, EOS)
    assert our_targets(batch, row) == expected
    assert (EOS in expected.values()) == (len(ids) < max_length)  # EOS target iff not truncated


def test_exact_fit_gets_no_eos_target(tok):
  ids = tok.encode(TEXTS[0], add_special_tokens=False).ids
  for max_length, has_eos in ((len(ids), False), (len(ids) + 1, True)):
    batch = build_split(tok, TEXTS[:1], max_length, 0, False, eos_id=EOS).batch([0])
    assert (EOS in our_targets(batch, 0).values()) == has_eos
    assert our_targets(batch, 0) == reference_targets(ids, max_length, EOS)


def test_packed_batch_targets_equal_the_reference_per_example(tok):
  max_length = 64
  split = build_split(tok, TEXTS * 3, max_length, pad_id=0, packing=True, eos_id=EOS)
  assert split.num_rows < split.num_examples  # really packed
  batch = split.batch(range(split.num_rows))
  checked = 0
  for row in range(split.num_rows):
    for k, example in enumerate(range(int(split.rows[row]), int(split.rows[row + 1]))):
      text_ids = tok.encode((TEXTS * 3)[example], add_special_tokens=False).ids
      assert our_targets(batch, row, segment=k + 1) == reference_targets(text_ids, max_length, EOS)
      checked += 1
  assert checked == split.num_examples


def test_without_eos_target_the_last_token_predicts_nothing(tok):
  ids = tok.encode(TEXTS[0], add_special_tokens=False).ids
  batch = build_split(tok, TEXTS[:1], 100, 0, False, eos_id=None).batch([0])
  expected = reference_targets(ids, 100, EOS)
  del expected[len(ids) - 1]  # the EOS target is the only difference
  assert our_targets(batch, 0) == expected


@pytest.mark.shared_data
def test_real_tokenizer_targets_equal_the_reference(tmp_path):
  """olmoe declares <|padding|> (id 1) as its pad and <|endoftext|> (50279) as its EOS: rows
  are padded with the EOS, as the reference's DeepSeek-V2 tokenizer (whose pad is its EOS)
  pads them, and input ids, attention mask and targets are exactly the reference's."""
  data = shared_math_qa_config(tmp_path, max_length=256, max_train_examples=64, max_val_examples=8)
  ds = build_datasets(data, workdir=None, seed=0)
  assert (ds.pad_id, ds.eos_id) == (50279, 50279)
  batch = ds.train.batch(range(64))
  for row in range(64):
    ids = ds.tokenizer.encode(
      ds.tokenizer.decode(ds.train.example(row).tolist()), add_special_tokens=False
    ).ids
    assert our_targets(batch, row) == reference_targets(ids, 256, ds.eos_id)
    n = min(len(ids), 256)
    assert batch["input_ids"][row].tolist() == ids[:n] + [ds.eos_id] * (256 - n)
    assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (256 - n)


# --- the reference's validation number ----------------------------------------------------------


def test_reference_val_batches_are_the_first_rows_of_a_seed_zero_shuffle(tok):
  texts = [f"query : what is {i} + 1? response : {i + 1}" for i in range(150)]
  split = build_split(tok, texts, 24, pad_id=0, packing=False, eos_id=EOS)
  ds = Datasets(tok, split, split, "", False, 0.0)
  batches = ds.reference_val_batches(batch_size=64, num_batches=2, seed=0)
  order = np.random.default_rng(0).permutation(150)
  assert [b["input_ids"].shape[0] for b in batches] == [64, 64]
  for b, rows in zip(batches, (order[:64], order[64:128])):
    np.testing.assert_array_equal(b["input_ids"], split.batch(rows)["input_ids"])
  small = Datasets(tok, split, build_split(tok, texts[:70], 24, 0, False, EOS), "", False, 0.0)
  short = small.reference_val_batches(64, 2)
  assert [b["input_ids"].shape[0] for b in short] == [64, 64]  # topped up with all-pad rows
  assert [int((b["attention_mask"].sum(axis=1) > 0).sum()) for b in short] == [64, 6]


@pytest.mark.parametrize("pad_semantics", ["reference", "masked"])
def test_pad_rows_leave_a_reference_batch_mean_unchanged(tok, pad_semantics):
  """The all-pad rows a short reference-validation batch is topped up with add no target and
  move no real row's loss (dropless: each token is routed alone)."""
  split = build_split(tok, TEXTS, 24, pad_id=0, packing=False, eos_id=EOS)
  cfg = tiny_model_config(vocab_size=tok.get_vocab_size(), pad_semantics=pad_semantics)
  model = CoECausalLM(cfg.replace(dispatch="dropless"))
  params = model.init(jax.random.key(0), jnp.zeros((1, 24), jnp.int32))["params"]
  eval_step = jax.jit(make_eval_step(model))
  short, padded = split.batch(range(3)), split.batch(range(3), pad_rows=5)
  assert batch_mean_eval_loss(eval_step, params, [padded]) == pytest.approx(
    batch_mean_eval_loss(eval_step, params, [short]), rel=1e-6
  )
  assert float(eval_step(params, padded)[1]) == float(eval_step(params, short)[1]) > 0


def test_reference_val_batches_hold_one_example_per_row_when_packed(tok):
  texts = [f"query : what is {i} + 1? response : {i + 1}" for i in range(40)]
  packed = build_split(tok, texts, 64, pad_id=0, packing=True, eos_id=EOS)
  unpacked = build_split(tok, texts, 64, pad_id=0, packing=False, eos_id=EOS)
  assert packed.num_rows < packed.num_examples  # really packed
  ds = Datasets(tok, packed, packed, "", False, 0.0)
  batches = ds.reference_val_batches(batch_size=16, num_batches=2, seed=0)
  order = np.random.default_rng(0).permutation(40)
  for b, rows in zip(batches, (order[:16], order[16:32])):
    assert b["segment_ids"].max() == 1  # one example per row
    np.testing.assert_array_equal(b["input_ids"], unpacked.batch(rows)["input_ids"])
    np.testing.assert_array_equal(b["positions"], unpacked.batch(rows)["positions"])


def test_batch_means_differ_from_the_pooled_mean():
  """(sum, count) per batch: (10, 10) and (1, 2) -> pooled 11/12, reference (1 + 0.5) / 2."""
  results = iter([(10.0, 10.0), (1.0, 2.0)])
  eval_step = lambda params, batch: next(results)
  assert batch_mean_eval_loss(eval_step, None, [None, None]) == pytest.approx(0.75)
  results = iter([(10.0, 10.0), (1.0, 2.0)])
  assert pooled_eval_loss(eval_step, None, [None, None]) == pytest.approx(11 / 12)


@pytest.mark.slow
def test_training_logs_both_validation_numbers(tmp_path):
  config = small_config(
    **{
      "train.steps": 2,
      "train.eval_every": 2,
      "train.paper_val": True,
      "train.paper_val_batch_size": 8,
      "train.checkpoint_every": 2,
    }
  )
  summary = train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  last = read_metrics(str(tmp_path / "run"))[-1]
  assert math.isfinite(last["val/loss"]) and math.isfinite(last["val/loss_paper"])
  assert summary["final_val_loss_paper"] == last["val/loss_paper"]
