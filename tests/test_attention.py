"""Tests for coe_jax.nn.attention: MLA + YaRN against an independent float64 numpy forward."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core.meta import unbox

from coe_jax.nn.attention import (
  MultiHeadLatentAttention,
  apply_rotary,
  make_attention_mask,
  rotary_cos_sin,
  rotary_mscale,
  softmax_scale,
  yarn_inv_freq,
)
from coe_jax.nn.model_config import ModelConfig

SEQ = 12
SMALL = ModelConfig().replace(
  vocab_size=64,
  hidden_size=32,
  num_heads=4,
  kv_lora_rank=16,
  qk_nope_head_dim=8,
  qk_rope_head_dim=8,
  v_head_dim=8,
  n_routed_experts=4,
  num_experts_per_tok=2,
  moe_intermediate_size=16,
  initializer_range=0.2,
)


# ----------------------------------------------------------------------------
# Independent numpy (float64) reference, written from the DeepSeek-V2 formulas.
# ----------------------------------------------------------------------------


def np_mscale(s, m):
  return 0.1 * m * np.log(s) + 1.0 if s > 1 else 1.0


def np_inv_freq(dim, base, scaling="yarn", factor=40.0, orig=4096, beta_fast=32.0, beta_slow=1.0):
  freq_extra = 1.0 / (base ** (np.arange(0, dim, 2) / dim))
  if scaling == "none":
    return freq_extra
  freq_inter = 1.0 / (factor * base ** (np.arange(0, dim, 2) / dim))

  def corr_dim(num_rot):
    return dim * np.log(orig / (num_rot * 2 * np.pi)) / (2 * np.log(base))

  low = max(np.floor(corr_dim(beta_fast)), 0)
  high = min(np.ceil(corr_dim(beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  inv_freq_mask = 1 - ramp
  return freq_inter * (1 - inv_freq_mask) + freq_extra * inv_freq_mask


def np_inv_freq_of(cfg):
  return np_inv_freq(
    cfg.qk_rope_head_dim,
    cfg.rope_theta,
    cfg.rope_scaling,
    cfg.rope_factor,
    cfg.rope_original_max_position,
    cfg.rope_beta_fast,
    cfg.rope_beta_slow,
  )


def np_rope(x, positions, cfg):
  """x: [b, s, h, d]; de-interleave then x*cos + rotate_half(x)*sin."""
  b, s, h, d = x.shape
  x = x.reshape(b, s, h, d // 2, 2).transpose(0, 1, 2, 4, 3).reshape(b, s, h, d)
  freqs = positions[..., None].astype(np.float64) * np_inv_freq_of(cfg)  # [b, s, d/2]
  emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
  m = 1.0
  if cfg.rope_scaling == "yarn":
    m = np_mscale(cfg.rope_factor, cfg.rope_mscale) / np_mscale(
      cfg.rope_factor, cfg.rope_mscale_all_dim
    )
  rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
  return x * np.cos(emb) * m + rot * np.sin(emb) * m


def np_mla(params, x, positions, mask, cfg):
  """Full forward in float64. mask: [b, s, s] bool. Returns [b, s, hidden]."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
  b, s, _ = x.shape
  H, nope, rope, vd, r = (
    cfg.num_heads,
    cfg.qk_nope_head_dim,
    cfg.qk_rope_head_dim,
    cfg.v_head_dim,
    cfg.kv_lora_rank,
  )
  q = (x @ p["q_proj"]["kernel"]).reshape(b, s, H, nope + rope)
  q_nope, q_pe = q[..., :nope], q[..., nope:]
  ckv = x @ p["kv_a_proj_with_mqa"]["kernel"]
  c, k_pe = ckv[..., :r], ckv[..., r:]
  c = c / np.sqrt(np.mean(c**2, -1, keepdims=True) + cfg.rms_norm_eps)
  c = c * p["kv_a_layernorm"]["scale"]
  kv = (c @ p["kv_b_proj"]["kernel"]).reshape(b, s, H, nope + vd)
  k_nope, value = kv[..., :nope], kv[..., nope:]
  q_pe = np_rope(q_pe, positions, cfg)
  k_pe = np_rope(k_pe[:, :, None, :], positions, cfg)
  query = np.concatenate([q_nope, q_pe], -1)
  key = np.concatenate([k_nope, np.broadcast_to(k_pe, (b, s, H, rope))], -1)
  scale = (nope + rope) ** -0.5
  if cfg.rope_scaling == "yarn":
    scale *= np_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
  out = np.zeros((b, s, H, vd))
  for bi in range(b):
    for h in range(H):
      scores = query[bi, :, h] @ key[bi, :, h].T * scale
      scores = np.where(mask[bi], scores, -np.inf)
      with np.errstate(invalid="ignore"):  # rows with no allowed key become NaN here
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(-1, keepdims=True)
      out[bi, :, h] = probs @ value[bi, :, h]
  return out.reshape(b, s, H * vd) @ p["o_proj"]["kernel"]


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def init_params(cfg, seed=0):
  """Flax params with a random (not all-ones) kv_a_layernorm scale."""
  x = jnp.zeros((1, SEQ, cfg.hidden_size))
  pos = jnp.zeros((1, SEQ), jnp.int32)
  params = unbox(
    MultiHeadLatentAttention(cfg).init(
      jax.random.key(seed), x, pos, make_attention_mask(seq_len=SEQ)
    )
  )["params"]
  scale = 1.0 + 0.2 * jax.random.normal(jax.random.key(seed + 1), (cfg.kv_lora_rank,))
  return {**params, "kv_a_layernorm": {"scale": scale}}


