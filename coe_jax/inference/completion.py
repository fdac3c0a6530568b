"""Text in, text out: `complete` prompts with a trained model (`decoding.generate` underneath).

Prompts are tokenised without special tokens, left-padded (by default) to a
multiple of `bucket` tokens and batched to `batch_size` rows, so one compile
serves every prompt of a bucket; the text is cut at the first stop string.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.inference.decoding import DEFAULT_BUCKET, generate
from coe_jax.nn.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Completion:
  """One prompt's result: `text` (cut at the first stop string), its token ids, whether it stopped."""

  text: str
  token_ids: list[int]
  finished: bool


def _stop_token_ids(tokenizer, stop_strings: Sequence[str]) -> tuple[int, ...]:
  """Ids of vocabulary tokens whose text contains a stop string."""
  if not stop_strings:
    return ()
  vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
  found = []
  for token_id in range(vocab_size):
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if any(s in text for s in stop_strings):
      found.append(token_id)
  return tuple(found)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
  """`text` up to (not including) the earliest occurrence of any stop string."""
  cut = len(text)
  for s in stop_strings:
    where = text.find(s)
    if s and where >= 0:
      cut = min(cut, where)
  return text[:cut]


def _pad_batch(
  encoded: list[list[int]], rows: int, length: int, pad_id: int, padding_side: str
) -> tuple[np.ndarray, np.ndarray]:
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for r, seq in enumerate(encoded):
    if padding_side == "left":
      ids[r, length - len(seq) :], mask[r, length - len(seq) :] = seq, 1
    else:
      ids[r, : len(seq)], mask[r, : len(seq)] = seq, 1
  return ids, mask


def complete(
  params: Any,
  config: ModelConfig,
  tokenizer,
  prompts: Sequence[str],
  *,
  max_new_tokens: int = 256,
  batch_size: int = 8,
  bucket: int = DEFAULT_BUCKET,
  max_prompt_length: Optional[int] = None,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  stop_strings: Sequence[str] = (),
  eos_id: Optional[int] = None,
  padding_side: str = "left",
  progress: bool = False,
) -> list[Completion]:
  """Completions of text prompts (tokenised without special tokens), in prompt order.

  Prompts are sorted by length, cut from the left to `max_prompt_length`,
  padded to a multiple of `bucket` and batched `batch_size` at a time (the
  last batch topped up with empty rows), so each bucket compiles once. Prompt
  i samples with row id i (results do not depend on the batching).
  """
  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side: got {padding_side!r}; allowed values: left, right")
  pad_id = tokenizer_lib.pad_id(tokenizer)
  eos_id = tokenizer_lib.eos_id(tokenizer) if eos_id is None else eos_id
  stop_strings = tuple(s for s in stop_strings if s)
  stop_sequences = [tokenizer.encode(s, add_special_tokens=False).ids for s in stop_strings]
  stop_ids = _stop_token_ids(tokenizer, stop_strings)
  encoded = [e.ids for e in tokenizer.encode_batch(list(prompts), add_special_tokens=False)]
  if max_prompt_length:
    encoded = [ids[-max_prompt_length:] for ids in encoded]
  encoded = [ids if ids else [pad_id] for ids in encoded]
  order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
  results: list[Optional[Completion]] = [None] * len(encoded)
  starts = range(0, len(order), batch_size)
  if progress:
    starts = tqdm(starts, desc="generate", unit="batch", dynamic_ncols=True)
  for start in starts:
    chunk = order[start : start + batch_size]
    length = -(-max(len(encoded[i]) for i in chunk) // bucket) * bucket
    ids, mask = _pad_batch([encoded[i] for i in chunk], batch_size, length, pad_id, padding_side)
    row_ids = list(chunk) + [len(encoded) + r for r in range(batch_size - len(chunk))]
    out = generate(
      params,
      config,
      ids,
      mask,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      eos_id=eos_id,
      pad_id=pad_id,
      stop_sequences=stop_sequences,
      stop_token_ids=stop_ids,
      seed=seed,
      row_ids=row_ids,
    )
    tokens, counts, finished = jax.device_get((out.tokens, out.num_tokens, out.finished))
    for r, i in enumerate(chunk):
      token_ids = [int(t) for t in tokens[r, : counts[r]]]
      text = tokenizer.decode(token_ids, skip_special_tokens=True)
      results[i] = Completion(cut_at_stop(text, stop_strings), token_ids, bool(finished[r]))
  return results  # type: ignore[return-value]
