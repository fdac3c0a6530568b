"""Tests for coe_jax.generate: cached decoding equals the full forward, sampling, stopping."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from model_helpers import tiny_model_config

from coe_jax.inference import decoding as gen
from coe_jax.nn.model import CoECausalLM, init_decode_cache
from coe_jax.nn.model_config import ModelConfig

V = 48
TINY = tiny_model_config(vocab_size=V)
PAD = 0
# Row 0 left-padded, row 1 right-padded, row 2 unpadded: [b, 6] prompts.
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
NEW = 5
# Every generate call below shares these static settings, so tests reuse compiles.
FAST = dict(compiler_options=ref.FAST_COMPILE, return_logits=True)


def _batch():
  ids = np.full((3, 6), PAD, np.int32)
  mask = np.zeros((3, 6), np.int32)
  ids[0, 2:], mask[0, 2:] = PROMPTS[0], 1
  ids[1, :3], mask[1, :3] = PROMPTS[1], 1
  ids[2], mask[2] = PROMPTS[2], 1
  return ids, mask


@functools.lru_cache(maxsize=None)
def _params(cfg, seed=0):
  return ref.random_params(CoECausalLM(cfg).init, jnp.zeros((1, 8), jnp.int32), seed=seed)


@functools.lru_cache(maxsize=None)
def _full_forward(cfg):
  return ref.fast_jit(lambda p, ids, mask: CoECausalLM(cfg).apply({"params": p}, ids, mask)[0])


def _full_logits_after(cfg, params, rows):
  """Full-forward logits predicting each generated token, rows right-padded to one length."""
  width = max(len(r) for r in rows)
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for b, row in enumerate(rows):
    ids[b, : len(row)], mask[b, : len(row)] = row, 1
  return np.asarray(_full_forward(gen.decode_config(cfg))(params, ids, mask))


@pytest.mark.parametrize(
  "chain,absorb,scan_layers",
  [(1, True, False), (2, True, False), (2, False, False), (2, True, True)],
)
def test_cached_decoding_equals_full_forward(chain, absorb, scan_layers):
  cfg = TINY.replace(num_iterations=chain, scan_layers=scan_layers)
  params = _params(cfg)
  ids, mask = _batch()
  out = gen.generate(params, cfg, ids, mask, max_new_tokens=NEW, pad_id=PAD, absorb=absorb, **FAST)
  tokens, step_logits = np.asarray(out.tokens), np.asarray(out.logits)
  assert tokens.shape == (3, NEW) and np.all(np.asarray(out.num_tokens) == NEW)
  rows = [p + tokens[b].tolist() for b, p in enumerate(PROMPTS)]
  full = _full_logits_after(cfg, params, rows)
  for b, prompt in enumerate(PROMPTS):
    expected = full[b, len(prompt) - 1 : len(prompt) - 1 + NEW]
    np.testing.assert_allclose(step_logits[b], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(tokens[b], expected.argmax(-1))  # greedy


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_model_has_the_same_params_as_the_lm(scan_layers):
  cfg = TINY.replace(scan_layers=scan_layers)
  ids = jnp.zeros((2, 4), jnp.int32)
  lm = jax.eval_shape(CoECausalLM(cfg).init, jax.random.key(0), ids)["params"]
  cache = init_decode_cache(cfg, 2, 8)
  cached = jax.eval_shape(
    CoECausalLM(cfg, decode="step").init,
    jax.random.key(0),
    ids,
    jnp.ones_like(ids),
    ids,
    cache=cache,
  )["params"]
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert shapes(cached) == shapes(lm)


def test_eos_stops_only_its_row_and_pads_the_rest():
  params = _params(TINY)
  ids, mask = _batch()
  free = gen.generate(params, TINY, ids, mask, max_new_tokens=NEW, pad_id=PAD, **FAST)
  free_tokens = np.asarray(free.tokens)
  eos = int(free_tokens[0, 1])
  out = gen.generate(params, TINY, ids, mask, max_new_tokens=NEW, pad_id=PAD, eos_id=eos, **FAST)
  tokens, counts = np.asarray(out.tokens), np.asarray(out.num_tokens)
  for b in range(3):
    hits = np.flatnonzero(free_tokens[b] == eos)
    n = hits[0] + 1 if hits.size else NEW
    assert counts[b] == n and bool(out.finished[b]) == bool(hits.size)
    np.testing.assert_array_equal(tokens[b, :n], free_tokens[b, :n])
    assert np.all(tokens[b, n:] == PAD)


def test_stop_hit_matches_sequence_endings():
  table, valid = gen.stop_sequence_table([[3, 4], [7]])
  tail = jnp.asarray([[3, 4], [4, 1], [-1, 7], [-1, 4], [7, 3]])
  np.testing.assert_array_equal(
    gen.stop_hit(tail, jnp.asarray(table), jnp.asarray(valid)), [True, False, True, False, False]
  )


def test_sampling_greedy_nucleus_and_determinism():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]] * 2000))
  keys = gen.row_keys_for(0, range(2000))
  sample = jax.jit(gen.sample_token)
  greedy = sample(logits, keys, jnp.float32(0.0), jnp.float32(1.0))
  assert np.all(np.asarray(greedy) == 1)
  nucleus = np.asarray(sample(logits, keys, jnp.float32(1.0), jnp.float32(0.7)))
  assert set(nucleus.tolist()) == {1, 2}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
  assert 0.55 < np.mean(nucleus == 1) < 0.70  # renormalised: 0.5 / 0.8 = 0.625
  full = np.asarray(sample(logits, keys, jnp.float32(1.0), jnp.float32(1.0)))
  assert set(full.tolist()) == {0, 1, 2, 3}
  again = np.asarray(sample(logits, keys, jnp.float32(1.0), jnp.float32(1.0)))
  np.testing.assert_array_equal(full, again)


def test_a_prompts_sample_does_not_depend_on_its_batch_row():
  params = _params(TINY)
  ids, mask = _batch()
  kwargs = dict(max_new_tokens=NEW, pad_id=PAD, temperature=1.0, seed=3, **FAST)
  out = gen.generate(params, TINY, ids, mask, row_ids=[10, 11, 12], **kwargs)
  order = [2, 0, 1]
  shuffled = gen.generate(params, TINY, ids[order], mask[order], row_ids=[12, 10, 11], **kwargs)
  np.testing.assert_array_equal(np.asarray(shuffled.tokens), np.asarray(out.tokens)[order])


def test_cache_bytes_per_token_of_the_paper_config():
  paper = ModelConfig().replace(
    dtype="bfloat16"
  )  # 4 layers, kv rank 512, rope 64, 8 heads x (128+64, 128)
  sizes = gen.cache_bytes_per_token(paper)
  assert sizes["mla"] == 4 * (512 + 64) * 2 == 4608
  assert sizes["full_kv"] == 4 * 8 * (128 + 64 + 128) * 2 == 20480


def test_prompt_positions_count_real_tokens():
  _, mask = _batch()
  np.testing.assert_array_equal(
    gen.prompt_positions(jnp.asarray(mask)),
    [[0, 0, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4, 5]],
  )
