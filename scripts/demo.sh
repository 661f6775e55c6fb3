#!/usr/bin/env bash
# The main job: start the stllm stack, replay the demo bag (a REA-Sim kitchen clip, generated deterministically on first
# use), and ask one question of each of the five REA types, printing each answer, the expected answer and the timings.
#   scripts/demo.sh [MODEL]   MODEL: a model directory, stllm-smol or tiny-random (default: stllm-smol when its weights
#                             are in models/stllm-smol, else tiny-random, an UNTRAINED model that only shows the plumbing)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$(dirname "${BASH_SOURCE[0]}")/loopback.sh"
cd "$STLLM_ROOT"
say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }

MODEL="${1:-}"
if [ -z "$MODEL" ]; then
  if [ -f models/stllm-smol/model.safetensors ]; then MODEL=stllm-smol; else MODEL=tiny-random; fi
fi
if [ "$MODEL" = tiny-random ]; then
  say "model: tiny-random (random weights; answers are gibberish — it demonstrates the pipeline, not the reasoning)"
else
  say "model: $MODEL"
fi

DEMO=log/demo
BAG=$DEMO/kitchen_demo
if [ ! -f "$BAG/metadata.yaml" ]; then
  say "generating the demo bag (REA-Sim kitchen, seed 7) -> $BAG"
  rm -rf "$DEMO"
  stllm-reasim --out "$DEMO/reasim" --scenes 1 --clips-per-scene 1 --frames 12 --size 256x192 \
    --questions-per-type 1 --seed 7 --workers 1 -q >/dev/null
  stllm-clip2bag "$DEMO/reasim/clips/kitchen_0000_c00" "$BAG" --fps 4 --compress -q
fi

RUNLOG=$DEMO/stack.log
say "starting the stack (stllm-run) and replaying $BAG at 1x; log: $RUNLOG"
EXTRA=()
# the untrained tiny model's greedy answer is empty (one repeated newline): sample so that the plumbing shows text
[ "$MODEL" = tiny-random ] && EXTRA=(--param temperature:=1.0)
# The map is the bag's scene cloud (/scene/points, the clip's reconstruction, as the model was trained on); the bag's
# depth images are not integrated (a dense depth map is not what stllm-smol saw in training).
stllm-run --bag "$BAG" --param "model:=$MODEL" "${EXTRA[@]}" --param perception.points_topic:=/scene/points \
  >"$RUNLOG" 2>&1 &
RUN_PID=$!
trap 'kill -INT $RUN_PID 2>/dev/null || true; wait $RUN_PID 2>/dev/null || true' EXIT

deadline=$((SECONDS + 900))
until grep -q "bag replay finished" "$RUNLOG"; do
  if ! kill -0 $RUN_PID 2>/dev/null || [ $SECONDS -gt $deadline ]; then
    say "the stack did not come up; its log:"; tail -n 40 "$RUNLOG"; exit 1
  fi
  sleep 1
done
say "replay finished; asking one question per REA type"

python - "$BAG" <<'PY'
import json, subprocess, sys
from pathlib import Path

from stllm_core.data import score_answer

bag = Path(sys.argv[1])
records = json.loads(Path(f"{bag}_qa.json").read_text())
seen, failures, right, asked = set(), 0, 0, 0
for rec in records:
    qtype = rec["metadata"]["question_type"]
    if qtype in seen:
        continue
    seen.add(qtype)
    question = rec["conversations"][0]["value"].replace("<image>", "").replace("<pointcloud>", "").strip()
    expected = rec["conversations"][1]["value"]
    out = subprocess.run(["stllm-ask", question, "--json", "--timeout", "180"], capture_output=True, text=True)
    if out.returncode == 2 or not out.stdout.strip():
        print(f"  stllm-ask failed ({out.returncode}): {out.stderr.strip()[-500:]}")
        failures += 1
        continue
    res = json.loads(out.stdout)
    print(f"\n[{qtype}] Q: {question}")
    if res["success"]:
        ok = score_answer(qtype, res["answer"], expected)
        right, asked = right + ok, asked + 1
        print(f"  answer:   {res['answer']}   [{'RIGHT' if ok else 'WRONG'}]")
    else:
        print(f"  refused:  {res['error']}")
        failures += 1
    print(f"  expected: {expected}")
    print(f"  clip {res['num_frames']} frames / {res['num_points']} points; encode {res['encode_ms']:.0f} ms, "
          f"prefill {res['prefill_ms']:.0f} ms, decode {res['decode_ms']:.0f} ms, {res['num_tokens']} tokens")
print(f"\n{right} of {asked} answers right (scored by stllm_core.data.score_answer against the expected answer)")
sys.exit(1 if failures else 0)
PY
say "done"
