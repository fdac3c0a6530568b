"""DeepSeek-V2 multi-head latent attention (MLA) with YaRN rotary embeddings.

Computes what the DeepSeek-V2 Hugging Face reference (`DeepseekV2Attention` with
`q_lora_rank=None` and `DeepseekV2YarnRotaryEmbedding`) computes:

  q              = q_proj(x)                          [b, s, H, nope + rope]
  c, k_pe        = kv_a_proj_with_mqa(x)              [b, s, kv_lora_rank], [b, s, rope]
  k_nope, value  = kv_b_proj(kv_a_layernorm(c))       [b, s, H, nope], [b, s, H, v]
  query          = [q_nope, rot(q_pe)],  key = [k_nope, rot(k_pe) shared by all heads]
  out            = o_proj(softmax(query . key * scale + mask) . value)

The key side is split into two stages so that a decoder can later cache the
small per-token state: `project_latent_keys` returns the normed latent `c` and
the rotated `k_pe` (kv_lora_rank + rope numbers per token), and `attend` does the
up-projection with `kv_b_proj` and the attention math from those.

Submodule names (`q_proj`, `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`,
`o_proj`) match the reference's and are relied on by the checkpoint converter.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from coe_jax.nn.layers import RMSNorm, compute_dtype, normal_init
from coe_jax.nn.logical_axes import BATCH, EMBED, HEADS, KV, KV_LORA, LENGTH, constrain, param_init
from coe_jax.nn.model_config import ModelConfig

# Score given to masked (query, key) pairs. A finite value keeps rows with no
# allowed key (padding queries) finite: they become a uniform average, not NaN.
_MASK_VALUE = float(np.finfo(np.float32).min)


# ----------------------------------------------------------------------------
# YaRN rotary embedding (static numbers, computed in numpy).
# ----------------------------------------------------------------------------


def _get_mscale(scale: float, mscale: float) -> float:
  """YaRN attention-temperature factor: 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
  """Rotary dim index whose wavelength completes `num_rotations` turns over `max_pos`."""
  return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _correction_range(config: ModelConfig) -> tuple[int, int]:
  """(low, high) dim-pair indices between which YaRN blends interpolation and extrapolation."""
  dim, base = config.qk_rope_head_dim, config.rope_theta
  orig = config.rope_original_max_position
  low = math.floor(_correction_dim(config.rope_beta_fast, dim, base, orig))
  high = math.ceil(_correction_dim(config.rope_beta_slow, dim, base, orig))
  return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(config: ModelConfig) -> np.ndarray:
  """Rotary inverse frequencies, float64 numpy of shape [qk_rope_head_dim // 2].

  Plain rotary (`base ** (-2i / dim)`) when `rope_scaling == 'none'`; with 'yarn',
  the low-frequency pairs are divided by `rope_factor` (interpolated), the
  high-frequency ones kept (extrapolated), with a linear ramp in between.
  """
  dim, base = config.qk_rope_head_dim, config.rope_theta
  exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
  freq_extra = 1.0 / (base**exponents)
  if config.rope_scaling == "none":
    return freq_extra
  freq_inter = 1.0 / (config.rope_factor * base**exponents)
  low, high = _correction_range(config)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  extra_weight = 1.0 - ramp
  return freq_inter * (1.0 - extra_weight) + freq_extra * extra_weight


