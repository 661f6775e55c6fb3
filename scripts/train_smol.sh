#!/usr/bin/env bash
# Reproduce models/stllm-smol (the embedded default model) from seed 0, end to end:
#   1. REA-Sim data (100 kitchens x 3 episodes, 12 frames of 128x96 px; val = 15 kitchens never seen in training)
#   2. stllm-train with training/configs/stllm-smol.yaml, 800 + 800 steps (resumable: rerun after an interruption)
#   3. export the trained, non-LLM weights + config + tokenizer into models/stllm-smol/
#   4. stllm-eval on a held-out subset (every EVAL_EVERY-th val record, all val kitchens): the model, --blind,
#      --no-video, --no-points; results JSON per run and the per-type table in models/stllm-smol/eval.json
#
# Usage: scripts/train_smol.sh            (CPU: ~55 min of training on one busy core, ~15 min of evaluation)
# Environment: DATA (data/reasim-smol), RUN (runs/stllm-smol), OUT (models/stllm-smol), EVAL_EVERY (6),
#   THREADS (1; torch threads for training), DEVICE (auto: cuda when available), SKIP_EVAL (0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh

DATA="${DATA:-data/reasim-smol}"
RUN="${RUN:-runs/stllm-smol}"
OUT="${OUT:-models/stllm-smol}"
EVAL_EVERY="${EVAL_EVERY:-6}"
THREADS="${THREADS:-1}"
DEVICE="${DEVICE:-auto}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"

echo "== 1/4 REA-Sim data -> $DATA"
if [ ! -f "$DATA/val.json" ]; then
    python -c "import sys; from stllm_core.data.cli import reasim_main; sys.exit(reasim_main())" \
        --out "$DATA" --scenes 100 --clips-per-scene 3 --frames 12 --size 128x96 --questions-per-type 4 \
        --seed 0 --val-fraction 0.15 --no-depth --workers 1
fi

echo "== 2/4 training -> $RUN"
# Two sessions, as the shipped weights were made: an 800-step cosine schedule, then the same run resumed with the
# schedule extended to 1600 steps (the learning rate restarts at the 1600-step cosine's value at step 800, 2.8e-4).
# Both are resumable: rerun the script after an interruption.
train() { python -m training.train --config training/configs/stllm-smol.yaml --train-data "$DATA/train.json" \
              --val-data "$DATA/val.json" --out "$RUN" --resume "$@"; }
last_step() { local d; d=$(ls "$RUN/checkpoints" 2>/dev/null | sort | tail -1); d=${d#step_}; echo $((10#${d:-0})); }
[ "$(last_step)" -ge 800 ] || train --max-steps 800
[ "$(last_step)" -ge 1600 ] && [ -f "$RUN/model/model.safetensors" ] || train --max-steps 1600

echo "== 3/4 export -> $OUT"
mkdir -p "$OUT"
for f in "$RUN"/model/*; do
    case "$(basename "$f")" in
        README.md) cp "$f" "$OUT/TRAINING.md" ;;   # the trainer's run card; README.md is the hand-written model card
        *) cp "$f" "$OUT/" ;;
    esac
done

[ "${SKIP_EVAL:-0}" = 1 ] && exit 0
echo "== 4/4 evaluation on held-out kitchens"
python - "$DATA" "$EVAL_EVERY" <<'EOF'
import json, sys
data, every = sys.argv[1], int(sys.argv[2])
records = json.load(open(f"{data}/val.json"))
json.dump(records[::every], open(f"{data}/val_eval.json", "w"))
print(f"{len(records[::every])} of {len(records)} val records -> {data}/val_eval.json")
EOF
mkdir -p "$RUN/eval"
for variant in model blind no-video no-points; do
    flag=""; [ "$variant" != model ] && flag="--$variant"
    python -m training.evaluate --model "$OUT" --data "$DATA/val_eval.json" --out "$RUN/eval/$variant.json" $flag \
        --device "$DEVICE" --max-new-tokens 32 --no-meteor --no-sentence-sim --tokenizer simple --no-progress
done
python benchmarks/bench_smol.py --summarize "$RUN/eval" --write "$OUT/eval.json"
