"""Batched autoregressive generation with a multi-head-latent-attention (MLA) cache.

    prompt [b, P] --prefill (one full forward, fills the cache)--> first token
    repeat until every row stopped or max_new_tokens: one token per row per step

What is cached. DeepSeek-V2's MLA needs, per token and layer, only the normed
latent `c` (kv_lora_rank numbers) and the rotated shared rope key `k_pe`
(qk_rope_head_dim numbers): keys and values are up-projections of `c`, and at
decode time that up-projection is absorbed into the query and the output
(`MultiHeadLatentAttention.attend_absorbed`). Caching full keys and values
would take num_heads * (qk_nope + qk_rope + v_head_dim) numbers instead; see
`cache_bytes_per_token` (paper config, bf16: 4,608 vs 20,480 bytes per token).

Routing at decode time. Generation runs the model with `decode_config(config)`:
the same dispatch code with `dispatch='dropless'` (on CPU: the capacity gather
with capacity = number of tokens; on GPU/TPU: grouped `ragged_dot`), so no
token's chosen expert is ever dropped, whatever the batch (a decode step has
`batch` tokens). Padding rows and finished rows take no expert capacity.
Without drops every row's result is independent of the other rows, so a
prompt's completion does not depend on how prompts were batched.

Compilation. `generate` is one jitted program per (config, batch, prompt
length, max_new_tokens, stop set): a prefill and a `jax.lax.while_loop` with
fixed shapes that exits once every row has stopped. `complete` pads prompts
(left by default; right padding works too: positions come from the attention
mask and the first token is read at each row's last real token) up to a
multiple of `bucket` tokens and the batch to `batch_size` rows, so one compile
serves every prompt of a bucket.

Stopping. A row stops at `eos_id`, at a token whose text contains a stop
string, or when its last generated tokens equal a stop string's encoding (all
checked on device, so the loop ends early). `complete` then cuts the text at
the first stop string, which also catches a stop string that the model spelled
with other tokens (that case does not end the loop early).

Sampling. temperature 0 is greedy; otherwise softmax(logits / T) restricted to
the smallest set of tokens whose probability reaches `top_p` (nucleus). Row r
at step i draws with `fold_in(fold_in(key(seed), row_id[r]), i)`, so a prompt's
sample depends on its id and the seed only.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from coe_jax.nn.layers import compute_dtype
from coe_jax.nn.model import CoECausalLM, init_decode_cache
from coe_jax.nn.model_config import ModelConfig

DEFAULT_BUCKET = 32


def decode_config(config: ModelConfig) -> ModelConfig:
  """`config` with routing that never drops an assignment: `dispatch='dropless'`.

  Prefill and decode steps use it (a decode step routes `batch` tokens).
  """
  return config.replace(dispatch="dropless")


def cache_bytes_per_token(config: ModelConfig) -> dict[str, float]:
  """Cache bytes per token (all layers, compute dtype): MLA latent vs full keys/values.

  mla: layers * (kv_lora_rank + qk_rope_head_dim) * itemsize.
  full_kv: layers * heads * (qk_nope + qk_rope + v_head_dim) * itemsize (what a
  plain multi-head attention cache of the same attention would hold).
  """
  itemsize = compute_dtype(config.dtype).itemsize
  mla = config.num_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * itemsize
  full = (
    config.num_layers
    * config.num_heads
    * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    * itemsize
  )
  return {"mla": mla, "full_kv": full, "ratio": full / mla}


def prompt_positions(attention_mask: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
  """Rotary positions of padded prompts: real token j of a row gets j (pads get 0).

  Left- or right-padded rows both get positions 0..n-1 on their n real tokens,
  as their unpadded training rows did.
  """
  mask = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


# ----------------------------------------------------------------------------
# Sampling and stop checks (pure, per step).
# ----------------------------------------------------------------------------


def _nucleus(
  logits: Float[Array, "batch vocab"], keys: Array, temperature: Array, top_p: Array
) -> Int[Array, "batch"]:
  scaled = logits / jnp.maximum(temperature, 1e-6)
  sorted_logits = -jnp.sort(-scaled, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
  keep = before < top_p  # always keeps the best token
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)


def sample_token(
  logits: Float[Array, "batch vocab"],
  keys: Array,
  temperature: Float[Array, ""],
  top_p: Float[Array, ""],
) -> Int[Array, "batch"]:
  """Greedy argmax when temperature <= 0, else a nucleus sample; int32 [batch].

  Args:
    logits: float32 next-token logits.
    keys: [batch] PRNG keys, one per row.
    temperature / top_p: scalars (traced: changing them does not recompile).
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(
    temperature > 0, lambda: _nucleus(logits, keys, temperature, top_p), lambda: greedy
  )


