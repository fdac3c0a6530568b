"""A run in the authors' Hugging Face format, and their checkpoints as a run (`coe_jax.export` CLI).

    python -m coe_jax.export --workdir=RUN --out=DIR [--step=N]
    python -m coe_jax.export --from_hf=DIR --out=RUN [--config=configs/coe_c2.py[:tiny]] \
        [--dispatch=dropless|capacity]

Export writes `DIR/config.json` (the authors' `CoeForCausalLM` field names,
`model_type` 'coe_deepseekv2' and their `auto_map`, `convert.config_to_hf`),
`DIR/model.safetensors` (their state-dict names and
torch [out, in] layouts, float32, `convert.to_hf`) and the run's
`tokenizer.json` (with its declared special tokens), so that the authors'
PyTorch code loads the directory with `CoeForCausalLM.from_pretrained(DIR)`.
`auto_map` names their `configuration_coe.py` and `modeling_coe.py`, which this
repository does not contain: `modeling_code=DIR` (`--modeling_code`) copies them
from a checkout of their repository, and then
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads the
export; without it the folder gets a README saying which two files to add.
No `pad_token_id` is written (their config has none; their model would make it
the embedding's `padding_idx`).

Import reads such a directory (`model.safetensors`, or the shards of
`model.safetensors.index.json`) with `convert.from_hf` and writes a run
directory: `config.json` (the base `--config`, default `configs/base.py`'s,
with the imported architecture and, unless `--dispatch=capacity`, the
authors' dropless routing), a step-0 Orbax checkpoint holding the
weights and a fresh optimiser state of that config, `summary.json` and the
tokenizer. `coe_jax.evaluate` and `coe_jax.generate` use it as is;
`python -m coe_jax.main --config=<the same config> --workdir=RUN` plus the
`--config.model.*` overrides that import prints fine-tunes from the imported
weights (training resumes from the step-0 checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from coe_jax import config_lib
from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.inference.convert import IMPORT_DISPATCH, check_authors_can_compute, from_hf, to_hf
from coe_jax.inference.run_dir import load_run
from coe_jax.nn.model_config import ConfigError, ModelConfig, our_knobs
from coe_jax.training import optimizer, train_step
from coe_jax.training.checkpoint import Checkpointer, save_run_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Our knobs that the authors' config.json neither carries nor fixes (from the ModelConfig field
# metadata: execution fields and router_z_loss_coef); import keeps the base config's, except
# `dispatch` (see `import_hf`). residual_style is not one: their code computes 'reference' only.
OUR_KNOBS = our_knobs()


def check_exportable(config: ModelConfig) -> None:
  """Raises ConfigError when the authors' model cannot compute what `config` computes."""
  check_authors_can_compute(config)


# The authors' code that `auto_map` names, and where their repository keeps it.
MODELING_FILES = ("configuration_coe.py", "modeling_coe.py")
MODELING_DIR_IN_THEIR_REPO = "config/models/coe_deepseekv2"
_README = """# A coe_jax export in the authors' Hugging Face format

`config.json` names (`auto_map`) the authors' model code, which coe_jax does not ship:
add `{files[0]}` and `{files[1]}` from `{where}/` of a checkout of
https://github.com/ZihanWang314/CoE beside this file (or export again with
`python -m coe_jax.export ... --modeling_code=<that checkout>`), then

    AutoModelForCausalLM.from_pretrained(<this folder>, trust_remote_code=True)

loads it (their code was written against transformers 4.49).
"""


def find_modeling_code(directory: str) -> dict[str, str]:
  """{file name: path} of the authors' two model files in `directory` (a checkout of their
  repository, or the folder holding the files); ConfigError naming what is missing."""
  for folder in (directory, os.path.join(directory, MODELING_DIR_IN_THEIR_REPO)):
    paths = {name: os.path.join(folder, name) for name in MODELING_FILES}
    if all(os.path.isfile(p) for p in paths.values()):
      return paths
  raise ConfigError(
    f"--modeling_code: {directory!r} holds neither {' and '.join(MODELING_FILES)} nor "
    f"{MODELING_DIR_IN_THEIR_REPO}/ with them; allowed: a checkout of "
    "github.com/ZihanWang314/CoE, or the folder holding those two files"
  )


def save_hf(
  out_dir: str,
  config: ModelConfig,
  params: Any,
  tokenizer_path: Optional[str] = None,
  modeling_code: Optional[str] = None,
) -> dict[str, str]:
  """Writes config.json + model.safetensors (+ tokenizer.json) in the authors' layout, and
  their model code from `modeling_code` (else a README saying which files to add).

  Raises ConfigError (before writing) if their model cannot compute `config`'s function or
  `modeling_code` lacks their files. The authors' code routes dropless: our capacity
  settings do not travel. Every file is readable by others (mode 0644 under umask 022).
  """
  check_exportable(config)
  code = find_modeling_code(modeling_code) if modeling_code else {}
  os.makedirs(out_dir, exist_ok=True)
  hf_config, state_dict = to_hf(config, {"params": params})
  hf_config["torch_dtype"] = "float32"
  paths = {
    "config": os.path.join(out_dir, CONFIG_FILE),
    "weights": os.path.join(out_dir, WEIGHTS_FILE),
  }
  if tokenizer_path and os.path.exists(tokenizer_path):
    tok = tokenizer_lib.load_file(tokenizer_path)
    paths["tokenizer"] = os.path.join(out_dir, "tokenizer.json")
    tokenizer_lib.save_file(tok, paths["tokenizer"])
    eos = tokenizer_lib.eos_id(tok)
    if eos is not None:
      hf_config["eos_token_id"] = eos
  with open(paths["config"], "w") as f:
    json.dump(hf_config, f, indent=2)
  save_file(
    {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()},
    paths["weights"],
    metadata={"format": "pt"},
  )  # transformers needs format=pt
  for name, source in code.items():
    paths[name] = os.path.join(out_dir, name)
    shutil.copyfile(source, paths[name])
  if not code:
    paths["readme"] = os.path.join(out_dir, "README.md")
    with open(paths["readme"], "w") as f:
      f.write(_README.format(files=MODELING_FILES, where=MODELING_DIR_IN_THEIR_REPO))
  _readable_by_others(out_dir)
  return paths