def forward(cfg, params, x, positions, mask):
  return jax.jit(MultiHeadLatentAttention(cfg).apply)({"params": params}, x, positions, mask)


def random_inputs(cfg, batch=2, seed=3):
  x = np.random.default_rng(seed).normal(size=(batch, SEQ, cfg.hidden_size)).astype(np.float32)
  starts = np.array([5, 100, 0, 37][:batch])
  positions = (starts[:, None] + np.arange(SEQ)).astype(np.int32)
  return x, positions


def np_mask(attention_mask):
  causal = np.tril(np.ones((SEQ, SEQ), bool))
  return causal[None] & attention_mask[:, None, :].astype(bool)


# ----------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------


def test_param_names_shapes_and_dtypes():
  params = init_params(SMALL)
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == {
    "q_proj": {"kernel": (32, 4 * 16)},
    "kv_a_proj_with_mqa": {"kernel": (32, 16 + 8)},
    "kv_a_layernorm": {"scale": (16,)},
    "kv_b_proj": {"kernel": (16, 4 * (8 + 8))},
    "o_proj": {"kernel": (4 * 8, 32)},
  }
  raw = MultiHeadLatentAttention(SMALL.replace(dtype="bfloat16")).init(
    jax.random.key(0),
    jnp.zeros((1, 4, 32)),
    jnp.zeros((1, 4), jnp.int32),
    make_attention_mask(seq_len=4),
  )
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(raw))


@pytest.mark.parametrize(
  "overrides",
  [
    dict(rope_scaling="yarn"),
    dict(rope_scaling="none"),
    dict(rope_scaling="yarn", rope_mscale=1.0, rope_mscale_all_dim=0.707, rope_factor=8.0),
  ],
  ids=["yarn", "none", "yarn-mscale"],
)
def test_matches_numpy_reference(overrides):
  cfg = SMALL.replace(**overrides)
  params = init_params(cfg)
  x, positions = random_inputs(cfg)
  ones = np.ones((2, SEQ), np.int32)
  got = forward(cfg, params, x, positions, make_attention_mask(jnp.asarray(ones)))
  want = np_mla(params, x.astype(np.float64), positions, np_mask(ones), cfg)
  assert np.abs(want).max() > 1.0  # the comparison is not trivially small
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("query_block", [0, 4, 5, 64], ids=lambda b: f"block{b}")
def test_matches_numpy_reference_with_padding(query_block):
  cfg = SMALL.replace(attention_query_block=query_block)  # 5: a ragged last block; 64: one block
  params = init_params(cfg)
  x, positions = random_inputs(cfg)
  attention_mask = np.ones((2, SEQ), np.int32)
  attention_mask[0, :3] = 0  # left padding: queries 0..2 have no allowed key at all
  attention_mask[1, -4:] = 0  # right padding
  got = np.asarray(
    forward(cfg, params, x, positions, make_attention_mask(jnp.asarray(attention_mask)))
  )
  assert np.isfinite(got).all()
  want = np_mla(params, x.astype(np.float64), positions, np_mask(attention_mask), cfg)
  real = attention_mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_paper_yarn_numbers():
  cfg = ModelConfig()  # the paper's attention: rope 64, factor 40, orig 4096, beta 32/1
  assert (cfg.qk_rope_head_dim, cfg.rope_factor, cfg.rope_original_max_position) == (64, 40, 4096)
  want = np_inv_freq(64, 1e4, "yarn", 40.0, 4096, 32.0, 1.0)
  np.testing.assert_allclose(yarn_inv_freq(cfg), want, rtol=1e-12)
  # Highest frequencies are kept, lowest divided by the factor.
  plain = 1e4 ** (-np.arange(0, 64, 2) / 64)
  assert yarn_inv_freq(cfg)[0] == plain[0]
  assert np.isclose(yarn_inv_freq(cfg)[-1], plain[-1] / 40)
  assert rotary_mscale(cfg) == 1.0
  assert math.isclose(
    softmax_scale(cfg), 192**-0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2, rel_tol=1e-12
  )


def test_plain_rotary_numbers():
  cfg = SMALL.replace(rope_scaling="none")
  np.testing.assert_allclose(yarn_inv_freq(cfg), 1e4 ** (-np.arange(0, 8, 2) / 8), rtol=1e-12)
  assert rotary_mscale(cfg) == 1.0
  assert softmax_scale(cfg) == 16**-0.5


