"""Text batches for routing analysis of a run (`coe_jax.inference.run_dir.load_run` opens the run)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import ml_collections
import numpy as np
import tokenizers

from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.data.input_pipeline import build_datasets
from coe_jax.data.tokenized import Batch, encode
from coe_jax.inference.run_dir import Run


def validation_batch(
  run: Run, batch_size: int, data_overrides: Optional[dict[str, Any]] = None
) -> Batch:
  """The first `batch_size` validation rows of the run's own data (tokenised, cached in workdir).

  `data_overrides` replaces `config.data` fields, e.g. file paths that were
  relative to another working directory.
  """
  data = ml_collections.ConfigDict(run.config.data.to_dict())
  data.update(data_overrides or {})
  reference_padding = run.model_config.pad_semantics == "reference"
  datasets = build_datasets(data, workdir=run.workdir, reference_padding=reference_padding)
  return datasets.val_batches(batch_size)[0]


def encode_texts(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], max_length: int) -> Batch:
  """A batch of raw texts: int32 `input_ids`, `attention_mask`, `positions`, `segment_ids`
  [len(texts), max_length], tokenised without special tokens, right-truncated and padded."""
  tokens, offsets = encode(tokenizer, list(texts), max_length)
  input_ids = np.full((len(texts), max_length), tokenizer_lib.pad_id(tokenizer), np.int32)
  mask = np.zeros((len(texts), max_length), np.int32)
  for row, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
    input_ids[row, : stop - start] = tokens[start:stop]
    mask[row, : stop - start] = 1
  positions = np.tile(np.arange(max_length, dtype=np.int32), (len(texts), 1))
  return {
    "input_ids": input_ids,
    "attention_mask": mask,
    "segment_ids": mask.copy(),
    "positions": positions,
  }
