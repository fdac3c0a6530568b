#!/usr/bin/env bash
# The whole GPU performance check in one script (< 8 minutes on one H200).
#
# Paper scale (hidden 1024, 4 layers, N=64, 64 x 512 = 32K tokens per step,
# bf16 compute, fp32 params and router): MoE(K=8), CoE(C=2,K=4), CoE(C=2,K=8),
# each with capacity dispatch and every dropless implementation in DROPLESS_IMPL
# (default grouped,blocked,ragged_dot: 12 train steps), timed round-robin in one process,
# plus the matmul probe and the dispatch share of one layer. Prints the table
# last (with each dropless step's wall, CPU-time and compiled-peak ratio to
# its config's capacity step) and writes $OUT/bench.json.
#
#   experiments/gpu_bench.sh                          # the GPU check
#   SCALE=tiny STEPS=2 BATCH=2 SEQ=32 experiments/gpu_bench.sh   # CPU-sized form (tests)
#
# A program that fails to compile or allocate (e.g. ragged_dot's dense lowering out of
# memory), or on CPU to fit in host memory, is reported in the table and the JSON; the
# others still run.
#
# Environment: SCALE (paper|tiny), STEPS (timed steps, default 10), WARMUP (3),
# BATCH / SEQ (default: the configs'), DISPATCH (capacity,dropless),
# DROPLESS_IMPL (grouped,blocked,ragged_dot: the Pallas grouped matmul that 'auto' picks on GPUs,
# the XLA tile loop, XLA's ragged_dot; 'gather' runs every expert on every token:
# 8x the expert work at paper scale, left out by default), DROPLESS_TILE (0 = default; rows per
# tile of grouped and blocked, e.g. 64,128,256 sweeps both),
# DROPLESS_TILE_SIZES (sizes for each expert's last tile; 0 = default, 1 on GPU; e.g. 1,5 runs
# both, PERF.md 21), ROUTING
# (model: the untrained router's skewed loads; balanced: the loads training reaches), LAYER_COST
# (1: also time the dispatch share of one layer), OUT (runs/gpu_bench), PYTHON (the repo .venv python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

SCALE=${SCALE:-paper}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
DISPATCH=${DISPATCH:-capacity,dropless}
DROPLESS_IMPL=${DROPLESS_IMPL:-grouped,blocked,ragged_dot}
DROPLESS_TILE=${DROPLESS_TILE:-0}
DROPLESS_TILE_SIZES=${DROPLESS_TILE_SIZES:-0}
ROUTING=${ROUTING:-model}
LAYER_COST=${LAYER_COST:-1}
OUT=${OUT:-runs/gpu_bench}
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"

backend=$("$PYTHON" -c "import jax; print(jax.default_backend())")
if [[ "$SCALE" == "paper" && "$backend" == "cpu" ]]; then
  echo "gpu_bench.sh: no accelerator (jax backend: cpu); run with SCALE=tiny on CPU" >&2
  exit 2
fi
echo "gpu_bench.sh: backend=$backend scale=$SCALE steps=$STEPS dispatch=$DISPATCH dropless=$DROPLESS_IMPL routing=$ROUTING" >&2
"$PYTHON" -c "import jax; print(jax.devices())" >&2
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >&2 || true
fi

mkdir -p "$OUT"
args=(--suite --scale="$SCALE" --dispatch="$DISPATCH" --steps="$STEPS" --warmup="$WARMUP"
      --dropless_impl="$DROPLESS_IMPL" --dropless_tile="$DROPLESS_TILE"
      --dropless_tile_sizes="$DROPLESS_TILE_SIZES" --routing="$ROUTING"
      --keep_going
      --out="$OUT/bench.json")
[[ "$LAYER_COST" == "1" ]] && args+=(--layer_cost)
[[ -n "${BATCH:-}" ]] && args+=(--batch="$BATCH")
[[ -n "${SEQ:-}" ]] && args+=(--seq="$SEQ")

# The bench prints its table last; keep a copy beside the JSON.
"$PYTHON" -m experiments.bench "${args[@]}" | tee "$OUT/table.txt"
