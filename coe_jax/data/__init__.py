"""Data for coe_jax: the embedded synthetic corpus, tokenizers and the input pipeline.

`build_datasets(config.data, workdir=..., seed=...)` is the entry point; see
`input_pipeline` for the one-way flow (config -> `DataSpec` -> corpus -> tokenizer ->
splits -> batches) and the batch layout, and `DataFields` for the fields.
Heavy optional libraries (`datasets`, `tensorflow_datasets`) load only when a
source needs them.
"""

from coe_jax.data.data_config import DataFields, DataSpec, resolve_data_spec
from coe_jax.data.input_pipeline import (
  Datasets,
  TrainIterator,
  build_datasets,
  default_data_config,
  format_example,
  format_prompt,
  validate_data_config,
)
from coe_jax.data.synthetic import addition_examples, generate_examples
from coe_jax.data.tokenizer import eos_id, load_tokenizer, pad_id, tokenizer_fingerprint

__all__ = [
  "DataFields",
  "DataSpec",
  "Datasets",
  "TrainIterator",
  "addition_examples",
  "build_datasets",
  "default_data_config",
  "eos_id",
  "format_example",
  "format_prompt",
  "generate_examples",
  "load_tokenizer",
  "pad_id",
  "resolve_data_spec",
  "tokenizer_fingerprint",
  "validate_data_config",
]