def test_rotary_layout_permutation():
  """At position 0 rotary is the identity up to DeepSeek's de-interleave of the dims."""
  cfg = SMALL.replace(rope_scaling="none")
  x = jnp.arange(8.0).reshape(1, 1, 1, 8)
  cos, sin = rotary_cos_sin(jnp.zeros((1, 1), jnp.int32), cfg)
  assert cos.shape == (1, 1, 8) and cos.dtype == jnp.float32
  np.testing.assert_array_equal(apply_rotary(x, cos, sin)[0, 0, 0], [0, 2, 4, 6, 1, 3, 5, 7])


def test_make_attention_mask():
  attention_mask = jnp.array([[0, 1, 1, 1, 1]])
  segment_ids = jnp.array([[0, 1, 1, 2, 2]])
  mask = make_attention_mask(attention_mask, segment_ids)
  assert mask.shape == (1, 1, 5, 5) and mask.dtype == jnp.bool_
  want = np.array(
    [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], bool
  )
  np.testing.assert_array_equal(mask[0, 0], want)
  np.testing.assert_array_equal(make_attention_mask(seq_len=3)[0, 0], np.tril(np.ones((3, 3))))
  with pytest.raises(ValueError):
    make_attention_mask()


def test_causal():
  params = init_params(SMALL)
  x, positions = random_inputs(SMALL)
  mask = make_attention_mask(seq_len=SEQ)
  base = np.asarray(forward(SMALL, params, x, positions, mask))
  changed = x.copy()
  changed[:, 7] += 3.0
  out = np.asarray(forward(SMALL, params, changed, positions, mask))
  np.testing.assert_array_equal(out[:, :7], base[:, :7])
  assert np.abs(out[:, 7:] - base[:, 7:]).max() > 1e-2


def test_padding_keys_are_ignored():
  params = init_params(SMALL)
  x, positions = random_inputs(SMALL)
  attention_mask = np.ones((2, SEQ), np.int32)
  attention_mask[0, :4] = 0
  attention_mask[1, -3:] = 0
  mask = make_attention_mask(jnp.asarray(attention_mask))
  base = np.asarray(forward(SMALL, params, x, positions, mask))
  noisy = np.where(attention_mask[..., None] == 0, 50.0 * x, x).astype(np.float32)
  out = np.asarray(forward(SMALL, params, noisy, positions, mask))
  real = attention_mask.astype(bool)
  np.testing.assert_allclose(out[real], base[real], rtol=1e-6, atol=1e-6)


def test_packed_segments_do_not_attend_across():
  params = init_params(SMALL)
  x, _ = random_inputs(SMALL, batch=1)
  split = 5
  segment_ids = jnp.asarray([[1] * split + [2] * (SEQ - split)])
  positions = np.concatenate([np.arange(split), np.arange(SEQ - split)])[None].astype(np.int32)
  packed = np.asarray(
    forward(SMALL, params, x, positions, make_attention_mask(segment_ids=segment_ids))
  )
  for lo, hi in ((0, split), (split, SEQ)):
    alone = forward(
      SMALL, params, x[:, lo:hi], positions[:, lo:hi], make_attention_mask(seq_len=hi - lo)
    )
    np.testing.assert_allclose(packed[:, lo:hi], np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_causal_blocks_match_dense_with_packing_and_gradients():
  """Skipping the keys after each query block changes neither outputs nor gradients."""
  dense, blocked = SMALL.replace(attention_query_block=0), SMALL.replace(attention_query_block=5)
  params = init_params(SMALL)
  x, positions = random_inputs(SMALL)
  segment_ids = np.array([[1] * 4 + [2] * 6 + [0] * 2, [0] * 3 + [1] * 9], np.int32)
  real = jnp.asarray(segment_ids > 0, jnp.float32)[..., None]
  mask = make_attention_mask(
    jnp.asarray((segment_ids > 0).astype(np.int32)), jnp.asarray(segment_ids)
  )
  weights = jax.random.normal(jax.random.key(7), (2, SEQ, SMALL.hidden_size))

  def loss(cfg, params, x):
    out = MultiHeadLatentAttention(cfg).apply({"params": params}, x, positions, mask)
    return jnp.sum(out * weights * real)

  want, want_grads = jax.value_and_grad(functools.partial(loss, dense), argnums=(0, 1))(params, x)
  got, got_grads = jax.value_and_grad(functools.partial(loss, blocked), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  assert max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want_grads)) > 1e-2


def test_bfloat16_close_to_float32():
  params = init_params(SMALL)
  x, positions = random_inputs(SMALL)
  mask = make_attention_mask(seq_len=SEQ)
  ref = np.asarray(forward(SMALL, params, x, positions, mask))
  out = forward(SMALL.replace(dtype="bfloat16"), params, x, positions, mask)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(out).all()
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert err < 0.05, err
