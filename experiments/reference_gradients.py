"""Our training gradient on a right-padded batch against the authors' PyTorch trainer's.

Runs `../shared/tools/ref_torch/ref.py padgrad` (their `modeling_coe.py`, loaded from outside
the repository; see that folder's README for the one-time set-up), loads their initial weights
into our model (`convert.from_hf`), lays their batch out as our pipeline does for
`pad_semantics='reference'` (text, then end-of-text pads; the first pad is the last real
token's target) and compares every gradient tensor:

    REF_DIR=... REF_VENV=... python -m experiments.reference_gradients \
        --real_lens=32,23 --seq=48 --pad_semantics=reference,masked --json=out.json

Prints, per semantics, the largest relative error ||ours - theirs|| / ||theirs|| over each
group of tensors (router, experts, attention, ...), and writes every tensor's error as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from safetensors.numpy import load_file

from coe_jax.inference import convert
from coe_jax.training.train_step import training_objective

_HARNESS = Path(__file__).resolve().parents[2] / "shared" / "tools" / "ref_torch" / "ref.py"

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("real_lens", "32,23", "Real tokens per row; the rest are end-of-text pads.")
  flags.DEFINE_integer("seq", 48, "Tokens per row.")
  flags.DEFINE_string("pad_semantics", "reference,masked", "Our model.pad_semantics values to run.")
  flags.DEFINE_string(
    "model_args",
    "--hidden 64 --layers 2 --experts 8 --topk 2 --iters 2 --vocab 512 --moe-inter 32 "
    "--set num_attention_heads=4 --set kv_lora_rank=32 --set qk_nope_head_dim=16 "
    "--set qk_rope_head_dim=8 --set v_head_dim=16",
    "Model arguments of ref.py (its --experts counts the shared expert).",
  )
  flags.DEFINE_integer("eos_id", 1, "End-of-text id (the pad).")
  flags.DEFINE_string("json", "", "Also write the per-tensor errors here.")


def run_their_padgrad(out_dir: str) -> None:
  """Their gradient on the padded batch (and their weights, batch and config) into `out_dir`."""
  venv, ref_dir = os.environ.get("REF_VENV"), os.environ.get("REF_DIR")
  if not venv or not ref_dir:
    sys.exit("error: REF_VENV and REF_DIR must name the harness's venv and extracted code")
  command = [f"{venv}/bin/python", str(_HARNESS), "padgrad", *FLAGS.model_args.split()]
  command += [
    "--seq",
    str(FLAGS.seq),
    "--real-lens",
    FLAGS.real_lens,
    "--eos-id",
    str(FLAGS.eos_id),
  ]
  subprocess.run(command + ["--threads", "2", "--out", out_dir], check=True)


def our_batch(ids: np.ndarray, mask: np.ndarray) -> dict[str, jax.Array]:
  """Their (input_ids, attention_mask) as our pipeline lays them out: segment ids cover the
  text and its end-of-text target (the first pad), positions are arange."""
  real = mask.sum(axis=1)
  seq = ids.shape[1]
  segment = (np.arange(seq)[None, :] < np.minimum(real + 1, seq)[:, None]).astype(np.int32)
  positions = np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape)
  batch = dict(input_ids=ids, attention_mask=mask, segment_ids=segment, positions=positions)
  return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def our_gradient(hf_config: dict, weights: dict, batch: dict, pad_semantics: str) -> dict:
  """Gradient of our objective (CE over the targets + balance losses), in their names."""
  model, variables = convert.from_hf(hf_config, weights, pad_semantics=pad_semantics)

  def objective(params):
    return training_objective(model, params, batch)[0]

  grads = jax.jit(jax.grad(objective))(variables["params"])
  return convert.to_hf(model, {"params": grads})[1]


def group(name: str) -> str:
  for key in ("mlp.gate", "mlp.experts", "shared_experts", "self_attn", "layernorm", "embed"):
    if key in name:
      return key
  return name


def compare(ours: dict, theirs: dict) -> dict[str, float]:
  return {
    name: float(np.linalg.norm(ours[name] - g) / max(np.linalg.norm(g), 1e-30))
    for name, g in theirs.items()
  }


def main(argv) -> None:
  del argv
  with tempfile.TemporaryDirectory() as out_dir:
    run_their_padgrad(out_dir)
    theirs = {
      k: np.asarray(v, np.float64)
      for k, v in load_file(f"{out_dir}/grads_train.safetensors").items()
    }
    weights = load_file(f"{out_dir}/model.safetensors")
    hf_config = json.loads(Path(out_dir, "config.json").read_text())
    ids = np.load(f"{out_dir}/input_ids.npy")
    mask = np.load(f"{out_dir}/attention_mask.npy")
  batch = our_batch(ids, mask)
  results = {}
  print(f"real lens {FLAGS.real_lens}, seq {FLAGS.seq}: max relative error per tensor group")
  print(f"{'pad_semantics':<14} " + " ".join(f"{g:>14}" for g in _GROUPS))
  for semantics in FLAGS.pad_semantics.split(","):
    errors = compare(our_gradient(hf_config, weights, batch, semantics), theirs)
    results[semantics] = errors
    worst = {g: max(e for n, e in errors.items() if group(n) == g) for g in _GROUPS}
    print(f"{semantics:<14} " + " ".join(f"{worst[g]:>14.2e}" for g in _GROUPS))
  if FLAGS.json:
    Path(FLAGS.json).write_text(json.dumps(results, indent=1, sort_keys=True))


_GROUPS = (
  "mlp.gate",
  "mlp.experts",
  "shared_experts",
  "self_attn",
  "layernorm",
  "embed",
  "lm_head.weight",
)

if __name__ == "__main__":
  _define_flags()
  app.run(main)
