"""Tests for experiments/bench.py (FLOP accounting) and experiments/gpu_bench.sh (CPU form)."""

from __future__ import annotations

import json
import mmap
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from coe_jax.nn import router
from coe_jax.nn.model_config import ModelConfig
from experiments import bench

REPO = Path(__file__).resolve().parents[1]
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_flops_per_token_matches_a_hand_count():
  cfg = ModelConfig().replace(
    vocab_size=100,
    hidden_size=8,
    num_layers=2,
    num_heads=2,
    kv_lora_rank=4,
    qk_nope_head_dim=2,
    qk_rope_head_dim=2,
    v_head_dim=3,
    n_routed_experts=6,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=5,
    num_iterations=3,
  )
  flops = bench.flops_per_token(cfg, seq_len=10)
  # Per layer: q 8*2*4=64, kv_a 8*6=48, kv_b 4*2*5=40, o 2*3*8=48 -> 200 weights; 2 layers, 2 FLOPs each.
  assert flops.attention_proj == 2 * 2 * 200
  # 2 layers, 5.5 keys (causal average of 10), 2 heads, q.k + p.v
  assert flops.attention_scores == 2 * 2 * 5.5 * 2 * (4 + 3)
  assert flops.routed_experts == 2 * 2 * 3 * 2 * (3 * 8 * 5)  # 2 layers, C=3, K=2, SwiGLU 3*d*f
  assert flops.shared_experts == 2 * 2 * 3 * 1 * (3 * 8 * 5)
  assert flops.router == 2 * 2 * 3 * 8 * 6
  assert flops.head == 2 * 8 * 100
  assert flops.forward == 800 + 308 + 2880 + 1440 + 576 + 1600
  assert flops.train == 3 * flops.forward


def test_coe_c2_k4_costs_what_moe_k8_costs_in_routed_flops():
  moe = bench.flops_per_token(ModelConfig().replace(num_experts_per_tok=8), 512)
  coe = bench.flops_per_token(ModelConfig().replace(num_experts_per_tok=4, num_iterations=2), 512)
  assert coe.routed_experts == moe.routed_experts
  assert coe.shared_experts == 2 * moe.shared_experts  # the shared expert runs every iteration
  assert coe.router == 2 * moe.router


def _run_gpu_bench(tmp_path, **env_overrides) -> subprocess.CompletedProcess:
  env = dict(
    os.environ, OUT=str(tmp_path), JAX_PLATFORMS="cpu", PYTHON=sys.executable, **env_overrides
  )
  return subprocess.run(
    ["bash", str(REPO / "experiments" / "gpu_bench.sh")],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_gpu_bench_refuses_paper_scale_without_an_accelerator(tmp_path):
  proc = _run_gpu_bench(tmp_path, SCALE="paper")
  assert proc.returncode == 2
  assert "SCALE=tiny" in proc.stderr


@pytest.mark.slow
def test_gpu_bench_runs_in_cpu_form_and_prints_the_table_last(tmp_path):
  proc = _run_gpu_bench(
    tmp_path,
    SCALE="tiny",
    STEPS="2",
    WARMUP="1",
    BATCH="2",
    SEQ="16",
    DISPATCH="capacity",
    XLA_FLAGS=FAST_COMPILE_FLAGS,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "bench.json").read_text())
  labels = [run["label"] for run in results["runs"]]
  assert labels == [f"{name} capacity" for name, _ in bench.SUITE]
  last_lines = proc.stdout.strip().splitlines()
  table_rows = [line for line in last_lines if line.split(" capacity")[0] in dict(bench.SUITE)]
  assert len(table_rows) == 3
  assert last_lines[-1].startswith("dispatch share of one layer")
  for run in results["runs"]:
    assert run["mfu"] > 0 and run["compiled_peak_bytes"] > 0 and run["batch"] * run["seq"] == 32
    assert run["train_flops_per_token"] == bench.flops_per_token(_suite_model_config(run), 16).train
  # The identity-expert layer really skips the expert matmuls (XLA's own FLOP count).
  cost = results["layer_cost"]
  assert cost["identity_experts_xla_flops"] < 0.5 * cost["layer_xla_flops"]


def _suite_model_config(run: dict) -> ModelConfig:
  """The ModelConfig of a suite run, rebuilt from its config file."""
  config = bench.load_config(f"{dict(bench.SUITE)[run['config']]}:tiny")
  return bench.bench_model_config(config, run["dispatch"], {})