def _readable_by_others(directory: str) -> None:
  """Files written through temporary files (mode 0600) get the umask's usual mode."""
  umask = os.umask(0)
  os.umask(umask)
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      os.chmod(path, 0o666 & ~umask)


def export_run(
  workdir: str, out_dir: str, step: Optional[int] = None, modeling_code: Optional[str] = None
) -> dict[str, str]:
  """Exports the run's checkpoint (latest unless `step`) to `out_dir`; returns the paths."""
  run = load_run(workdir, step, with_tokenizer=False)
  tokenizer = os.path.join(workdir, "tokenizer.json")
  paths = save_hf(out_dir, run.model_config, run.params, tokenizer, modeling_code)
  paths["step"] = str(run.step)
  return paths


def read_hf_state_dict(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of `hf_dir/model.safetensors` or of its sharded index, as float32 numpy."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(hf_dir, WEIGHTS_FILE)):
    files = [WEIGHTS_FILE]
  else:
    raise FileNotFoundError(
      f"{hf_dir!r} has neither {WEIGHTS_FILE} nor {INDEX_FILE} "
      "(PyTorch .bin checkpoints: convert them to safetensors first)"
    )
  state_dict: dict[str, np.ndarray] = {}
  for name in files:
    state_dict.update(load_file(os.path.join(hf_dir, name)))
  return state_dict


def load_hf(hf_dir: str, **overrides: Any) -> tuple[ModelConfig, Any]:
  """(ModelConfig, params) from the authors' config.json and safetensors in `hf_dir`.

  `overrides` set our own knobs (dtype, ...) that config.json lacks; dispatch is
  'dropless' (the authors' routing) unless overridden.
  """
  with open(os.path.join(hf_dir, CONFIG_FILE)) as f:
    hf_config = json.load(f)
  model, variables = from_hf(hf_config, read_hf_state_dict(hf_dir), **overrides)
  return model.config, variables["params"]


def _base_config(config=None):
  return config_lib.build("paper") if config is None else config


def import_hf(
  hf_dir: str,
  workdir: str,
  config=None,
  tokenizer: Optional[str] = None,
  dispatch: str = IMPORT_DISPATCH,
) -> dict[str, Any]:
  """Turns the authors' checkpoint in `hf_dir` into a coe_jax run directory (step 0).

  Args:
    hf_dir: holds config.json and model.safetensors (or sharded safetensors).
    workdir: the run directory to create (must hold no checkpoint yet).
    config: the ml_collections run config whose data/train sections and our
      model knobs (`OUR_KNOBS`) to keep (default `config_lib.build('paper')`).
    tokenizer: a tokenizer.json to copy (default `hf_dir/tokenizer.json` if any).
    dispatch: the imported run's routing, whatever the base config says: 'dropless'
      (default; the authors' routing, so the logits equal theirs) or 'capacity'.
  Returns:
    {"model_config", "overrides" (the --config.model.* flags main.py needs), "workdir"}.
  """
  config = _base_config(config).copy_and_resolve_references()
  knobs = {k: config.model[k] for k in OUR_KNOBS if k in config.model}
  knobs["dispatch"] = dispatch
  model_config, params = load_hf(hf_dir, **knobs)
  checkpointer = Checkpointer(workdir, async_save=False)
  if checkpointer.latest_step() is not None:
    checkpointer.close()
    raise FileExistsError(f"{workdir!r} already holds checkpoints; import into a new directory")
  overrides = {k: v for k, v in model_config.to_dict().items() if config.model.get(k) != v}
  config.model.update(model_config.to_dict())
  tokenizer = tokenizer or os.path.join(hf_dir, "tokenizer.json")
  if os.path.exists(tokenizer):
    os.makedirs(workdir, exist_ok=True)  # with the special tokens its folder declares
    tokenizer_lib.save_file(
      tokenizer_lib.load_file(tokenizer), os.path.join(workdir, "tokenizer.json")
    )
    config.data.tokenizer = os.path.abspath(os.path.join(workdir, "tokenizer.json"))
  save_run_config(workdir, json.loads(config.to_json_best_effort()))
  state = train_step.TrainState.create(
    jax.tree.map(jax.numpy.asarray, params), optimizer.make_optimizer(config.train)
  )
  checkpointer.save(0, state, {"epoch": 0, "index": 0})
  checkpointer.close()
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(
      {"vocab_size": model_config.vocab_size, "step": 0, "imported_from": os.path.abspath(hf_dir)},
      f,
      indent=2,
    )
  return {"model_config": model_config, "overrides": overrides, "workdir": os.path.abspath(workdir)}


def override_flags(overrides: dict[str, Any]) -> str:
  """`--config.model.k=v` flags for main.py."""
  return " ".join(f"--config.model.{k}={v}" for k, v in sorted(overrides.items()))