def stop_sequence_table(stop_sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Right-aligned token table [J, S] (-1 padded) and its validity mask, for `stop_hit`."""
  width = max([len(s) for s in stop_sequences] + [1])
  table = np.full((len(stop_sequences), width), -1, np.int32)
  valid = np.zeros((len(stop_sequences), width), bool)
  for j, seq in enumerate(stop_sequences):
    if len(seq):
      table[j, width - len(seq) :] = seq
      valid[j, width - len(seq) :] = True
  return table, valid


def stop_hit(
  tail: Int[Array, "batch width"], table: Int[Array, "j width"], valid: Bool[Array, "j width"]
) -> Bool[Array, "batch"]:
  """True where a row's last generated tokens (`tail`, right-aligned) end with a stop sequence."""
  same = (tail[:, None, :] == table[None]) | ~valid[None]
  return jnp.any(jnp.all(same, axis=-1) & valid.any(axis=-1)[None], axis=-1)


# ----------------------------------------------------------------------------
# The jitted program.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class GenerationOutput:
  """Generated tokens of a batch.

  Attributes:
    tokens: <int32>[batch, max_new_tokens] generated ids, pad_id after a row stopped.
    num_tokens: <int32>[batch] tokens generated per row (the stop/eos token included).
    finished: <bool>[batch] True if the row stopped at eos or a stop sequence.
    logits: <float32>[batch, max_new_tokens, vocab] the logits each token was drawn
      from (only with return_logits=True, else None).
  """

  tokens: Array
  num_tokens: Array
  finished: Array
  logits: Optional[Array] = None


@functools.lru_cache(maxsize=32)
def make_generate_fn(
  config: ModelConfig,
  max_new_tokens: int,
  stop_sequences: tuple[tuple[int, ...], ...] = (),
  stop_token_ids: tuple[int, ...] = (),
  absorb: bool = True,
  return_logits: bool = False,
  compiler_options: tuple[tuple[str, Any], ...] = (),
):
  """The jitted `fn(params, input_ids, attention_mask, row_keys, temperature, top_p, eos_id,
  pad_id)` (the last four are scalars: changing them does not recompile; eos_id < 0 = none).

  `config` is used as given (callers pass `decode_config(...)`). Cached, so
  repeated calls with the same settings reuse one compile per input shape.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  table, valid = stop_sequence_table(stop_sequences)
  use_table = bool(stop_sequences)
  stop_ids = np.asarray(stop_token_ids, np.int32)

  def record(state, i, tok, logits, eos_id, pad_id):
    done = state["done"]
    tok = jnp.where(done, pad_id, tok)
    hit = (tok == eos_id) & (eos_id >= 0)
    if stop_ids.size:
      hit |= jnp.isin(tok, stop_ids)
    tail = jnp.concatenate([state["tail"][:, 1:], tok[:, None]], axis=1)
    if use_table:
      hit |= stop_hit(tail, jnp.asarray(table), jnp.asarray(valid))
    new = dict(
      state,
      tokens=state["tokens"].at[:, i].set(tok),
      tail=tail,
      last=tok,
      num_tokens=state["num_tokens"] + (~done).astype(jnp.int32),
      finished=state["finished"] | (hit & ~done),
      done=done | hit,
      step=jnp.asarray(i, jnp.int32) + 1,
    )
    if return_logits:
      new["logits"] = state["logits"].at[:, i].set(logits)
    return new

  def fn(params, input_ids, attention_mask, row_keys, temperature, top_p, eos_id, pad_id):
    variables = {"params": params}
    mask = attention_mask.astype(jnp.int32)
    first, cache = _prefill(config, variables, input_ids, mask, max_new_tokens)

    def keys_at(i):
      return jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys)

    batch = input_ids.shape[0]
    state = dict(
      cache=cache,
      pos=mask.sum(axis=1),
      done=mask.sum(axis=1) == 0,
      finished=jnp.zeros((batch,), bool),
      num_tokens=jnp.zeros((batch,), jnp.int32),
      tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
      tail=jnp.full((batch, table.shape[1]), -1, jnp.int32),
      last=jnp.zeros((batch,), jnp.int32),
      step=jnp.zeros((), jnp.int32),
    )
    if return_logits:
      state["logits"] = jnp.zeros((batch, max_new_tokens, first.shape[-1]), jnp.float32)
    state = record(
      state, 0, sample_token(first, keys_at(0), temperature, top_p), first, eos_id, pad_id
    )

    def cond(state):
      return (state["step"] < max_new_tokens) & ~jnp.all(state["done"])

    def body(state):
      logits, cache = _decode_step(config, variables, state, absorb)
      i = state["step"]
      tok = sample_token(logits, keys_at(i), temperature, top_p)
      state = dict(state, cache=cache, pos=state["pos"] + 1)
      return record(state, i, tok, logits, eos_id, pad_id)

    state = jax.lax.while_loop(cond, body, state)
    return GenerationOutput(
      tokens=state["tokens"],
      num_tokens=state["num_tokens"],
      finished=state["finished"],
      logits=state.get("logits"),
    )

  return jax.jit(fn, compiler_options=dict(compiler_options) or None)


def _prefill(config: ModelConfig, variables, input_ids, mask, max_new_tokens: int):
  """One forward over the prompts that fills a fresh cache of prompt + max_new_tokens slots.

  Returns the logits [b, vocab] at each row's last real token, and the cache.
  """
  batch, prompt_len = input_ids.shape
  cache = init_decode_cache(config, batch, prompt_len + max_new_tokens)
  last_real = jnp.max(jnp.where(mask > 0, jnp.arange(prompt_len), 0), axis=1)
  logits, aux = CoECausalLM(config, decode="prefill").apply(
    variables, input_ids, mask, prompt_positions(mask), cache=cache, logits_index=last_real
  )
  return logits[:, 0], aux.cache


def _decode_step(config: ModelConfig, variables, state, absorb: bool):
  """Feeds every row's last token at its next position; finished rows count as padding."""
  live = (~state["done"]).astype(jnp.int32)[:, None]
  logits, aux = CoECausalLM(config, decode="step", absorb=absorb).apply(
    variables, state["last"][:, None], live, state["pos"][:, None], cache=state["cache"]
  )
  return logits[:, 0], aux.cache


def row_keys_for(seed: int, row_ids: Sequence[int]) -> Array:
  """[batch] PRNG keys: `fold_in(key(seed), row_id)` (a prompt's key follows its id)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(row_ids, jnp.uint32))


def generate(
  params: Any,
  config: ModelConfig,
  input_ids: Int[Array, "batch prompt"],
  attention_mask: Optional[Int[Array, "batch prompt"]] = None,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_p: float = 1.0,
  eos_id: Optional[int] = None,
  pad_id: int = 0,
  stop_sequences: Sequence[Sequence[int]] = (),
  stop_token_ids: Sequence[int] = (),
  seed: int = 0,
  row_ids: Optional[Sequence[int]] = None,
  absorb: bool = True,
  return_logits: bool = False,
  compiler_options: Optional[dict[str, Any]] = None,
) -> GenerationOutput:
  """Generates up to `max_new_tokens` per row after padded prompts (token level).

  Args:
    params: the LM's params (`CoECausalLM(config)` layout).
    config: the model config; generation uses `decode_config(config)`.
    input_ids / attention_mask: int [batch, prompt] prompts, left- or right-padded
      (mask 1 on real tokens; None = no padding). An all-pad row generates nothing.
    max_new_tokens: length of the output buffer and the loop bound.
    temperature / top_p: 0 = greedy; see `sample_token`.
    eos_id / stop_sequences / stop_token_ids: a row stops after generating eos,
      any token of stop_token_ids, or a token sequence of stop_sequences.
    seed / row_ids: sampling keys (row_ids default to 0..batch-1).
    absorb: decode steps use the absorbed MLA attention (False: up-project the cache).
    return_logits: also return the logits of every step (tests, scoring).
    compiler_options: XLA options for the compile (e.g. faster CPU compiles in tests).
  Returns:
    `GenerationOutput`.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = (
    jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  )
  fn = make_generate_fn(
    decode_config(config),
    int(max_new_tokens),
    tuple(tuple(int(t) for t in s) for s in stop_sequences if len(s)),
    tuple(sorted({int(t) for t in stop_token_ids})),
    absorb,
    return_logits,
    tuple(sorted((compiler_options or {}).items())),
  )
  ids = range(input_ids.shape[0]) if row_ids is None else row_ids
  return fn(
    params,
    input_ids,
    mask,
    row_keys_for(seed, ids),
    jnp.float32(temperature),
    jnp.float32(top_p),
    jnp.int32(-1 if eos_id is None else eos_id),
    jnp.int32(pad_id),
  )
