"""The base training config and the three scales every paper run comes in.

Each file in `configs/` is a few lines: `get_config(arg)` calls `build(arg,
**changes)` with the fields its paper run varies. `arg` is the big_vision-style
scale suffix: `configs/coe_c2.py` is the paper's scale, `configs/coe_c2.py:tiny`
the same run shrunk to CPU size.

Scales:
  paper: DESIGN.md 5/6. hidden 1024, 4 layers, N=64 (63 routed + 1 shared), f=704,
    MLA dims of DeepSeek-V2-Lite, DeepSeek-V2 tokenizer (vocab 102400),
    MetaMathQA, 64 x 512 tokens per step, 1000 steps, bf16 compute.
  tiny: hidden 128, half the paper's layers (2; 4 and 6 for the deeper
    ablations), N=32 (31 routed + 1 shared) so every paper K/N
    ratio maps to a whole K (K=8/64 -> 4/32), f=96 (f/hidden ~ 704/1024), MLA
    dims shrunk by 4-8x, 16 x 256 tokens per step, fp32; the embedded
    synthetic corpus with a byte-level BPE tokenizer unless `config.data` is
    pointed at local files. C and the layer-count ratios are kept.
  narrow: tiny's widths, layers and recipe, but the paper's N=64 (63 routed +
    1 shared) and K (8 of 64; CoE C=2 K=4), so that the number of expert
    combinations across iterations, the effect CoE is about, stays the paper's.
    The scale of the pre-registered headline comparison (experiments/README.md).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import ml_collections

from coe_jax.data.input_pipeline import default_data_config
from coe_jax.nn.model_config import ConfigError, ModelConfig

SCALES = ("paper", "tiny", "narrow")
PAPER_EXPERTS = 64  # the paper's N, shared expert included


def parse_scale(arg: Optional[str]) -> str:
  scale = (arg or "paper").strip()
  if scale not in SCALES:
    raise ConfigError(f"config argument (scale): got {arg!r}; allowed values: {', '.join(SCALES)}")
  return scale


def scale_experts(paper_k: int, paper_n: int, scale: str) -> dict[str, int]:
  """Maps the paper's (K, N incl. shared) to this scale, keeping K/N and N_shared.

  Dense-style runs (K = N = 8) keep every expert at every scale.
  """
  divisor = 2 if scale == "tiny" else 1
  if paper_k >= paper_n:  # dense-style: all experts run, no shared expert (DESIGN.md 7)
    k = paper_k // divisor
    return dict(num_experts_per_tok=k, n_routed_experts=k, n_shared_experts=0)
  n = paper_n // divisor
  return dict(num_experts_per_tok=paper_k // divisor, n_routed_experts=n - 1, n_shared_experts=1)


def _model_config(scale: str) -> ml_collections.ConfigDict:
  model = ModelConfig().to_dict()
  if scale == "paper":
    model.update(dtype="bfloat16")
  else:
    model.update(
      vocab_size=0,
      hidden_size=128,
      num_heads=4,
      kv_lora_rank=64,
      qk_nope_head_dim=32,
      qk_rope_head_dim=16,
      v_head_dim=32,
      moe_intermediate_size=96,
      rope_original_max_position=256,
      dtype="float32",
      num_layers=2,
    )
  model.update(scale_experts(8, PAPER_EXPERTS, scale))
  return ml_collections.ConfigDict(model)


def _train_config(scale: str) -> ml_collections.ConfigDict:
  paper = scale == "paper"
  return ml_collections.ConfigDict(
    dict(
      steps=1000 if paper else 300,  # optimizer steps
      batch_size=64 if paper else 16,  # sequences per step (64 x 512 = 32K tokens in the paper)
      grad_accum_steps=1,  # micro-batches per step; batch_size must divide by it
      lr=3e-4,  # peak learning rate (AdamW)
      b1=0.9,  # AdamW beta1
      b2=0.95,  # AdamW beta2
      weight_decay=0.01,  # AdamW decoupled weight decay
      # Decay RMSNorm scales too, as the reference's AdamW decays every parameter; False leaves
      # them undecayed (the HF Trainer's habit, and what runs saved before this field keep).
      decay_norm_scales=True,
      warmup_fraction=0.1,  # linear warm-up over this share of steps
      schedule="constant",  # after warm-up: 'constant' (paper) | 'cosine'
      grad_clip=1.0,  # global-norm clipping; 0 disables
      # True: clip + AdamW as one fused elementwise pass per parameter (2-3.5x faster on CPU,
      # equal to the optax chain to float32 rounding, not bit for bit); False: the optax chain
      # (what runs saved before this default keep on resume; experiments/PERF.md 13 and 16).
      fused_optimizer=True,
      eval_every=10 if paper else 50,  # validation every N steps (and at the end); 0 = end only
      eval_batch_size=64 if paper else 32,  # sequences per validation batch
      max_eval_batches=0,  # 0 = the whole validation set
      # Also log val/loss_paper, the reference's validation number: the mean of per-batch mean
      # losses over the first paper_val_batches x paper_val_batch_size rows of a seed-0 shuffle
      # of the validation set (DESIGN.md 6). val/loss stays the pooled mean over the whole set.
      paper_val=paper,
      paper_val_batches=2,  # batches the reference scores
      paper_val_batch_size=64,  # rows per reference validation batch
      checkpoint_every=100,  # Orbax checkpoint every N steps (and at the end); 0 = end only
      keep_checkpoints=3,  # how many checkpoints to keep
      log_every=1,  # fetch and write train metrics every N steps
      log_routing_stats=True,  # per-iteration load CV / entropy / dropped fraction in metrics
      # Peak dense TFLOP/s of one device, the denominator of train/mfu: -1 = look the device kind
      # up in coe_jax.nn.flops.PEAK_TFLOPS (H100, H200, A100, B200, TPUs; MFU omitted for a kind not
      # there, e.g. CPUs), 0 = unknown (MFU omitted), > 0 = this value.
      peak_tflops_per_device=-1.0,
      # Steps to trace with jax.profiler, 'START:STOP' (the steps logged as START+1 .. STOP, e.g.
      # '10:15' traces five steps after ten warm ones); the trace lands in <workdir>/tensorboard
      # (TensorBoard's Profile tab, or xprof). '' = no profiling.
      profile_steps="",
      # Also log metrics to this Weights & Biases project when `wandb` is installed; '' = off.
      wandb_project="",
    )
  )


def _mesh_config() -> ml_collections.ConfigDict:
  """Device mesh and multi-host start (see `coe_jax.training.sharding`); ignored on one device."""
  return ml_collections.ConfigDict(
    dict(
      data=-1,  # data-parallel ways; -1 = every device not used by fsdp/expert
      fsdp=1,  # ways to split params and optimizer state (ZeRO-3 style, all-gathered at use)
      expert=1,  # ways to split the routed experts (tokens exchanged by all-to-all); divides N_routed
      distributed=False,  # call jax.distributed.initialize (also if JAX_COORDINATOR_ADDRESS is set)
      coordinator_address="",  # host:port of process 0; '' = env JAX_COORDINATOR_ADDRESS or auto-detect
      num_processes=0,  # 0 = env JAX_NUM_PROCESSES or auto-detect
      process_id=-1,  # -1 = env JAX_PROCESS_ID or auto-detect
      # CPU only: XLA devices the host is split into, data-parallel (training/host_devices.py);
      # 0 = auto (narrow dropless models, small vocab, enough tokens a core, one process),
      # 1 = one device, n = n devices
      cpu_devices=0,
    )
  )


def paper_run(
  arg: Optional[str],
  *,
  name: str,
  paper_val_loss: Optional[float],
  c: int,
  k: int,
  n: int = PAPER_EXPERTS,
  layers: int = 4,
  **model_changes: Any,
) -> ml_collections.ConfigDict:
  """Config of one paper run CoE(C, K, N) with `layers` decoder layers at `arg`'s scale.

  K, N and layers are the paper's; at tiny scale they are mapped keeping K/N (narrow keeps K
  and N, halving the layers like tiny)
  and the layer-count ratios (see `scale_experts`).
  """
  scale = parse_scale(arg)
  num_layers = layers if scale == "paper" else layers // 2  # tiny and narrow: half the depth
  config = build(
    arg, num_iterations=c, num_layers=num_layers, **scale_experts(k, n, scale), **model_changes
  )
  config.paper = ml_collections.ConfigDict(
    dict(
      name=name,  # the run's name in the paper
      c=c,
      k=k,
      n=n,
      layers=layers,  # the paper's C, K, N (shared expert included), depth
      val_loss=paper_val_loss
      if paper_val_loss is not None
      else float("nan"),  # DESIGN.md 7; NaN: not in the paper
    )
  )
  return config


def build(arg: Optional[str] = None, **model_changes: Any) -> ml_collections.ConfigDict:
  """The full config at `arg`'s scale with `model_changes` applied to `config.model`."""
  scale = parse_scale(arg)
  config = ml_collections.ConfigDict()
  config.scale = scale  # 'paper' | 'tiny' | 'narrow'
  config.seed = 0  # init, data order and step rngs all derive from it
  config.model = _model_config(scale)
  # The reference routes dropless in training and evaluation (DESIGN.md 3); capacity dispatch is
  # one override away: --config.model.dispatch=capacity.
  config.model.dispatch = "dropless"
  config.data = default_data_config()
  if scale == "paper":
    config.data.source = "hf"
    config.data.tokenizer = "deepseek-ai/DeepSeek-V2-Lite"
    config.data.max_length = 512
  else:
    config.data.source = "synthetic"
    config.data.tokenizer = "bpe"
    config.data.max_length = 256
  config.train = _train_config(scale)
  config.mesh = _mesh_config()
  unknown = sorted(set(model_changes) - set(config.model.keys()))
  if unknown:
    raise ConfigError(f"model config: unknown field(s) {unknown}")
  config.model.update(model_changes)
  return config


def load_config_file(spec: str, root: Optional[Path] = None) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> that file's `get_config(arg)`, as `--config=` loads it.

  A relative path is looked up from the working directory, then from `root`.
  """
  path, _, arg = str(spec).partition(":")
  file = Path(path).expanduser()
  if not file.is_file() and root is not None and (root / path).is_file():
    file = root / path
  if not file.is_file():
    raise ConfigError(f"config file: {path!r} does not exist (cwd {os.getcwd()!r})")
  module_spec = importlib.util.spec_from_file_location(f"coe_jax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def model_config_from(
  config: ml_collections.ConfigDict, vocab_size: Optional[int] = None
) -> ModelConfig:
  """ModelConfig from the flat `config.model` (`ModelConfig.from_dict` puts the CoE layer's
  fields in `.coe`); vocab_size=0 there means 'the tokenizer's size'."""
  values = dict(config.model)
  if values.get("vocab_size", 0) == 0:
    if vocab_size is None:
      values["vocab_size"] = 1  # placeholder for validation before the tokenizer is known
    else:
      values["vocab_size"] = vocab_size
  return ModelConfig.from_dict(values)
