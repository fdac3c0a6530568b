"""What each config field is: a FUNCTION or an EXECUTION field, and its name in the authors' files.

`CoEConfig` and `ModelConfig` declare every field with one of the helpers
below, which store it in the field's metadata
(`dataclasses.fields(CoEConfig)[i].metadata`):

- `kind`: `FUNCTION` or `EXECUTION`. The rule: a field is a FUNCTION field when
  changing it changes the parameters (their shapes, their initial
  distribution) or the exact function the model defines and trains: what the
  layers compute from given parameters when nothing is dropped and arithmetic
  is exact (sizes, attention and rope, norms, experts, the chain, the router
  and its losses, the initializer). It is an EXECUTION field when it only
  chooses how that function is evaluated: dispatch strategy and capacity
  (capacity dispatch approximates the dropless function by dropping
  assignments), the dropless kernel, attention blocking, compute dtype and
  rematerialisation. Execution fields may change between runs of the same
  model (a resumed run, an imported checkpoint); function fields may not
  (`checkpoint.check_resumable`).
- `hf` (optional): the authors' config.json key holding the field
  (`rope_scaling.factor` is the `factor` key of the `rope_scaling` dict).
- `hf_value` (optional): for a function field config.json does not carry,
  the only value the authors' code computes (export refuses any other).

Fields with neither `hf` nor `hf_value` are our own knobs: an import keeps
them from the base run config (`model_config.our_knobs()`, `export.import_hf`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

FUNCTION = "function"
EXECUTION = "execution"
FIELD_KINDS = (FUNCTION, EXECUTION)
_UNSET = object()


def function_field(default: Any, hf: Optional[str] = None, hf_value: Any = _UNSET) -> Any:
  """A field that changes the parameters or the model's function (see the module docstring)."""
  metadata: dict[str, Any] = {"kind": FUNCTION}
  if hf is not None:
    metadata["hf"] = hf
  if hf_value is not _UNSET:
    metadata["hf_value"] = hf_value
  return dataclasses.field(default=default, metadata=metadata)


def execution_field(default: Any) -> Any:
  """A field that only chooses how the same function is evaluated (see the module docstring)."""
  return dataclasses.field(default=default, metadata={"kind": EXECUTION})
