"""Loading a trained run for analysis: model, weights and text batches.

A run directory written by `coe_jax.train.train_and_evaluate` holds
`config.json`, `tokenizer.json` and Orbax checkpoints; `load_run` turns it
back into a `CoECausalLM` and its params.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tokenizers

from coe_jax import config_lib
from coe_jax.checkpoint import load_run_config, restore_params
from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.data.tokenized import Batch, encode
from coe_jax.model import CoECausalLM


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A trained model ready for `collect_routing`.

  Attributes:
    model: the `CoECausalLM`.
    variables: `{'params': ...}` restored from the checkpoint.
    config: the run's full training config (`config.model`, `config.data`, ...).
    step: the checkpoint's step.
    workdir: the run directory.
  """

  model: CoECausalLM
  variables: dict
  config: ml_collections.ConfigDict
  step: int
  workdir: str


def _vocab_size(config: ml_collections.ConfigDict, workdir: str) -> Optional[int]:
  """The run's vocabulary: config.model.vocab_size, or its saved tokenizer's when that is 0."""
  if config.model.vocab_size:
    return None
  path = os.path.join(workdir, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir!r}: config.model.vocab_size is 0 (the tokenizer's size) "
                            f"but there is no tokenizer.json to read it from")
  return tokenizers.Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)


def _abstract_params(model: CoECausalLM) -> Any:
  """Shapes and dtypes of the model's params (nothing allocated or compiled)."""
  dummy = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))["params"]


def load_run(workdir: str, step: Optional[int] = None) -> Run:
  """The model and params of the run in `workdir` (latest checkpoint unless `step`)."""
  saved = load_run_config(workdir)
  if saved is None:
    raise FileNotFoundError(f"{workdir!r} holds no config.json; is it a coe_jax run directory?")
  config = ml_collections.ConfigDict(saved)
  model = CoECausalLM(config_lib.model_config_from(config, _vocab_size(config, workdir)))
  params, restored_step = restore_params(workdir, _abstract_params(model), step)
  return Run(model=model, variables={"params": params}, config=config, step=restored_step,
             workdir=workdir)


def validation_batch(run: Run, batch_size: int, data_overrides: Optional[dict[str, Any]] = None
                     ) -> Batch:
  """The first `batch_size` validation rows of the run's own data (tokenised, cached in workdir).

  `data_overrides` replaces `config.data` fields, e.g. file paths that were
  relative to another working directory.
  """
  from coe_jax.data.input_pipeline import build_datasets
  data = ml_collections.ConfigDict(run.config.data.to_dict())
  data.update(data_overrides or {})
  datasets = build_datasets(data, workdir=run.workdir)
  return datasets.val_batches(batch_size)[0]


def encode_texts(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], max_length: int) -> Batch:
  """A batch of raw texts: int32 `input_ids`, `attention_mask`, `positions`, `segment_ids`
  [len(texts), max_length], tokenised without special tokens, right-truncated and padded."""
  tokens, offsets = encode(tokenizer, list(texts), max_length)
  input_ids = np.full((len(texts), max_length), tokenizer_lib.pad_id(tokenizer), np.int32)
  mask = np.zeros((len(texts), max_length), np.int32)
  for row, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
    input_ids[row, :stop - start] = tokens[start:stop]
    mask[row, :stop - start] = 1
  positions = np.tile(np.arange(max_length, dtype=np.int32), (len(texts), 1))
  return {"input_ids": input_ids, "attention_mask": mask, "segment_ids": mask.copy(),
          "positions": positions}
