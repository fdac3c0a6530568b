"""A DeepSeek-V2-style causal LM whose feed-forward blocks are CoE layers (DESIGN.md 5).

    x = embed(input_ids)
    repeat num_layers:  h = x + MLA(RMSNorm(x));  x = CoELayer(h)
    logits = lm_head(RMSNorm(x))          # untied head, float32 logits

The decoder layers are one module per layer (`layers_0`, `layers_1`, ...; the
default, `scan_layers=False`), or with `scan_layers=True` one `nn.scan` with
params stacked on a leading [layers] axis (the layout of runs saved before
that field existed). Either way routing statistics come out with a [layers]
axis. The training scan is unrolled (11-13% faster than the rolled one on CPU,
experiments/PERF.md 5), but XLA still copies each layer's params out of the
stacked arrays every step, which per-layer params avoid (PERF.md 17).
`stack_layers` / `unstack_layers` convert params between the two layouts.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from coe_jax.nn.attention import MultiHeadLatentAttention, make_attention_mask, rotary_cos_sin
from coe_jax.nn.coe_layer import CoEAux, CoELayer
from coe_jax.nn.expert_parallel import ExpertParallel
from coe_jax.nn.head_matmul import head_dot_general
from coe_jax.nn.layers import RMSNorm, compute_dtype, normal_init
from coe_jax.nn.logical_axes import BATCH, EMBED, LAYERS, LENGTH, VOCAB, constrain, param_init
from coe_jax.nn.model_config import ModelConfig
from coe_jax.nn.router import route


@flax.struct.dataclass
class ModelAux:
  """What the LM returns besides logits.

  Attributes:
    aux_loss: <float32>[] load-balancing loss summed over layers and iterations.
    z_loss: <float32>[] router z-loss summed over layers and iterations.
    layers: `CoEAux` whose arrays have a leading [layers] axis.
    cache: the updated `DecodeCache` when the LM decodes with one, else None.
  """

  aux_loss: Array
  z_loss: Array
  layers: CoEAux
  cache: Optional["DecodeCache"] = None

  @property
  def dropped_fraction(self) -> Array:
    """Share of dropped assignments over all layers and iterations."""
    return self.layers.dropped_fraction.mean()


DECODE_MODES = (None, "prefill", "step")


class DecoderLayer(nn.Module):
  """Attention then CoE, scan-compatible; optionally reading and writing an MLA latent cache.

  Call: `(x, positions, mask, token_mask=None, layer_cache=None, index=None) ->
  (x_out, (CoEAux, new_cache_entries))`. `token_mask` (the LM's attention_mask)
  keeps padding out of expert capacity. Without `decode` the layer sees whole
  sequences and `new_cache_entries` is None. With `decode='prefill'` the t
  tokens attend causally to each other (an empty cache), exactly as without
  `decode`; with `decode='step'` they attend to the cache. Then `layer_cache` is
  this layer's (c_latent, k_pe) [batch, max_len, ...], `index` the next slot,
  and `new_cache_entries` the t new (c_latent, k_pe) entries.
  """

  config: ModelConfig
  train: bool = False
  expert_parallel: Optional[ExpertParallel] = None
  decode: Optional[str] = None  # None | 'prefill' | 'step'
  absorb: bool = True  # decode='step': DeepSeek-V2's absorbed-projection attention
  router_fn: Callable[..., Any] = route  # every CoE layer's router (`CoELayer.router_fn`)

  @nn.compact
  def __call__(
    self,
    x: Float[Array, "batch seq hidden"],
    positions: Int[Array, "batch seq"],
    mask: Array,
    token_mask: Optional[Array] = None,
    layer_cache: Optional[tuple[Array, Array]] = None,
    index: Optional[Array] = None,
  ) -> tuple[Array, tuple[CoEAux, Optional[tuple[Array, Array]]]]:
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    normed = RMSNorm(cfg.rms_norm_eps, dtype, name="input_layernorm")(x)
    attn = MultiHeadLatentAttention(cfg, name="self_attn")
    new_entries = None
    if self.decode is None:
      attn_out = attn(normed, positions, mask)
    elif self.decode == "prefill":
      cos_sin = rotary_cos_sin(positions, cfg)
      q_nope, q_pe = attn.project_queries(normed, *cos_sin)
      c_new, kpe_new = attn.project_latent_keys(normed, *cos_sin)
      attn_out = attn.attend(q_nope, q_pe, c_new, kpe_new, mask, causal_self=True)
      new_entries = (c_new, kpe_new)
    else:
      c_cache, kpe_cache = layer_cache
      attn_out, c_new, kpe_new = attn.attend_with_cache(
        normed, positions, mask, c_cache, kpe_cache, index, absorb=self.absorb
      )
      new_entries = (c_new, kpe_new)
    if new_entries is not None:
      c_cache, kpe_cache = layer_cache
      new_entries = (new_entries[0].astype(c_cache.dtype), new_entries[1].astype(kpe_cache.dtype))
    reference_pads = cfg.pad_semantics == "reference"
    if reference_pads and token_mask is not None:
      # flash-attention's unpad/pad: a pad's attention output is zero.
      attn_out = attn_out * (token_mask > 0)[..., None].astype(attn_out.dtype)
    out, aux = CoELayer(
      cfg.coe, router_fn=self.router_fn, expert_parallel=self.expert_parallel, name="mlp"
    )(x + attn_out, train=self.train, token_mask=token_mask, route_pads=reference_pads)
    return out.astype(dtype), (aux, new_entries)


def _remat_policy(name: str):
  return {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}[name]


class CoECausalLM(nn.Module):
  """Causal LM: `apply(variables, input_ids, ...) -> (logits <float32>[b, s, vocab], ModelAux)`.

  Params: `embed_tokens/embedding` [vocab, hidden]; `layers_0/...` ..
  `layers_{L-1}/...` (with `scan_layers`: `layers/...` stacked on a leading
  [num_layers] axis, logical name `layers`); `norm/scale`; `lm_head/kernel`
  [hidden, vocab]. `init` returns them boxed with their logical axes
  (`coe_jax.nn.logical_axes`); `nn.meta.unbox` gives the plain arrays.
  `expert_parallel` (optional) runs every CoE layer's routed pass per device
  (`coe_jax.nn.expert_parallel`); the train loop passes `Parallelism.expert_parallel()`.

  Decoding (`coe_jax.inference.decoding`) uses the same module and params with a
  `DecodeCache`: `decode='prefill'` for the first call on an empty cache (the
  prompt's tokens attend causally to each other, as without a cache),
  `decode='step'` afterwards (tokens attend to every earlier real slot;
  `absorb=True` uses DeepSeek-V2's absorbed-projection attention). Then
  `attention_mask` marks real tokens, `positions` is required, the t tokens are
  written at slots [cache.index, cache.index + t) and `ModelAux.cache` is the
  updated cache. `logits_index` <int>[b] computes logits only at that position
  of each row ([b, 1, vocab]; a prompt's last real token). Pass a config whose
  dispatch never drops (`decoding.decode_config`) for logits equal to the full
  forward's.
  """

  config: ModelConfig
  expert_parallel: Optional[ExpertParallel] = None
  decode: Optional[str] = None  # None | 'prefill' | 'step'
  absorb: bool = True
  router_fn: Callable[..., Any] = route  # every CoE layer's router (`CoELayer.router_fn`)

  @nn.compact
  def __call__(
    self,
    input_ids: Int[Array, "batch seq"],
    attention_mask: Optional[Int[Array, "batch seq"]] = None,
    positions: Optional[Int[Array, "batch seq"]] = None,
    segment_ids: Optional[Int[Array, "batch seq"]] = None,
    *,
    train: bool = False,
    cache: Optional["DecodeCache"] = None,
    logits_index: Optional[Int[Array, "batch"]] = None,
    features_only: bool = False,
  ) -> tuple[Float[Array, "batch seq vocab"], ModelAux]:
    """Logits [b, s, vocab] (float32) and the routers' aux; with `features_only` the final
    normalized hidden states [b, s, hidden] instead (the head not applied: the train step
    applies `lm_head/kernel` inside its loss, `training.head_loss`)."""
    cfg = self.config
    if self.decode not in DECODE_MODES:
      raise ValueError(f"decode: got {self.decode!r}; allowed values: None, 'prefill', 'step'")
    if (self.decode is None) != (cache is None):
      raise ValueError("pass a DecodeCache exactly when decode is 'prefill' or 'step'")
    if features_only and cache is not None:
      raise ValueError("features_only is for training (no DecodeCache): decoding needs logits")
    dtype = compute_dtype(cfg.dtype)
    batch, seq = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    key_mask = None
    if self.decode == "step":
      real = attention_mask.astype(bool)
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, real, cache.index, axis=1)
      query_slots = cache.index + jnp.arange(seq)
      causal = jnp.arange(cache.max_len)[None, :] <= query_slots[:, None]  # Shape: [t, max_len]
      mask = key_mask[:, None, None, :] & causal[None, None]
    else:
      mask = make_attention_mask(attention_mask, segment_ids, seq)

    x = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      embedding_init=param_init(normal_init(cfg.initializer_range), (VOCAB, EMBED)),
      param_dtype=jnp.float32,
      dtype=dtype,
      name="embed_tokens",
    )(input_ids)
    x = constrain(x, (BATCH, LENGTH, EMBED))
    x, layer_aux, new_entries = self._layers(train)(
      x,
      positions,
      mask,
      attention_mask,
      None if cache is None else (cache.c_latent, cache.k_pe),
      None if cache is None else cache.index,
    )
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)  # Shape: [b, 1, hidden]
    x = RMSNorm(cfg.rms_norm_eps, dtype, name="norm")(x)
    if features_only:
      return x, self._aux(layer_aux, None)
    logits = nn.Dense(
      cfg.vocab_size,
      use_bias=False,
      kernel_init=param_init(normal_init(cfg.initializer_range), (EMBED, VOCAB)),
      dtype=dtype,
      param_dtype=jnp.float32,
      dot_general=head_dot_general,  # a weight gradient XLA:CPU need not transpose for
      name="lm_head",
    )(x)
    logits = constrain(logits, (BATCH, LENGTH, VOCAB))
    new_cache = None
    if cache is not None:
      if key_mask is None:  # prefill
        real = attention_mask.astype(bool)
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, real, cache.index, axis=1)
      start = (0, 0, cache.index, 0)
      new_cache = DecodeCache(
        c_latent=jax.lax.dynamic_update_slice(cache.c_latent, new_entries[0], start),
        k_pe=jax.lax.dynamic_update_slice(cache.k_pe, new_entries[1], start),
        key_mask=key_mask,
        index=cache.index + seq,
      )
    return logits.astype(jnp.float32), self._aux(layer_aux, new_cache)

  @staticmethod
  def _aux(layer_aux, cache: Optional["DecodeCache"]) -> ModelAux:
    return ModelAux(
      aux_loss=layer_aux.aux_loss.sum(),
      z_loss=layer_aux.z_loss.sum(),
      layers=layer_aux,
      cache=cache,
    )

  def _layers(self, train: bool):
    """The decoder layers; returns a function `(x, positions, mask, token_mask, layer_caches,
    index) -> (x, CoEAux, new cache entries)` whose aux and entries have a leading [layers]
    axis (the caches too)."""
    cfg = self.config
    layer_cls = DecoderLayer
    if cfg.remat != "none" and self.decode is None:
      layer_cls = nn.remat(
        DecoderLayer, prevent_cse=not cfg.scan_layers, policy=_remat_policy(cfg.remat)
      )
    if not cfg.scan_layers:
      return self._layer_loop(layer_cls, train)
    cache_axis = nn.broadcast if self.decode is None else 0
    scan = nn.scan(
      layer_cls,
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True},
      metadata_params={nn.PARTITION_NAME: LAYERS},  # stacked params' leading logical axis
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, cache_axis, nn.broadcast),
      length=cfg.num_layers,
      unroll=cfg.num_layers if self.decode is None else 1,
    )
    layers = scan(
      cfg,
      train=train,
      expert_parallel=self.expert_parallel,
      decode=self.decode,
      absorb=self.absorb,
      router_fn=self.router_fn,
      name="layers",
    )

    def run(x, positions, mask, token_mask, layer_caches, index):
      x, (layer_aux, new_entries) = layers(x, positions, mask, token_mask, layer_caches, index)
      return x, layer_aux, new_entries

    return run

  def _layer_loop(self, layer_cls, train: bool):
    """`_layers` as one module per layer, `layers_{i}`: each layer's params read in place."""
    cfg = self.config
    layers = [
      layer_cls(
        cfg,
        train=train,
        expert_parallel=self.expert_parallel,
        decode=self.decode,
        absorb=self.absorb,
        router_fn=self.router_fn,
        name=f"{LAYER_PREFIX}{i}",
      )
      for i in range(cfg.num_layers)
    ]

    def run(x, positions, mask, token_mask, layer_caches, index):
      auxes, entries = [], []
      for i, layer in enumerate(layers):
        cache = None if layer_caches is None else tuple(c[i] for c in layer_caches)
        x, (aux, new_entries) = layer(x, positions, mask, token_mask, cache, index)
        auxes.append(aux)
        entries.append(new_entries)
      return x, _stack(auxes), None if entries[0] is None else _stack(entries)

    return run


LAYER_PREFIX = "layers_"  # per-layer params and sown values: layers_0, layers_1, ...


def _stack(trees: list[Any]) -> Any:
  """Trees of equal structure -> one tree, every leaf stacked on a new leading axis."""
  return jax.tree.map(lambda *leaves: _stack_leaves(leaves), *trees)


def stack_layers(tree: Any) -> Any:
  """A params (or sown 'intermediates') tree with `layers_0` .. `layers_{L-1}` -> the same
  with one `layers` entry, every leaf stacked on a new leading [layers] axis (the
  `scan_layers=True` layout). A tree already in that layout is returned as is."""
  numbers = sorted(int(k[len(LAYER_PREFIX) :]) for k in tree if _is_layer_key(k))
  if not numbers:
    return tree
  if numbers != list(range(len(numbers))):
    raise ValueError(f"per-layer entries {numbers} are not layers 0..{len(numbers) - 1}")
  rest = {k: v for k, v in tree.items() if not _is_layer_key(k)}
  return {**rest, "layers": _stack([tree[f"{LAYER_PREFIX}{i}"] for i in numbers])}


def unstack_layers(tree: Any) -> Any:
  """The inverse of `stack_layers`: `layers` ([layers, ...] leaves) -> `layers_0`, ..."""
  if "layers" not in tree:
    return tree
  rest = {k: v for k, v in tree.items() if k != "layers"}
  num_layers = jax.tree.leaves(tree["layers"])[0].shape[0]
  return {
    **rest,
    **{
      f"{LAYER_PREFIX}{i}": jax.tree.map(lambda leaf, i=i: leaf[i], tree["layers"])
      for i in range(num_layers)
    },
  }


def _is_layer_key(key: Any) -> bool:
  return (
    isinstance(key, str) and key.startswith(LAYER_PREFIX) and key[len(LAYER_PREFIX) :].isdigit()
  )


def _stack_leaves(leaves: tuple) -> Any:
  """Stacks numpy leaves with numpy (host params stay on the host), anything else with jnp."""
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


# ----------------------------------------------------------------------------
# Incremental decoding with an MLA latent cache (used by `coe_jax.inference.decoding`).
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
    index=jnp.zeros((), jnp.int32),
  )
