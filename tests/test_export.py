"""Tests for coe_jax.export: run -> the authors' HF layout -> run, with identical logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

from coe_jax import config_lib
from coe_jax.data.tokenizer import train_bpe
from coe_jax.inference import hf_files
from coe_jax.inference.run_dir import load_run
from coe_jax.nn.model import CoECausalLM, stack_layers
from coe_jax.nn.model_config import ConfigError
from coe_jax.training import optimizer, train_step
from coe_jax.training.checkpoint import Checkpointer, save_run_config

ROOT = Path(__file__).resolve().parents[1]
STEP = 7


def _tiny_config(vocab_size: int):
  """A tiny CoE(C=2) run config with an explicit vocabulary."""
  config = config_lib.build(
    "tiny",
    vocab_size=vocab_size,
    hidden_size=16,
    num_heads=2,
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=4,
    moe_intermediate_size=8,
    n_routed_experts=5,
    n_shared_experts=1,
    num_experts_per_tok=2,
    num_iterations=2,
    num_layers=2,
  )
  config.data.max_length = 16
  return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run directory as training leaves it: config.json, tokenizer.json, a checkpoint at STEP."""
  workdir = tmp_path_factory.mktemp("run")
  tok = train_bpe(
    [f"query : What is {a} + {a + 3}? response : {2 * a + 3}" for a in range(60)], 262
  )
  tok.save(str(workdir / "tokenizer.json"))
  config = _tiny_config(tok.get_vocab_size())
  model_config = config_lib.model_config_from(config)
  params = ref.random_params(CoECausalLM(model_config).init, jnp.zeros((1, 8), jnp.int32), seed=1)
  state = train_step.TrainState.create(
    jax.tree.map(jnp.asarray, params), optimizer.make_optimizer(config.train)
  )
  state = state.replace(step=jnp.asarray(STEP, jnp.int32))
  save_run_config(str(workdir), json.loads(config.to_json_best_effort()))
  checkpointer = Checkpointer(str(workdir), async_save=False)
  checkpointer.save(STEP, state, {"epoch": 0, "index": 0})
  checkpointer.close()
  return workdir, config, model_config, params


