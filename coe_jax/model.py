"""A DeepSeek-V2-style causal LM whose feed-forward blocks are CoE layers (SPEC 5).

    x = embed(input_ids)
    repeat num_layers:  h = x + MLA(RMSNorm(x));  x = CoELayer(h)
    logits = lm_head(RMSNorm(x))          # untied head, float32 logits

The decoder layers run under `nn.scan` (params stacked on a leading [layers]
axis): the layer body is traced once whatever the depth and per-layer remat
is a one-line policy. Routing statistics come out with a [layers] axis. The
training scan is unrolled: XLA then neither copies each layer's params and
saved activations in and out of stacked buffers nor runs a while loop; on CPU
that made the train step 11-13% faster and compiled faster too, even at 6
layers (experiments/PERF.md).
"""

from __future__ import annotations

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from coe_jax.attention import MultiHeadLatentAttention, make_attention_mask, rotary_cos_sin
from coe_jax.coe_layer import CoEAux, CoELayer
from coe_jax.expert_parallel import ExpertParallel
from coe_jax.layers import RMSNorm, compute_dtype, normal_init
from coe_jax.model_config import ModelConfig


@flax.struct.dataclass
class ModelAux:
  """What the LM returns besides logits.

  Attributes:
    aux_loss: <float32>[] load-balancing loss summed over layers and iterations.
    z_loss: <float32>[] router z-loss summed over layers and iterations.
    layers: `CoEAux` whose arrays have a leading [layers] axis.
  """

  aux_loss: Array
  z_loss: Array
  layers: CoEAux

  @property
  def dropped_fraction(self) -> Array:
    """Share of dropped assignments over all layers and iterations."""
    return self.layers.dropped_fraction.mean()


class DecoderLayer(nn.Module):
  """Attention then CoE: `(x, positions, mask, token_mask) -> (x_out, CoEAux)`; scan-compatible.

  `token_mask` (the LM's attention_mask) keeps padding out of expert capacity.
  """

  config: ModelConfig
  train: bool = False
  expert_parallel: Optional[ExpertParallel] = None

  @nn.compact
  def __call__(self, x: Float[Array, "batch seq hidden"], positions: Int[Array, "batch seq"],
               mask: Array, token_mask: Optional[Array] = None) -> tuple[Array, CoEAux]:
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    normed = RMSNorm(cfg.rms_norm_eps, dtype, name="input_layernorm")(x)
    h = x + MultiHeadLatentAttention(cfg, name="self_attn")(normed, positions, mask)
    out, aux = CoELayer(cfg.coe, expert_parallel=self.expert_parallel, name="mlp")(
        h, train=self.train, token_mask=token_mask)
    return out.astype(dtype), aux


def _remat_policy(name: str):
  return {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}[name]


class CoECausalLM(nn.Module):
  """Causal LM: `apply(variables, input_ids, ...) -> (logits <float32>[b, s, vocab], ModelAux)`.

  Params: `embed_tokens/embedding` [vocab, hidden]; `layers/...` stacked on a
  leading [num_layers] axis; `norm/scale`; `lm_head/kernel` [hidden, vocab].
  `expert_parallel` (optional) runs every CoE layer's routed pass per device
  (`coe_jax.expert_parallel`); the train loop passes `Parallelism.expert_parallel()`.
  """

  config: ModelConfig
  expert_parallel: Optional[ExpertParallel] = None

  @nn.compact
  def __call__(self, input_ids: Int[Array, "batch seq"],
               attention_mask: Optional[Int[Array, "batch seq"]] = None,
               positions: Optional[Int[Array, "batch seq"]] = None,
               segment_ids: Optional[Int[Array, "batch seq"]] = None,
               *, train: bool = False) -> tuple[Float[Array, "batch seq vocab"], ModelAux]:
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    batch, seq = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    mask = make_attention_mask(attention_mask, segment_ids, seq)

    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=normal_init(cfg.initializer_range),
                     param_dtype=jnp.float32, dtype=dtype, name="embed_tokens")
    x = embed(input_ids)

    layer_cls = DecoderLayer
    if cfg.remat != "none":
      layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=_remat_policy(cfg.remat))
    layers = nn.scan(layer_cls, variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                     length=cfg.num_layers, unroll=cfg.num_layers)(
                         cfg, train=train, expert_parallel=self.expert_parallel, name="layers")
    x, layer_aux = layers(x, positions, mask, attention_mask)

    x = RMSNorm(cfg.rms_norm_eps, dtype, name="norm")(x)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=normal_init(cfg.initializer_range),
                      dtype=dtype, param_dtype=jnp.float32, name="lm_head")(x)
    aux = ModelAux(aux_loss=layer_aux.aux_loss.sum(), z_loss=layer_aux.z_loss.sum(), layers=layer_aux)
    return logits.astype(jnp.float32), aux


# ----------------------------------------------------------------------------
# Incremental decoding with an MLA latent cache (used by `coe_jax.generate`).
# ----------------------------------------------------------------------------

@flax.struct.dataclass
class DecodeCache:
  """What DeepSeek-V2 caches per token: the normed latent and the rotary key, every layer.

  Slots are written in lockstep for the whole batch; a slot of a row that holds
  padding (or nothing yet) has `key_mask` False and is never attended to.

  Attributes:
    c_latent: <compute dtype>[layers, batch, max_len, kv_lora_rank] normed latent c.
    k_pe: <compute dtype>[layers, batch, max_len, qk_rope_head_dim] rotated rope key.
    key_mask: <bool>[batch, max_len] True where the slot holds a real token.
    index: <int32>[] the next slot to write.
  """

  c_latent: Array
  k_pe: Array
  key_mask: Array
  index: Array

  @property
  def max_len(self) -> int:
    return self.key_mask.shape[1]


