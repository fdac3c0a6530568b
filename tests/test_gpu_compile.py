"""experiments/gpu_compile.py: HLO facts, ratios, target checks; a deviceless compile where the
CUDA build of JAX is installed (`make gpu-check`'s venv; skipped in the CPU test venv)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from experiments import gpu_compile

HLO = """
%w.1 = (s32[]) while(%t), condition=%c, body=%b, backend_config={"known_trip_count":{"n":"6"}}
%w.2 = (s32[]) while(%t), condition=%c, body=%b
%f = bf16[8,8]{1,0} fusion(%a, %b), kind=kCustom, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
%g = bf16[8,8]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm"
%k = bf16[8,8]{1,0} custom-call(%a, %b), custom_call_target="__gpu$xla.gpu.triton"
%ar = f32[8]{0} all-reduce-start(%x), replica_groups={}
%ard = f32[8]{0} all-reduce-done(%ar)
%ag = f32[64]{0} all-gather(%x), dimensions={0}
"""


def test_hlo_facts_count_loops_kernels_and_collectives():
  facts = gpu_compile.hlo_facts(HLO)
  assert facts["while_loops"] == 2 and facts["data_dependent_loops"] == 1
  assert facts["gemm_fusions"] == 1 and facts["gemm_custom_calls"] == 1
  assert facts["triton_kernels"] == 1
  assert facts["collectives"] == {"all-reduce": 1, "all-gather": 1}


def _row(program, mesh="1", **facts):
  base = dict(
    target="h100",
    config="configs/moe_k8.py",
    mesh=mesh,
    program=program,
    compile_seconds=10.0,
    state_bytes=1 << 30,
    temp_bytes=4 << 30,
    device_memory_bytes=80 << 30,
    fits=True,
    while_loops=0,
    data_dependent_loops=0,
    gemm_fusions=3,
    gemm_custom_calls=0,
    triton_kernels=0,
    collectives={"all-reduce": 10},
  )
  return dict(base, **facts)


def test_ratios_to_capacity_and_the_targets_checked():
  rows = gpu_compile.with_ratios(
    [
      _row("capacity"),
      _row(
        "dropless", temp_bytes=5 << 30, while_loops=2, data_dependent_loops=2, compile_seconds=30.0
      ),
      _row("capacity", mesh="8fsdp"),
      _row("dropless", mesh="8fsdp", collectives={"all-reduce": 16}),
    ]
  )
  assert rows[1]["temp_ratio"] == 1.25 and rows[1]["compile_ratio"] == 3.0
  assert gpu_compile.misses(rows[1]) == ["2 data-dependent loops", "temp 1.25x capacity"]
  assert gpu_compile.misses(rows[3]) == ["all-reduces 1.60x capacity"]
  assert gpu_compile.misses(rows[0]) == []  # capacity rows are not checked
  table = gpu_compile.table(rows)
  assert (
    "| h100 | moe_k8 | 1 | dropless | 30 (3.00x) | 1.0 | 5.0 (1.25x) | 6.0 of 80 | 2 (2) |" in table
  )


def _has_cuda_jax() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


@pytest.mark.skipif(not _has_cuda_jax(), reason="needs jax[cuda12] (make gpu-check's venv)")
def test_deviceless_compile_of_a_tiny_train_step_for_one_h100(tmp_path):
  out = tmp_path / "gpu.json"
  args = ["--scale=tiny", "--batch=2", "--seq=32", "--meshes=1", f"--out={out}", "--check"]
  args += ["--configs=configs/moe_k8.py", "--programs=capacity,dropless"]
  done = subprocess.run(
    [sys.executable, "-m", "experiments.gpu_compile", *args],
    cwd=gpu_compile.REPO,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  assert "| dropless |" in done.stdout and "0 (0)" in done.stdout