def _logits(model_config, params):
  ids = np.random.default_rng(0).integers(0, model_config.vocab_size, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  fn = ref.fast_jit(lambda p: CoECausalLM(model_config).apply({"params": p}, ids, mask)[0])
  return np.asarray(fn(params))


def test_export_writes_the_authors_names_and_layouts(run_dir, tmp_path):
  workdir, _, model_config, params = run_dir
  paths = hf_files.export_run(str(workdir), str(tmp_path / "hf"))
  assert paths["step"] == str(STEP)
  hf = json.loads(Path(paths["config"]).read_text())
  assert hf["architectures"] == ["CoeForCausalLM"]
  # The authors' architecture, as their config.json names it.
  assert hf["model_type"] == "coe_deepseekv2"
  assert hf["auto_map"] == {
    "AutoConfig": "configuration_coe.CoeConfig",
    "AutoModel": "modeling_coe.CoeModel",
    "AutoModelForCausalLM": "modeling_coe.CoeForCausalLM",
  }
  assert (hf["inner_iter"], hf["use_igate"], hf["num_hidden_layers"]) == (2, True, 2)
  assert hf["vocab_size"] == model_config.vocab_size and "eos_token_id" in hf
  assert os.path.exists(tmp_path / "hf" / "tokenizer.json")
  from safetensors import safe_open

  with safe_open(paths["weights"], "np") as f:
    assert f.metadata() == {"format": "pt"}
    names = set(f.keys())
    gate = f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight")
    router = f.get_tensor("model.layers.0.mlp.gate.1.weight")
  assert "model.layers.0.self_attn.kv_b_proj.weight" in names and "lm_head.weight" in names
  # torch Linear layout [out, in]; our stacked kernels are [layers, experts, in, out].
  np.testing.assert_array_equal(
    gate, stack_layers(params)["layers"]["mlp"]["routed_experts"]["gate_proj"][1, 3].T
  )
  np.testing.assert_array_equal(router, stack_layers(params)["layers"]["mlp"]["router"][0, 1])


def test_export_then_import_gives_identical_logits(run_dir, tmp_path):
  workdir, config, model_config, params = run_dir
  hf_files.export_run(str(workdir), str(tmp_path / "hf"))
  # Import routes dropless (the authors' routing) whatever the base config says; capacity on
  # request.
  dropless, capacity = (model_config.replace(dispatch=d) for d in ("dropless", "capacity"))
  imported_config, imported = hf_files.load_hf(str(tmp_path / "hf"))
  assert imported_config == dropless
  np.testing.assert_array_equal(_logits(imported_config, imported), _logits(dropless, params))
  assert hf_files.load_hf(str(tmp_path / "hf"), dispatch="capacity")[0] == capacity

  base = _tiny_config(0)
  base.model.dispatch = "capacity"
  result = hf_files.import_hf(str(tmp_path / "hf"), str(tmp_path / "run2"), config=base)
  assert result["overrides"] == {"vocab_size": model_config.vocab_size, "dispatch": "dropless"}
  run = load_run(str(tmp_path / "run2"))
  assert run.step == 0 and run.model_config == dropless and run.tokenizer is not None
  np.testing.assert_array_equal(_logits(run.model_config, run.params), _logits(dropless, params))
  result = hf_files.import_hf(
    str(tmp_path / "hf"), str(tmp_path / "run3"), config=base, dispatch="capacity"
  )
  assert result["overrides"] == {"vocab_size": model_config.vocab_size}
  assert load_run(str(tmp_path / "run3")).model_config == capacity


def test_imported_run_resumes_as_a_training_state(run_dir, tmp_path):
  """train_and_evaluate restores the step-0 checkpoint: fine-tuning starts from the import."""
  workdir, _, model_config, params = run_dir
  hf_files.export_run(str(workdir), str(tmp_path / "hf"))
  config = _tiny_config(0)
  hf_files.import_hf(str(tmp_path / "hf"), str(tmp_path / "run2"), config=config)
  config.model.vocab_size = model_config.vocab_size  # the printed --config.model.* override
  template = jax.eval_shape(
    lambda: train_step.init_train_state(CoECausalLM(model_config), config.train, 0, 8)
  )
  checkpointer = Checkpointer(str(tmp_path / "run2"))
  state, data_state, step = checkpointer.restore(template)
  checkpointer.close()
  assert step == 0 and data_state == {"epoch": 0, "index": 0}
  jax.tree.map(np.testing.assert_array_equal, state.params, params)


def test_export_refuses_what_the_authors_model_cannot_compute(run_dir, tmp_path):
  _, _, model_config, params = run_dir
  with pytest.raises(ConfigError, match="residual_style"):
    hf_files.save_hf(str(tmp_path / "hf"), model_config.replace(residual_style="textbook"), params)
  assert not (tmp_path / "hf").exists()


def test_command_line_export(run_dir, tmp_path):
  workdir = run_dir[0]
  out = tmp_path / "cli"
  done = subprocess.run(
    [sys.executable, "-m", "coe_jax.export", f"--workdir={workdir}", f"--out={out}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert (out / "config.json").exists() and (out / "model.safetensors").exists()
  assert f"Exported step {STEP}" in done.stdout


def _fake_modeling_checkout(root: Path) -> Path:
  """A folder laid out as the authors' repository, with stand-ins for their two model files."""
  folder = root / hf_files.MODELING_DIR_IN_THEIR_REPO
  folder.mkdir(parents=True)
  for name in hf_files.MODELING_FILES:
    (folder / name).write_text(f"# stand-in for their {name}\n")
  return root


def test_export_writes_no_pad_token_id_and_files_others_can_read(run_dir, tmp_path):
  workdir = run_dir[0]
  paths = hf_files.export_run(str(workdir), str(tmp_path / "hf"))
  hf = json.loads(Path(paths["config"]).read_text())
  assert "pad_token_id" not in hf  # their model would make it the embedding's padding_idx
  assert hf["eos_token_id"] == 1  # train_bpe's <|endoftext|>
  for path in (tmp_path / "hf").iterdir():
    assert path.stat().st_mode & 0o044 == 0o044, path  # group and others may read


def test_export_without_modeling_code_says_which_files_to_add(run_dir, tmp_path):
  paths = hf_files.export_run(str(run_dir[0]), str(tmp_path / "hf"))
  readme = Path(paths["readme"]).read_text()
  assert all(name in readme for name in hf_files.MODELING_FILES)
  assert hf_files.MODELING_DIR_IN_THEIR_REPO in readme and "trust_remote_code" in readme
  assert not any((tmp_path / "hf" / name).exists() for name in hf_files.MODELING_FILES)


@pytest.mark.parametrize("given", ["checkout", "folder"])
def test_export_copies_the_authors_modeling_code_from_a_checkout(run_dir, tmp_path, given):
  checkout = _fake_modeling_checkout(tmp_path / "CoE")
  source = checkout if given == "checkout" else checkout / hf_files.MODELING_DIR_IN_THEIR_REPO
  hf_files.export_run(str(run_dir[0]), str(tmp_path / "hf"), modeling_code=str(source))
  for name in hf_files.MODELING_FILES:
    assert (tmp_path / "hf" / name).read_text() == f"# stand-in for their {name}\n"
  assert not (tmp_path / "hf" / "README.md").exists()


def test_export_refuses_a_modeling_code_folder_without_their_files(run_dir, tmp_path):
  with pytest.raises(ConfigError, match="--modeling_code: .* configuration_coe.py"):
    hf_files.export_run(str(run_dir[0]), str(tmp_path / "hf"), modeling_code=str(tmp_path))
  assert not (tmp_path / "hf").exists()  # refused before anything was written


# The transformers check needs the authors' code and a Python with torch + transformers 4.49,
# which the project does not install: COE_MODELING_CODE names a checkout of their repository,
# COE_HF_PYTHON that interpreter (e.g. the venv of ../shared/tools/ref_torch/setup.sh).
_HF_CHECK = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).float().eval()
ids = torch.tensor(np.load(sys.argv[2]), dtype=torch.long)
with torch.no_grad():
  np.save(sys.argv[3], model(input_ids=ids, use_cache=False).logits.float().numpy())
"""


@pytest.mark.skipif(
  not (os.environ.get("COE_MODELING_CODE") and os.environ.get("COE_HF_PYTHON")),
  reason="set COE_MODELING_CODE (their checkout) and COE_HF_PYTHON (torch + transformers)",
)
def test_transformers_loads_the_export_and_computes_our_logits(run_dir, tmp_path):
  workdir, _, model_config, params = run_dir
  out = tmp_path / "hf"
  hf_files.export_run(str(workdir), str(out), modeling_code=os.environ["COE_MODELING_CODE"])
  ids = np.random.default_rng(0).integers(0, model_config.vocab_size, (2, 9)).astype(np.int64)
  np.save(tmp_path / "ids.npy", ids)
  done = subprocess.run(
    [
      os.environ["COE_HF_PYTHON"],
      "-c",
      _HF_CHECK,
      str(out),
      str(tmp_path / "ids.npy"),
      str(tmp_path / "logits.npy"),
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  dropless = model_config.replace(dispatch="dropless")
  fn = ref.fast_jit(lambda p: CoECausalLM(dropless).apply({"params": p}, ids.astype(np.int32))[0])
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), fn(params), rtol=1e-4, atol=1e-4)