def rotary_mscale(config: ModelConfig) -> float:
  """Factor multiplying cos and sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
  if config.rope_scaling == "none":
    return 1.0
  factor = config.rope_factor
  return _get_mscale(factor, config.rope_mscale) / _get_mscale(factor, config.rope_mscale_all_dim)


def softmax_scale(config: ModelConfig) -> float:
  """q_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 with YaRN."""
  scale = config.q_head_dim**-0.5
  if config.rope_scaling == "yarn" and config.rope_mscale_all_dim:
    scale *= _get_mscale(config.rope_factor, config.rope_mscale_all_dim) ** 2
  return scale


def rotary_cos_sin(
  positions: Int[Array, "batch seq"], config: ModelConfig
) -> tuple[Float[Array, "batch seq rope"], Float[Array, "batch seq rope"]]:
  """cos and sin tables (float32, [batch, seq, rope]) for absolute token positions.

  Uses emb = concat(freqs, freqs) as the reference does, scaled by `rotary_mscale`.
  """
  inv_freq = jnp.asarray(yarn_inv_freq(config), jnp.float32)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  mscale = rotary_mscale(config)
  return jnp.cos(emb) * mscale, jnp.sin(emb) * mscale


def _deinterleave(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
  """DeepSeek's layout permutation: [x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]."""
  d = x.shape[-1]
  pairs = x.reshape(*x.shape[:-1], d // 2, 2)
  return jnp.swapaxes(pairs, -1, -2).reshape(x.shape)


def _rotate_half(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
  """[x1, x2] -> [-x2, x1] over the two halves of the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(
  x: Float[Array, "batch seq heads rope"],
  cos: Float[Array, "batch seq rope"],
  sin: Float[Array, "batch seq rope"],
) -> Float[Array, "batch seq heads rope"]:
  """De-interleaves the rope dims, then x * cos + rotate_half(x) * sin (float32 math).

  Returns the same shape and dtype as `x`; cos/sin broadcast over heads.
  """
  x32 = _deinterleave(x).astype(jnp.float32)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x32 * cos + _rotate_half(x32) * sin).astype(x.dtype)


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------


def make_attention_mask(
  attention_mask: Int[Array, "batch seq"] | None = None,
  segment_ids: Int[Array, "batch seq"] | None = None,
  seq_len: int | None = None,
) -> Bool[Array, "batch 1 seq seq"]:
  """Boolean [batch, 1, query, key] mask: True where the query may attend to the key.

  Allowed = causal (key <= query) AND the key is a real token (attention_mask != 0)
  AND query and key share a segment id (packed rows). A None input means all
  tokens real / one segment; with both None the batch axis is 1 and `seq_len`
  is required.
  """
  given = attention_mask if attention_mask is not None else segment_ids
  if seq_len is None:
    if given is None:
      raise ValueError(
        "make_attention_mask: pass seq_len when attention_mask and segment_ids are both None"
      )
    seq_len = given.shape[-1]
  mask = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]
  if attention_mask is not None:
    mask = mask & attention_mask.astype(bool)[:, None, None, :]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


# ----------------------------------------------------------------------------
# The module.
# ----------------------------------------------------------------------------


class MultiHeadLatentAttention(nn.Module):
  """DeepSeek-V2 MLA without query compression (q_lora_rank=None).

  Params (float32, Flax kernels are [in, out]), with their logical axes:
    q_proj/kernel               [hidden, H * (nope + rope)]     (embed, heads)
    kv_a_proj_with_mqa/kernel   [hidden, kv_lora_rank + rope]   (embed, kv_lora)
    kv_a_layernorm/scale        [kv_lora_rank]                  (norm,)
    kv_b_proj/kernel            [kv_lora_rank, H * (nope + v)]  (kv_lora, heads)
    o_proj/kernel               [H * v, hidden]                 (heads, embed)
  Per-head output columns are laid out head-major, [head, (nope, rope)] and
  [head, (nope, v)], as the reference's `.view(b, s, H, -1)` reads them.
  Activations: per-head (batch, length, heads, kv), the latent (batch, length,
  kv_lora), the output (batch, length, embed).
  """

  config: ModelConfig

  def setup(self):
    config = self.config
    dtype, f32 = compute_dtype(config.dtype), jnp.float32

    def dense(features: int, names: tuple[str, str]) -> nn.Dense:
      init = param_init(normal_init(config.initializer_range), names)
      return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=f32, kernel_init=init)

    heads = config.num_heads
    self.q_proj = dense(heads * config.q_head_dim, (EMBED, HEADS))
    self.kv_a_proj_with_mqa = dense(config.kv_lora_rank + config.qk_rope_head_dim, (EMBED, KV_LORA))
    self.kv_a_layernorm = RMSNorm(eps=config.rms_norm_eps, dtype=dtype)
    self.kv_b_proj = dense(heads * (config.qk_nope_head_dim + config.v_head_dim), (KV_LORA, HEADS))
    self.o_proj = dense(config.hidden_size, (HEADS, EMBED))

  def __call__(
    self,
    x: Float[Array, "batch seq hidden"],
    positions: Int[Array, "batch seq"],
    mask: Bool[Array, "#batch 1 seq seq"],
  ) -> Float[Array, "batch seq hidden"]:
    """Self-attention over `x`; `mask` from `make_attention_mask` (True = attend)."""
    cos, sin = rotary_cos_sin(positions, self.config)
    q_nope, q_pe = self.project_queries(x, cos, sin)
    c_latent, k_pe = self.project_latent_keys(x, cos, sin)
    return self.attend(q_nope, q_pe, c_latent, k_pe, mask, causal_self=True)

  def project_queries(
    self,
    x: Float[Array, "batch seq hidden"],
    cos: Float[Array, "batch seq rope"],
    sin: Float[Array, "batch seq rope"],
  ) -> tuple[Float[Array, "batch seq heads nope"], Float[Array, "batch seq heads rope"]]:
    """q_nope [b, s, H, nope] and rotated q_pe [b, s, H, rope], in compute dtype."""
    config = self.config
    q = self.q_proj(x).reshape(*x.shape[:2], config.num_heads, config.q_head_dim)
    q = constrain(q, (BATCH, LENGTH, HEADS, KV))
    q_nope, q_pe = jnp.split(q, [config.qk_nope_head_dim], axis=-1)
    return q_nope, apply_rotary(q_pe, cos, sin)

  def project_latent_keys(
    self,
    x: Float[Array, "batch seq hidden"],
    cos: Float[Array, "batch seq rope"],
    sin: Float[Array, "batch seq rope"],
  ) -> tuple[Float[Array, "batch seq rank"], Float[Array, "batch seq rope"]]:
    """The cacheable key state: normed latent c [b, s, rank] and rotated k_pe [b, s, rope]."""
    compressed = self.kv_a_proj_with_mqa(x)
    c, k_pe = jnp.split(compressed, [self.config.kv_lora_rank], axis=-1)
    k_pe = apply_rotary(k_pe[:, :, None, :], cos, sin)[:, :, 0, :]
    return constrain(self.kv_a_layernorm(c), (BATCH, LENGTH, KV_LORA)), k_pe

  def attend(
    self,
    q_nope: Float[Array, "batch q heads nope"],
    q_pe: Float[Array, "batch q heads rope"],
    c_latent: Float[Array, "batch k rank"],
    k_pe: Float[Array, "batch k rope"],
    mask: Bool[Array, "#batch 1 q k"],
    causal_self: bool = False,
  ) -> Float[Array, "batch q hidden"]:
    """Up-projects the latent to k_nope/value, attends, and applies o_proj.

    Query and key lengths may differ (a decoder's cached keys); `mask` is
    [batch or 1, 1, q, k] with True = attend. `causal_self=True` says query i
    is key i and `mask` is causal, so each block of
    `config.attention_query_block` queries skips the keys after its last query.
    """
    config = self.config
    kv = self.kv_b_proj(c_latent).reshape(
      *c_latent.shape[:2], config.num_heads, config.qk_nope_head_dim + config.v_head_dim
    )
    k_nope, value = jnp.split(kv, [config.qk_nope_head_dim], axis=-1)
    query_block = config.attention_query_block if causal_self else 0
    out = _attention(
      q_nope, q_pe, k_nope, k_pe.astype(q_pe.dtype), value, mask, softmax_scale(config), query_block
    )
    return self._project_out(out)

  def _project_out(self, out: Float[Array, "batch q heads v"]) -> Float[Array, "batch q hidden"]:
    """o_proj over the heads' outputs, joined head-major."""
    out = constrain(out, (BATCH, LENGTH, HEADS, KV))
    return constrain(self.o_proj(out.reshape(*out.shape[:2], -1)), (BATCH, LENGTH, EMBED))

  # Decoding with a latent cache (used by `CoECausalLM(decode=...)`, coe_jax.nn.model).

  def attend_absorbed(
    self,
    q_nope: Float[Array, "batch q heads nope"],
    q_pe: Float[Array, "batch q heads rope"],
    c_latent: Float[Array, "batch k rank"],
    k_pe: Float[Array, "batch k rope"],
    mask: Bool[Array, "#batch 1 q k"],
  ) -> Float[Array, "batch q hidden"]:
    """`attend` with kv_b_proj absorbed into the query and output (DeepSeek-V2 decoding).

    Equal to `attend` (up to rounding) but never materialises k_nope/value for
    the k cached tokens: q_nope is mapped into the latent space, q_lat = q_nope
    W_uk^T [b, q, H, rank], scores = q_lat . c + q_pe . k_pe, and the output is
    (probs . c) W_uv. Per step this costs O(k * H * rank) instead of the
    O(k * rank * H * (nope + v)) up-projection of the whole cache.
    """
    config = self.config
    if self.is_initializing():  # create kv_b_proj's kernel
      self.kv_b_proj(c_latent[:, :1])
    kernel = nn.meta.unbox(self.kv_b_proj.variables["params"]["kernel"]).astype(q_nope.dtype)
    per_head = config.qk_nope_head_dim + config.v_head_dim
    kernel = kernel.reshape(config.kv_lora_rank, config.num_heads, per_head)
    w_uk, w_uv = jnp.split(kernel, [config.qk_nope_head_dim], axis=-1)
    f32 = jnp.float32
    q_latent = jnp.einsum("bqhd,rhd->bqhr", q_nope, w_uk, preferred_element_type=f32)
    c32 = c_latent.astype(f32)
    scores = jnp.einsum("bqhr,bkr->bhqk", q_latent, c32, preferred_element_type=f32)
    rope = jnp.einsum("bqhd,bkd->bhqk", q_pe, k_pe.astype(q_pe.dtype), preferred_element_type=f32)
    scores = jnp.where(mask, (scores + rope) * softmax_scale(config), _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    context = jnp.einsum("bhqk,bkr->bqhr", probs, c32, preferred_element_type=f32)
    return self._project_out(jnp.einsum("bqhr,rhe->bqhe", context.astype(q_nope.dtype), w_uv))

  def attend_with_cache(
    self,
    x: Float[Array, "batch t hidden"],
    positions: Int[Array, "batch t"],
    mask: Bool[Array, "#batch 1 t k"],
    c_cache: Float[Array, "batch k rank"],
    kpe_cache: Float[Array, "batch k rope"],
    index: Int[Array, ""],
    absorb: bool = True,
  ) -> tuple[
    Float[Array, "batch t hidden"], Float[Array, "batch t rank"], Float[Array, "batch t rope"]
  ]:
    """Self-attention of `t` new tokens over a latent cache of `k` slots.

    The new tokens' latent and rotary key are written at slots
    [index, index + t) of a copy of the cache and attended to with the cached
    ones; `mask` (True = attend) says which slots each new token sees.
    Returns (output [b, t, hidden], new latent [b, t, rank], new k_pe [b, t, rope]);
    the caller stores the last two in its cache.
    """
    cos, sin = rotary_cos_sin(positions, self.config)
    q_nope, q_pe = self.project_queries(x, cos, sin)
    c_new, kpe_new = self.project_latent_keys(x, cos, sin)
    c_all = jax.lax.dynamic_update_slice_in_dim(c_cache, c_new.astype(c_cache.dtype), index, axis=1)
    kpe_all = jax.lax.dynamic_update_slice_in_dim(
      kpe_cache, kpe_new.astype(kpe_cache.dtype), index, axis=1
    )
    attend = self.attend_absorbed if absorb else self.attend
    return attend(q_nope, q_pe, c_all, kpe_all, mask), c_new, kpe_new


def _attention(
  q_nope: Float[Array, "batch q heads nope"],
  q_pe: Float[Array, "batch q heads rope"],
  k_nope: Float[Array, "batch k heads nope"],
  k_pe: Float[Array, "batch k rope"],
  value: Float[Array, "batch k heads v"],
  mask: Bool[Array, "#batch 1 q k"],
  scale: float,
  query_block: int = 0,
) -> Float[Array, "batch q heads v"]:
  """softmax(([q_nope, q_pe] . [k_nope, k_pe]) * scale, masked) . value, float32 softmax.

  The shared k_pe is broadcast to the heads and joined to k_nope so the scores
  are one matmul over nope + rope dims. With `query_block > 0` (causal self-
  attention only: query i is key i) the queries go in blocks of that many and
  each block sees keys 0 .. its last query: the keys after it are all masked,
  so skipping them changes nothing but the cost. Rows with no allowed key (all
  padding) come out as a uniform average of the keys they were scored against
  (finite; they carry no loss).
  """
  heads = q_nope.shape[2]
  query = jnp.concatenate([q_nope, q_pe], axis=-1)
  key = jnp.concatenate(
    [k_nope, jnp.broadcast_to(k_pe[:, :, None, :], (*k_pe.shape[:2], heads, k_pe.shape[-1]))],
    axis=-1,
  )
  q_len = query.shape[1]
  if query_block <= 0 or query_block >= q_len:
    return _attend_block(query, key, value, mask, scale)
  if key.shape[1] != q_len:
    raise ValueError(f"blocked causal attention: {key.shape[1]} keys for {q_len} queries")
  outs = []
  for start in range(0, q_len, query_block):
    end = min(start + query_block, q_len)
    outs.append(
      _attend_block(
        query[:, start:end], key[:, :end], value[:, :end], mask[:, :, start:end, :end], scale
      )
    )
  return jnp.concatenate(outs, axis=1)


def _attend_block(
  query: Float[Array, "batch q heads d"],
  key: Float[Array, "batch k heads d"],
  value: Float[Array, "batch k heads v"],
  mask: Bool[Array, "#batch 1 q k"],
  scale: float,
) -> Float[Array, "batch q heads v"]:
  """Dense masked attention of `query` over `key`/`value` (float32 scores and softmax)."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(jnp.where(mask, scores * scale, _MASK_VALUE), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(value.dtype), value)
