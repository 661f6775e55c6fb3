#!/usr/bin/env bash
# Reproduce models/stllm-smol (the embedded default model) from seed 0, end to end, resumable at every step:
#   1. REA-Sim data: 1200 kitchens x 1 episode of 12 frames at 128x96 px, 20 questions each (val: 48 kitchens never
#      seen in training)
#   2. the model (training/configs/stllm-smol.yaml): encoders + aligner from the initialisation, trained on the
#      language-model loss + the key-term loss, the language model frozen
#   3. the question-only model: the same recipe with data.ablation: blind (nothing of the scene reaches it);
#      QUESTION_ONLY=0 skips it (the rule baseline, always evaluated, is the stronger question-only baseline on REA-Sim)
#   4. export the trained, non-LLM weights + config + tokenizer into models/stllm-smol/
#   5. stllm-eval on the held-out kitchens: the model, its ablations (no video, no points, no camera position), the
#      question-only model and the rule baseline; the table in models/stllm-smol/eval.json
#
# Usage: scripts/train_smol.sh     (2-core CPU: ~75 min each model and question-only model, ~15 min eval)
# Environment: DATA (data/reasim-smol), RUNS (runs), OUT (models/stllm-smol), THREADS (2; torch threads),
#   DEVICE (auto: cuda when available), QUESTION_ONLY (1), SKIP_EVAL (0).
# Interrupted? Rerun: every stage resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh

DATA="${DATA:-data/reasim-smol}"
RUNS="${RUNS:-runs}"
OUT="${OUT:-models/stllm-smol}"
THREADS="${THREADS:-2}"
DEVICE="${DEVICE:-auto}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"

echo "== 1/5 REA-Sim data -> $DATA"
if [ ! -f "$DATA/val.json" ]; then
    stllm-reasim --out "$DATA" --scenes 1200 --clips-per-scene 1 --frames 12 --size 128x96 --questions-per-type 4 \
        --seed 0 --val-fraction 0.04 --no-depth --workers "$THREADS"
fi

# run NAME CONFIG [stllm-train options...]: train (or resume) until the run has exported its model
run() {
    local name=$1 config=$2; shift 2
    if [ ! -f "$RUNS/$name/model/model.safetensors" ]; then
        python -m training.train --config "$config" --train-data "$DATA/train.json" --val-data "$DATA/val.json" \
            --out "$RUNS/$name" --resume "$@"
    fi
}
echo "== 2/5 the model (LM + key-term loss) -> $RUNS/stllm-smol"
run stllm-smol training/configs/stllm-smol.yaml
if [ "${QUESTION_ONLY:-1}" = 1 ]; then
    echo "== 3/5 question-only model (the same recipe, blind) -> $RUNS/stllm-smol-question-only"
    run stllm-smol-question-only training/configs/stllm-smol.yaml --ablation blind
fi

echo "== 4/5 export -> $OUT"
mkdir -p "$OUT"
for f in "$RUNS/stllm-smol"/model/*; do
    case "$(basename "$f")" in
        README.md) cp "$f" "$OUT/TRAINING.md" ;;   # the trainer's run card; README.md is the hand-written model card
        *) cp "$f" "$OUT/" ;;
    esac
done

[ "${SKIP_EVAL:-0}" = 1 ] && exit 0
echo "== 5/5 evaluation on the held-out kitchens"
EVAL="$RUNS/stllm-smol/eval"
mkdir -p "$EVAL"
# every 2nd val record: 480 questions (96 per type) from all 48 held-out kitchens; the ablations on every 2nd of
# those (240, 48 per type; ~1.2 s per question on 2 cores), compared with the model on the same records
python -c "import json, sys; json.dump(json.load(open(sys.argv[1]))[::2], open(sys.argv[2], 'w'))" \
    "$DATA/val.json" "$DATA/val_eval.json"
python -c "import json, sys; json.dump(json.load(open(sys.argv[1]))[::2], open(sys.argv[2], 'w'))" \
    "$DATA/val_eval.json" "$DATA/val_ablate.json"
evaluate() {  # evaluate NAME MODEL DATA [stllm-eval options...]
    local name=$1 model=$2 data=$3; shift 3
    [ -f "$EVAL/$name.json" ] || python -m training.evaluate --model "$model" --data "$data" \
        --out "$EVAL/$name.json" --device "$DEVICE" --max-new-tokens 48 --no-meteor --no-sentence-sim \
        --tokenizer simple --no-progress "$@"
}
evaluate model "$OUT" "$DATA/val_eval.json" --rule-train "$DATA/train.json"
for ablation in no-video no-points no-position; do evaluate "$ablation" "$OUT" "$DATA/val_ablate.json" "--$ablation"; done
[ -f "$RUNS/stllm-smol-question-only/model/model.safetensors" ] && \
    evaluate question-only "$RUNS/stllm-smol-question-only/model" "$DATA/val_eval.json" --blind
python benchmarks/bench_smol.py --summarize "$EVAL" --write "$OUT/eval.json"
