#!/usr/bin/env bash
# The pre-registered headline comparison at CPU scale (experiments/README.md, "Pre-registered:
# the paper's headline at CPU scale"), in one resumable command:
#
#   bash experiments/headline.sh          # pilot -> MoE(K=8) vs CoE(C=2,K=4) -> inner vs outer
#
# 1. Learning-rate pilot: MoE(K=8) only, seed 100, PILOT_STEPS steps per learning rate.
# 2. The headline pair, SEEDS seeds, STEPS steps each, at the pilot's best learning rate.
# 3. Inner vs outer residual at C=2 (K=8), same recipe (skip with RESIDUAL=0).
# Then the tables, figures and verdicts (experiments.ablation) and the routing statistics of
# the final seed-0 models (experiments.analyze_routing) under experiments/results/headline/.
# Every stage skips finished runs and resumes unfinished ones: rerun after any stop.
#
# If the pre-registered rule says 'undecided', EXTRA=1 adds seeds 3 and 4 (the protocol's one
# extension) and writes the 5-seed reading beside the 3-seed one (`$RESULTS/pair_5seeds`, ...).
#
# Environment: SCALE [narrow], STEPS [2000], SEEDS [3], PILOT_STEPS [500], PILOT_LRS
# [1e-3 2e-3 4e-3], DATA [../shared/data/math_qa], TOKENIZER
# [../shared/data/tokenizer/olmoe/tokenizer.json], RUNS [runs/headline], RESIDUAL [1].
set -euo pipefail
cd "$(dirname "$0")/.."

SCALE="${SCALE:-narrow}"
STEPS="${STEPS:-2000}"
SEEDS="${SEEDS:-3}"
PILOT_STEPS="${PILOT_STEPS:-500}"
PILOT_LRS="${PILOT_LRS:-1e-3 2e-3 4e-3}"
DATA="${DATA:-../shared/data/math_qa}"
TOKENIZER="${TOKENIZER:-../shared/data/tokenizer/olmoe/tokenizer.json}"
RUNS="${RUNS:-runs/headline}"
RESULTS="${RESULTS:-experiments/results/headline}"
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"

RECIPE=(--scale="$SCALE" --data="$DATA" --tokenizer="$TOKENIZER" --batch_size=16
        --max_length=256 --packing --eval_every=100 --eval_batch_size=32
        --set=data.trim_vocab=4096 --set=train.schedule=cosine --set=train.paper_val=True
        --set=train.checkpoint_every=250 --set=train.keep_checkpoints=1)

best_lr=""
best_loss=""
mkdir -p "$RESULTS/pilot"
choice="$RESULTS/pilot/choice.txt"
echo "pilot (MoE(K=8) $SCALE, seed 100, $PILOT_STEPS steps, cosine): final pooled val loss by lr" > "$choice.part"
for lr in $PILOT_LRS; do
  "$PYTHON" -m experiments.ablation --suite=moe_k8 --seeds=1 --steps="$PILOT_STEPS" "${RECIPE[@]}" \
    --set=seed=100 --set=train.lr="$lr" --runs_dir="$RUNS/pilot/lr$lr" \
    --results_dir="$RESULTS/pilot/lr$lr"
  loss=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['final_val_loss'])" \
         "$RUNS/pilot/lr$lr/moe_k8/seed0/summary.json")
  echo "pilot: lr $lr -> final val loss $loss"
  "$PYTHON" -c "import sys; print(f'lr {sys.argv[1]}: {float(sys.argv[2]):.4f}')" "$lr" "$loss" >> "$choice.part"
  if [[ -z "$best_loss" ]] || "$PYTHON" -c "import sys; sys.exit(not float(sys.argv[1]) < float(sys.argv[2]))" "$loss" "$best_loss"; then
    best_lr="$lr"; best_loss="$loss"
  fi
done
echo "chosen: $best_lr (lowest)" >> "$choice.part"
mv "$choice.part" "$choice"
echo "pilot: chose lr $best_lr (val loss $best_loss); $choice"

"$PYTHON" -m experiments.ablation --suite=moe_k8,coe_c2 --seeds="$SEEDS" --steps="$STEPS" \
  "${RECIPE[@]}" --set=train.lr="$best_lr" --runs_dir="$RUNS/pair" --results_dir="$RESULTS/pair"
if [[ "${RESIDUAL:-1}" != 0 ]]; then
  "$PYTHON" -m experiments.ablation --suite=coe_c2_k8,coe_c2_k8_outer_residual --seeds="$SEEDS" \
    --steps="$STEPS" "${RECIPE[@]}" --set=train.lr="$best_lr" --runs_dir="$RUNS/residual" \
    --results_dir="$RESULTS/residual"
fi
if [[ "${EXTRA:-0}" != 0 ]]; then  # the protocol's extension: the same runs dirs, 5 seeds
  "$PYTHON" -m experiments.ablation --suite=moe_k8,coe_c2 --seeds=5 --steps="$STEPS" \
    "${RECIPE[@]}" --set=train.lr="$best_lr" --runs_dir="$RUNS/pair" --results_dir="$RESULTS/pair_5seeds"
  if [[ "${RESIDUAL:-1}" != 0 ]]; then
    "$PYTHON" -m experiments.ablation --suite=coe_c2_k8,coe_c2_k8_outer_residual --seeds=5 \
      --steps="$STEPS" "${RECIPE[@]}" --set=train.lr="$best_lr" --runs_dir="$RUNS/residual" \
      --results_dir="$RESULTS/residual_5seeds"
  fi
fi
routed=("$RUNS/pair/moe_k8/seed0" "$RUNS/pair/coe_c2/seed0")
[[ "${RESIDUAL:-1}" != 0 ]] && routed+=("$RUNS/residual/coe_c2_k8/seed0" "$RUNS/residual/coe_c2_k8_outer_residual/seed0")
"$PYTHON" -m experiments.analyze_routing "${routed[@]}" --rows=64 --out="$RESULTS/routing"
