"""A training run's directory read back: its config, model, params and tokenizer.

`coe_jax.training.train.train_and_evaluate` writes `config.json` (the full training
config), `summary.json`, `tokenizer.json` (the exact tokenizer it trained with)
and Orbax checkpoints under `checkpoints/`. `load_run` turns such a directory
back into a `Run`; generation, evaluation, export, routing analysis and the
notebook all open runs through it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import tokenizers

from coe_jax import config_lib
from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.nn.model import CoECausalLM
from coe_jax.nn.model_config import ModelConfig
from coe_jax.training.checkpoint import apply_saved_semantics, load_run_config, restore_params


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A trained model with everything needed to use it.

  Attributes:
    workdir: the run directory (absolute).
    config: the run's full training config (`config.model`, `config.data`, ...).
    model_config: the `ModelConfig` it trained (vocabulary size resolved).
    params: the restored params tree.
    step: the checkpoint's step.
    tokenizer: the run's tokenizer, or None (not asked for, or the run has none).
  """

  workdir: str
  config: ml_collections.ConfigDict
  model_config: ModelConfig
  params: Any
  step: int
  tokenizer: Optional[tokenizers.Tokenizer]

  @property
  def model(self) -> CoECausalLM:
    return CoECausalLM(self.model_config)

  @property
  def variables(self) -> dict:
    """`{'params': params}`, for `model.apply`."""
    return {"params": self.params}


def load_tokenizer(
  workdir: str, config: Optional[ml_collections.ConfigDict] = None
) -> Optional[tokenizers.Tokenizer]:
  """`workdir/tokenizer.json` (what a run saves), else `config.data.tokenizer` when that is a
  file or a hub name (not 'bpe', which was trained and saved with the run), else None."""
  path = os.path.join(workdir, "tokenizer.json")
  if os.path.exists(path):
    return tokenizer_lib.load_file(path)
  spec = config.data.get("tokenizer", "bpe") if config is not None and "data" in config else "bpe"
  return None if spec == "bpe" else tokenizer_lib.load_tokenizer(spec)


def vocab_size(workdir: str, config: ml_collections.ConfigDict) -> int:
  """The run's vocabulary: `config.model.vocab_size`, else summary.json's, else its tokenizer's."""
  if config.model.get("vocab_size", 0):
    return int(config.model.vocab_size)
  summary = os.path.join(workdir, "summary.json")
  if os.path.exists(summary):
    with open(summary) as f:
      value = json.load(f).get("vocab_size")
    if value:
      return int(value)
  tokenizer = load_tokenizer(workdir, config)
  if tokenizer is None:
    raise FileNotFoundError(
      f"{workdir}: model.vocab_size is 0 (the tokenizer's size) and neither "
      "summary.json nor tokenizer.json says the vocabulary size"
    )
  return tokenizer.get_vocab_size(with_added_tokens=True)


def abstract_params(model: CoECausalLM) -> Any:
  """Shapes and dtypes of the model's params (nothing allocated or compiled), unboxed."""
  dummy = jnp.zeros((1, 8), jnp.int32)
  return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)))["params"]


def load_run(workdir: str, step: Optional[int] = None, *, with_tokenizer: bool = True) -> Run:
  """The run in `workdir` at its latest checkpoint (or `step`), with its tokenizer if asked."""
  saved = load_run_config(workdir)
  if saved is None:
    raise FileNotFoundError(f"{workdir!r} holds no config.json; is it a coe_jax run directory?")
  config = ml_collections.ConfigDict(saved)
  apply_saved_semantics(config, saved)  # fields absent: saved before them, their values then
  model_config = config_lib.model_config_from(config, vocab_size(workdir, config))
  params, restored = restore_params(workdir, abstract_params(CoECausalLM(model_config)), step)
  tokenizer = load_tokenizer(workdir, config) if with_tokenizer else None
  return Run(os.path.abspath(workdir), config, model_config, params, int(restored), tokenizer)