def test_each_program_is_compared_with_the_capacity_step_of_its_own_variant():
  def record(config, dispatch, block, label):
    keys = ("config", "dispatch", "attention_query_block", "label")
    return dict(zip(keys, (config, dispatch, block, label)), scan_layers=False)

  runs = [
    record("MoE (K=8)", "capacity", 0, "a"),  # a config name with a space: no label parsing
    record("MoE (K=8)", "capacity", 64, "b"),
    record("MoE", "capacity", 64, "c"),
    record("MoE (K=8)", "dropless", 64, "d"),
  ]
  assert bench.capacity_baseline(runs[3], runs)["label"] == "b"
  assert bench.capacity_baseline(record("CoE", "dropless", 0, "e"), runs) is None


@pytest.mark.slow
def test_memory_only_reports_each_dropless_impl_beside_capacity(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_FLAGS)
  results = bench.main(
    [
      "--config=configs/moe_k8.py:tiny",
      "--dispatch=capacity,dropless",
      "--dropless_impl=blocked,gather",
      "--memory_only",
      "--batch=2",
      "--seq=16",
    ]
  )
  rows = {r["label"]: r for r in results["memory_only"]}
  assert list(rows) == [
    "configs/moe_k8.py:tiny capacity",
    "configs/moe_k8.py:tiny dropless[blocked]",
    "configs/moe_k8.py:tiny dropless[gather]",
  ]
  assert rows["configs/moe_k8.py:tiny capacity"]["peak_vs_capacity"] == 1.0
  assert all(r["compiled_peak_bytes"] > 0 and r["peak_vs_capacity"] > 0 for r in rows.values())


def test_timed_counts_the_calls_that_touch_fresh_memory():
  page = resource.getpagesize()

  def touch_fresh_pages():
    with mmap.mmap(-1, 2 * bench.FAULTED_CALL_BYTES) as memory:  # anonymous: every page new
      memory.madvise(mmap.MADV_NOHUGEPAGE)  # base pages even where THP is 'always'
      for offset in range(0, len(memory), page):
        memory[offset] = 1

  fresh = bench.Timed("fresh", touch_fresh_pages)
  warm = bench.Timed("warm", lambda: None)
  for _ in range(2):
    fresh.run_once()
    warm.run_once()
  assert min(fresh.page_faults) >= 2 * bench.FAULTED_CALL_BYTES // page
  assert fresh.faulted_steps() == 2 and warm.faulted_steps() == 0


def test_dropless_variants_cross_tiles_and_tile_sizes_for_blocked_only():
  assert bench._dropless_variants("capacity", ["auto"], [8], [1, 5]) == [(None, None, None)]
  assert bench._dropless_variants("dropless", ["auto", "gather"], [8, 16], [1, 5]) == [
    ("auto", 8, 1),
    ("auto", 8, 5),
    ("auto", 16, 1),
    ("auto", 16, 5),
    ("gather", 8, 1),
  ]
  assert bench._dropless_variants("dropless", ["blocked"], [], []) == [("blocked", None, None)]


@pytest.mark.slow
def test_bench_runs_each_tile_size_count_side_by_side(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_FLAGS)
  results = bench.main(
    [
      "--config=configs/moe_k8.py:tiny",
      "--dispatch=dropless",
      "--dropless_tile=16",
      "--dropless_tile_sizes=1,2",
      "--steps=1",
      "--warmup=1",
      "--batch=2",
      "--seq=16",
    ]
  )
  runs = {r["label"]: r for r in results["runs"]}
  assert list(runs) == [
    "configs/moe_k8.py:tiny dropless sizes=1",
    "configs/moe_k8.py:tiny dropless sizes=2",
  ]
  assert runs["configs/moe_k8.py:tiny dropless sizes=1"]["dropless_tile_sizes"] == [16]
  assert runs["configs/moe_k8.py:tiny dropless sizes=2"]["dropless_tile_sizes"] == [8, 16]
  losses = [r["loss"] for r in runs.values()]
  assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # the same function either way


