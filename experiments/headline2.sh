#!/usr/bin/env bash
# The second pre-registered headline study (experiments/README.md, "Pre-registered: the second
# headline study"), in one resumable command:
#
#   bash experiments/headline2.sh
#
# 1. MoE(K=8) vs CoE(C=2,K=4) at `narrow`, seeds FIRST_SEED .. FIRST_SEED + N - 1 (10 .. 19: the
#    power calculation's n = 10, `python -m experiments.power`), the first study's recipe and its
#    pilot's learning rate, with issue 29's training-semantics changes held at the first study's
#    values. Seed s of both configs runs before seed s + 1 (both at once, each pinned to its
#    own cores, with CONCURRENT=1: about 1.4x the progress on a 2-core CPU). No extension.
# 2. The table, figures and verdict (experiments.ablation) under $RESULTS/pair.
# 3. Equal training time: both configs' step times side by side on this machine (skipped if
#    $RESULTS/step_seconds.json exists; needs a quiet machine) and the equal-time readings
#    (experiments.equal_time) under $RESULTS/equal_time.
# 4. Both studies read together (experiments.pool_studies, from the two committed claims tables):
#    each on its own, all fifteen seeds pooled as the registered secondary reading, $RESULTS/pooled.
# Every stage skips finished runs and resumes unfinished ones: rerun after any stop.
# Environment: N [10], FIRST_SEED [10], STEPS [2000], LR [4e-3, the first study's pilot],
# DATA [../shared/data/math_qa], TOKENIZER [../shared/data/tokenizer/olmoe/tokenizer.json],
# RUNS [runs/headline2], RESULTS [experiments/results/headline/study2], TIME [1], CONCURRENT [1].
set -euo pipefail
cd "$(dirname "$0")/.."

N="${N:-10}"
FIRST_SEED="${FIRST_SEED:-10}"
STEPS="${STEPS:-2000}"
LR="${LR:-4e-3}"
DATA="${DATA:-../shared/data/math_qa}"
TOKENIZER="${TOKENIZER:-../shared/data/tokenizer/olmoe/tokenizer.json}"
RUNS="${RUNS:-runs/headline2}"
RESULTS="${RESULTS:-experiments/results/headline/study2}"
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
LAST=$((FIRST_SEED + N))

RECIPE=(--scale=narrow --data="$DATA" --tokenizer="$TOKENIZER" --batch_size=16
        --max_length=256 --packing --eval_every=100 --eval_batch_size=32
        --set=data.trim_vocab=4096 --set=train.schedule=cosine --set=train.paper_val=True
        --set=train.checkpoint_every=250 --set=train.keep_checkpoints=1 --set=train.lr="$LR"
        # the first study's training semantics (issue 29 changed these defaults afterwards)
        --set=train.decay_norm_scales=False --set=model.pad_semantics=masked
        --set=data.strip_text=False)

"$PYTHON" -m experiments.ablation --suite=moe_k8,coe_c2 --first_seed="$FIRST_SEED" \
  --seeds="$LAST" --steps="$STEPS" "${RECIPE[@]}" --runs_dir="$RUNS/pair" \
  --results_dir="$RESULTS/pair" --concurrent="${CONCURRENT:-1}"
if [[ "${TIME:-1}" != 0 ]]; then
  [[ -f "$RESULTS/step_seconds.json" ]] || "$PYTHON" -m experiments.equal_time --time \
    --scale=narrow --out="$RESULTS/step_seconds.json"
  "$PYTHON" -m experiments.equal_time --runs_dir="$RUNS/pair" --seeds="$LAST" --scale=narrow \
    --step_seconds="$RESULTS/step_seconds.json" --results_dir="$RESULTS/equal_time"
fi
"$PYTHON" -m experiments.pool_studies --claim="coe_c2 - moe_k8" --out="$RESULTS/pooled" \
  --study="first (seeds 0-4)=experiments/results/headline/pair_5seeds/table.md" \
  --study="second (seeds $FIRST_SEED-$((LAST - 1)))=$RESULTS/pair/table.md"