def init_decode_cache(config: ModelConfig, batch: int, max_len: int) -> DecodeCache:
  """An empty cache of `max_len` slots (compute dtype, zeros)."""
  dtype = compute_dtype(config.dtype)
  layers = config.num_layers
  return DecodeCache(
      c_latent=jnp.zeros((layers, batch, max_len, config.kv_lora_rank), dtype),
      k_pe=jnp.zeros((layers, batch, max_len, config.qk_rope_head_dim), dtype),
      key_mask=jnp.zeros((batch, max_len), bool),
      index=jnp.zeros((), jnp.int32))


class CachedDecoderLayer(nn.Module):
  """`DecoderLayer` with a latent cache; same submodule names, so the same params.

  Call: `(x, positions, mask, c_cache, kpe_cache, index, token_mask) -> (x_out, (c_new,
  kpe_new))` where the caches are one layer's [batch, max_len, ...] slices, the
  new entries are [batch, t, ...] and `token_mask` [batch, t] marks real tokens. With `prefill=True` the t tokens attend only to
  each other (the cache is empty), exactly as in `DecoderLayer`.
  """

  config: ModelConfig
  prefill: bool = False
  absorb: bool = True

  @nn.compact
  def __call__(self, x: Float[Array, "batch t hidden"], positions: Int[Array, "batch t"],
               mask: Array, c_cache: Array, kpe_cache: Array, index: Array,
               token_mask: Array) -> tuple[Array, tuple[Array, Array]]:
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    normed = RMSNorm(cfg.rms_norm_eps, dtype, name="input_layernorm")(x)
    attn = MultiHeadLatentAttention(cfg, name="self_attn")
    if self.prefill:
      cos_sin = rotary_cos_sin(positions, cfg)
      q_nope, q_pe = attn.project_queries(normed, *cos_sin)
      c_new, kpe_new = attn.project_latent_keys(normed, *cos_sin)
      attn_out = attn.attend(q_nope, q_pe, c_new, kpe_new, mask, causal_self=True)
    else:
      attn_out, c_new, kpe_new = attn.attend_with_cache(normed, positions, mask, c_cache,
                                                        kpe_cache, index, absorb=self.absorb)
    out, _ = CoELayer(cfg.coe, name="mlp")(x + attn_out, train=False, token_mask=token_mask)
    return out.astype(dtype), (c_new.astype(c_cache.dtype), kpe_new.astype(kpe_cache.dtype))


class CachedCoECausalLM(nn.Module):
  """`CoECausalLM` for generation: same params, plus a `DecodeCache` in and out.

  `apply(variables, input_ids [b, t], positions [b, t], token_mask [b, t], cache,
  logits_index=None) -> (logits <float32>[b, t, vocab], cache')`: the t tokens
  are written at cache slots [cache.index, cache.index + t). With
  `logits_index` <int>[b], logits are computed only at that position of each
  row (shape [b, 1, vocab]; a prompt's last real token). `prefill=True` is for the first
  call on an empty cache (the prompt: tokens attend causally to each other, as
  in the full forward); otherwise tokens attend to every earlier real slot
  (`absorb=True` uses the DeepSeek-V2 absorbed-projection attention). Always
  eval mode; pass a config whose dispatch never drops (see
  `coe_jax.generate.decode_config`) for logits equal to the full forward's.
  """

  config: ModelConfig
  prefill: bool = False
  absorb: bool = True

  @nn.compact
  def __call__(self, input_ids: Int[Array, "batch t"], positions: Int[Array, "batch t"],
               token_mask: Int[Array, "batch t"], cache: DecodeCache,
               logits_index: Optional[Int[Array, "batch"]] = None
               ) -> tuple[Float[Array, "batch t vocab"], DecodeCache]:
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    t = input_ids.shape[1]
    real = token_mask.astype(bool)
    key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, real, cache.index, axis=1)
    if self.prefill:
      mask = make_attention_mask(token_mask, None, t)
    else:
      query_slots = cache.index + jnp.arange(t)
      causal = jnp.arange(cache.max_len)[None, :] <= query_slots[:, None]  # Shape: [t, max_len]
      mask = key_mask[:, None, None, :] & causal[None, None]

    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=normal_init(cfg.initializer_range),
                 param_dtype=jnp.float32, dtype=dtype, name="embed_tokens")(input_ids)
    layers = nn.scan(CachedDecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast, nn.broadcast),
                     length=cfg.num_layers)(cfg, prefill=self.prefill, absorb=self.absorb,
                                            name="layers")
    x, (c_new, kpe_new) = layers(x, positions, mask, cache.c_latent, cache.k_pe, cache.index,
                                 token_mask)
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)  # Shape: [b, 1, hidden]
    x = RMSNorm(cfg.rms_norm_eps, dtype, name="norm")(x)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=normal_init(cfg.initializer_range),
                      dtype=dtype, param_dtype=jnp.float32, name="lm_head")(x)
    start = (0, 0, cache.index, 0)
    new_cache = DecodeCache(
        c_latent=jax.lax.dynamic_update_slice(cache.c_latent, c_new, start),
        k_pe=jax.lax.dynamic_update_slice(cache.k_pe, kpe_new, start),
        key_mask=key_mask, index=cache.index + t)
    return logits.astype(jnp.float32), new_cache