def test_paper_width_preset_is_the_paper_layer_at_cpu_size():
  args = bench.parse_args(["--suite", "--shapes=paper_width"])
  preset = bench.SHAPES[args.shapes]
  config = bench.load_config(f"{bench.SUITE[0][1]}:{preset['scale']}")
  cfg = bench.bench_model_config(config, "dropless", preset["model"])
  assert (
    cfg.hidden_size,
    cfg.coe.moe_intermediate_size,
    cfg.coe.n_routed_experts,
    cfg.coe.n_shared_experts,
    cfg.num_layers,
    cfg.vocab_size,
    cfg.dtype,
  ) == (1024, 704, 63, 1, 2, 8192, "float32")
  assert (preset["batch"], preset["seq"]) == (1, 512)


def test_profile_step_sums_the_traced_ops_of_each_program_by_kind(tmp_path, capsys):
  from experiments import profile_step

  out = tmp_path / "profile.json"
  results = profile_step.main(
    [
      "--config=configs/coe_c2.py:tiny",
      "--dispatch=capacity,dropless",
      "--dropless_impl=blocked",
      "--batch=1",
      "--seq=32",
      "--warmup=1",
      "--trace_steps=2",
      f"--out={out}",
    ]
  )
  assert json.loads(out.read_text()) == json.loads(json.dumps(results))
  capacity, dropless = results["programs"]
  assert "capacity" in capacity["label"] and "dropless[blocked]" in dropless["label"]
  for program in (capacity, dropless):
    assert program["step_ms"] > 0
    kinds = program["kinds"]
    assert any(kinds.get(k, 0) > 0 for k in ("dot", "ynn_fusion"))  # the matmuls were traced
    assert "while" not in kinds and not any("::" in k or " " in k for k in kinds)
    assert sum(kinds.values()) == pytest.approx(sum(program["ops"].values()))
  # Only the blocked program loops over tiles, slicing each tile's expert weights.
  slicing = lambda kinds: sum(ms for kind, ms in kinds.items() if kind.startswith("dynamic-slice"))
  assert slicing(dropless["kinds"]) > 0 and slicing(capacity["kinds"]) == 0
  table = capsys.readouterr().out
  assert "op kind" in table and "(step wall, in the trace)" in table and "#2 - #1" in table


def test_op_kind_drops_the_instruction_number():
  from experiments.profile_step import op_kind

  assert op_kind("ynn_fusion.12") == "ynn_fusion"
  assert op_kind("dynamic-slice_bitcast_fusion.6") == "dynamic-slice_bitcast_fusion"
  assert op_kind("dot") == "dot"


def test_scan_layers_benchmarks_both_param_layouts_side_by_side(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_FLAGS)
  args = ["--config=configs/moe_k8.py:tiny", "--memory_only", "--batch=2", "--seq=16"]
  results = bench.main([*args, "--scan_layers=false,true"])
  rows = {r["label"]: r for r in results["memory_only"]}
  assert list(rows) == [
    "configs/moe_k8.py:tiny capacity per-layer",
    "configs/moe_k8.py:tiny capacity stacked",
  ]
  assert all(r["compiled_peak_bytes"] > 0 for r in rows.values())
  with pytest.raises(SystemExit, match="--scan_layers: got 'yes'; allowed values: true, false"):
    bench.main([*args, "--scan_layers=yes"])


def test_balanced_routing_draws_k_distinct_experts_per_token_and_keeps_the_routers_weights():
  import jax
  import numpy as np

  x = jax.random.normal(jax.random.key(1), (4, 256, 16)) + 3.0  # a shared component: skewed
  weight = jax.random.normal(jax.random.key(2), (31, 16))
  scaling = dict(norm_topk_prob=True, routed_scaling_factor=2.5)  # as the router would apply
  own = router.route(x, weight, k=4, **scaling)
  drawn = bench.balanced_route(x, weight, k=4, **scaling)
  ids = np.asarray(drawn.expert_ids)
  assert all(len(set(row)) == 4 for row in ids.reshape(-1, 4))
  top = np.take_along_axis(np.asarray(own.probs), ids, axis=-1)
  np.testing.assert_allclose(
    np.asarray(drawn.combine_weights),
    top / (top.sum(-1, keepdims=True) + 1e-20),  # K > 1: normalised, not scaled (reference)
    rtol=1e-5,
    atol=1e-30,
  )
  assert float(drawn.aux_loss) == float(own.aux_loss)  # the losses stay the router's
  loads = [np.bincount(np.asarray(r.expert_ids).ravel(), minlength=31) for r in (own, drawn)]
  mean = 4 * 256 * 4 / 31
  assert loads[1].max() < mean + 5 * mean**0.5  # binomial around the mean
  assert loads[0].max() > loads[1].max()  # the untrained router's own top-K is skewed


