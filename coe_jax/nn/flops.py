"""Model FLOPs per token and accelerator peak rates: what MFU is computed from.

`flops_per_token` is the analytic count the benchmark (`experiments/bench.py`)
and the training log (`train/tflops_per_sec_per_device`, `train/mfu`) share:
2 FLOPs per multiply-add of every matmul a token's forward pass does, times 3
for training (forward + backward). MFU is the achieved model FLOP/s per device
over the device's peak dense rate (`peak_tflops_per_device`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from coe_jax.nn.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Forward FLOPs per token of every part of the model (2 FLOPs per multiply-add).

  Attributes:
    attention_proj: q_proj, kv_a_proj_with_mqa, kv_b_proj and o_proj, all layers.
    attention_scores: q.k over q_head_dim and probs.v over v_head_dim against
      the (seq + 1) / 2 keys a causal query sees on average, all layers (keys
      a kernel scores and then masks, or skips, are not useful work).
    routed_experts: K routed SwiGLU experts per iteration, C iterations, all layers.
    shared_experts: the shared SwiGLU expert(s), run every iteration, all layers.
    router: one [hidden, N_routed] router matmul per iteration, all layers.
    head: the [hidden, vocab] output projection.
  """

  attention_proj: float
  attention_scores: float
  routed_experts: float
  shared_experts: float
  router: float
  head: float

  @property
  def forward(self) -> float:
    return sum(dataclasses.astuple(self))

  @property
  def train(self) -> float:
    """Forward + backward = 3x forward (the backward pass does two matmuls per forward one).

    Remat recomputation and capacity padding are not counted: MFU counts useful work.
    """
    return 3.0 * self.forward


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopCount:
  """Matmul FLOPs of one token's forward pass (embedding lookup, norms, softmax excluded)."""
  coe = cfg.coe
  d, f, layers, chain = (
    cfg.hidden_size,
    coe.moe_intermediate_size,
    cfg.num_layers,
    coe.num_iterations,
  )
  heads = cfg.num_heads
  proj_params = (
    d * heads * cfg.q_head_dim
    + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    + heads * cfg.v_head_dim * d
  )
  swiglu_macs = 3 * d * f
  return FlopCount(
    attention_proj=2.0 * layers * proj_params,
    attention_scores=2.0 * layers * (seq_len + 1) / 2 * heads * (cfg.q_head_dim + cfg.v_head_dim),
    routed_experts=2.0 * layers * chain * coe.num_experts_per_tok * swiglu_macs,
    shared_experts=2.0 * layers * chain * coe.n_shared_experts * swiglu_macs,
    router=2.0 * layers * chain * d * coe.n_routed_experts,
    head=2.0 * d * cfg.vocab_size,
  )


# Dense (no 2:4 sparsity) peak TFLOP/s per device from the vendors' data sheets, by
# `jax.Device.device_kind` prefix: (bfloat16 matmuls, float32 matmuls). On NVIDIA GPUs XLA runs
# float32 matmuls as TF32 by default, hence half the bf16 rate; on TPUs float32 is unknown here.
PEAK_TFLOPS: dict[str, tuple[float, Optional[float]]] = {
  "NVIDIA H100 80GB HBM3": (989.4, 494.7),  # H100 SXM
  "NVIDIA H100 PCIe": (756.0, 378.0),
  "NVIDIA H100 NVL": (835.0, 417.5),
  "NVIDIA H200": (989.4, 494.7),  # H200 SXM and NVL share the H100 SXM's compute
  "NVIDIA GH200": (989.4, 494.7),
  "NVIDIA B200": (2250.0, 1125.0),
  "NVIDIA A100": (312.0, 156.0),  # every A100 variant (SXM4 / PCIe, 40 / 80 GB)
  "NVIDIA L4": (121.0, 60.0),
  "TPU v4": (275.0, None),
  "TPU v5 lite": (197.0, None),  # v5e
  "TPU v5p": (459.0, None),
  "TPU v5": (459.0, None),
  "TPU v6 lite": (918.0, None),  # v6e (Trillium)
}


def known_peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
  """The table's peak for a device kind and compute dtype ('bfloat16' | 'float32'), or None."""
  for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):  # the most specific prefix first
    if device_kind.startswith(prefix):
      bf16, fp32 = PEAK_TFLOPS[prefix]
      return bf16 if dtype == "bfloat16" else fp32
  return None


def peak_tflops_per_device(configured: float, device_kind: str, dtype: str) -> Optional[float]:
  """The peak MFU is computed against: `configured` when > 0, none when 0, the table when < 0."""
  if configured > 0:
    return float(configured)
  if configured == 0:
    return None
  return known_peak_tflops(device_kind, dtype)