def test_bench_with_balanced_routing_drops_less_at_capacity(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_FLAGS)
  args = ["--config=configs/moe_k8.py:tiny", "--batch=2", "--seq=64", "--steps=1", "--warmup=0"]
  dropped = {
    routing: bench.main([*args, f"--routing={routing}"])["runs"][0]["dropped_fraction"]
    for routing in bench.ROUTINGS
  }
  assert dropped["balanced"] < dropped["model"]


def _program(label: str, state_gib: float, temp_gib: float) -> bench.StepBench:
  """A compiled program as `fit_in_host_memory` sees it: only its memory counts."""
  return bench.StepBench(
    label=label,
    model_config=ModelConfig(),
    batch_shape=(1, 8),
    compile_seconds=0.0,
    compiled_peak_bytes=int((state_gib + temp_gib) * 2**30),
    timed=bench.Timed(label, lambda: None),
    last_metrics={},
    make_state=lambda: pytest.fail("a state was allocated"),
    resident_bytes=int(state_gib * 2**30),
    temp_bytes=int(temp_gib * 2**30),
  )


def test_host_memory_needs_the_states_and_the_largest_temporary_buffer(capsys):
  programs = [_program("a", 3, 1), _program("b", 3, 2), _program("c", 3, 8), _program("d", 1, 1)]
  failures = []
  # 16 GiB less the 0.5 GiB margin: a+b take 6 + 2, c would take 9 + 8, d fits (7 + 2).
  kept = bench.fit_in_host_memory(programs, 16 << 30, keep_going=True, failures=failures)
  assert [p.label for p in kept] == ["a", "b", "d"]
  assert [f["label"] for f in failures] == ["c"]
  assert "HostMemory" in failures[0]["error"] and "--dispatch" in failures[0]["error"]
  # The peaks sum to 4 + 5 + 2 = 11 GiB: under the budget, so no warning either.
  assert "warning" not in capsys.readouterr().err
  assert bench.fit_in_host_memory(programs, None, keep_going=False, failures=[]) == programs


def test_host_memory_stops_the_run_naming_the_program_or_warns_when_the_peaks_may_not_fit(capsys):
  programs = [_program("a", 3, 4), _program("b", 3, 3)]
  expected = r"bench: b: HostMemory: .* take 10\.0 GiB, more than the 9\.0 GiB"
  with pytest.raises(SystemExit, match=expected):
    bench.fit_in_host_memory(programs, 9 << 30, keep_going=False, failures=[])
  kept = bench.fit_in_host_memory(programs, 12 << 30, keep_going=False, failures=[])
  assert kept == programs  # 6 + 4 <= 11, but the peaks sum to 13
  assert "warning: the programs' compiled peaks sum to 13.0 GiB" in capsys.readouterr().err


def test_bench_refuses_before_allocating_what_host_memory_cannot_hold(monkeypatch):
  if bench.jax.default_backend() != "cpu":
    pytest.skip("the host-memory check is for CPU runs")
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_FLAGS)
  monkeypatch.setattr(bench.host_memory, "available_bytes", lambda: bench.HOST_MEMORY_MARGIN)
  monkeypatch.setattr(bench.StepBench, "allocate", lambda self: pytest.fail("allocated"))
  args = ["--config=configs/moe_k8.py:tiny", "--steps=1", "--batch=2", "--seq=16"]
  with pytest.raises(SystemExit, match="configs/moe_k8.py:tiny capacity: HostMemory"):
    bench.main(args)


def test_compiled_memory_split_counts_a_donated_state_once():
  jnp = bench.jax.numpy
  state = jnp.zeros((1024,), jnp.float32)  # 4 KiB, donated: aliased by the output
  step = lambda s: (s * 2.0, jnp.sum(s))  # and a 4-byte output
  compiled = bench.jax.jit(step, donate_argnums=0).lower(state).compile()
  resident, temp = bench.metrics_lib.compiled_memory_split(compiled)
  # The state once (8196+ if the aliased output were counted again), the scalar, and at most
  # XLA's table of the output tuple's pointers.
  assert 4096 + 4 <= resident <= 4096 + 4 + 64
  assert temp >= 0
  assert bench.metrics_lib.compiled_memory_bytes(compiled) == resident + temp
