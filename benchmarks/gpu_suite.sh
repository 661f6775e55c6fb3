#!/usr/bin/env bash
# Every model-speed figure the README promises, in one command, written to one JSON and one markdown table.
#
#   benchmarks/gpu_suite.sh                 # SUITE_OUT=runs/gpu_suite (default)
#
# On a CUDA machine with the repository and nothing else (its python3 holding a CUDA torch and transformers; no
# set-up, no download): the llava-video-7b preset's shapes with random weights (SigLIP-so400m + Qwen2-7B + the
# official aligner; 32 frames of 384 px, a 50k-point map, a ~40-token question, 64 new tokens), bf16, the eager and
# compiled backends (compiled = static KV cache + torch.compile "reduce-overhead", i.e. CUDA graphs) and TensorRT
# where torch_tensorrt imports, each beside HF LlavaOnevision generate() of the same shapes, with the copy-bandwidth
# and matmul floors measured in the same run: decode tok/s vs the bandwidth floor, time to first token vs its floor,
# end-to-end vs HF, peak GPU memory, warm-up. Under 8 minutes on an H100/H200.
# On a CPU-only machine it runs the same at the smol preset's shapes (the project's venv: source scripts/env.sh),
# fp32 and, where the CPU has AVX-512 BF16 or AMX, bf16; the compiled backend only with SUITE_COMPILE=1 (its
# inductor warm-up is ~70 s a shape on 2 cores).
# Environment: SUITE_OUT (runs/gpu_suite), SUITE_REPEATS (3), SUITE_COMPILE (CPU only: 0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${SUITE_OUT:-runs/gpu_suite}"
REPEATS="${SUITE_REPEATS:-3}"
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/model_*.json  # one run, one table
if [ -f "${STLLM_VENV:-$HOME/.local/share/stllm/venv-kilted-wheels}/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
    source scripts/env.sh >/dev/null
fi
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PY" -c "import torch, transformers" 2>/dev/null || {
    echo "gpu_suite: $PY cannot import torch and transformers; on a CPU machine run make setup first" >&2; exit 2; }
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

bench() {  # bench NAME [bench_model.py options...]
    local name=$1; shift
    echo "== $name: bench_model.py $*"
    "$PY" benchmarks/bench_model.py --repeats "$REPEATS" --compare-hf --json "$OUTDIR/model_$name.json" "$@"
}

if [ "$DEVICE" = cuda ]; then
    backends=eager,compiled
    "$PY" -c "import torch_tensorrt" 2>/dev/null && backends="$backends,tensorrt" || \
        echo "gpu_suite: torch_tensorrt does not import here: TensorRT is not measured"
    bench cuda_bf16 --preset llava-video-7b --device cuda --dtype bfloat16 --backends "$backends"
else
    backends=eager
    [ "${SUITE_COMPILE:-0}" = 1 ] && backends=eager,compiled
    shapes=(--preset smol --device cpu --frames 12 --image-size 64 --points 2048 --new-tokens 32)
    bench cpu_fp32 "${shapes[@]}" --dtype float32 --backends "$backends"
    if grep -q -E 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then
        bench cpu_bf16 "${shapes[@]}" --dtype bfloat16 --backends "$backends"
    else
        echo "gpu_suite: this CPU has no AVX-512 BF16 / AMX: bf16 is not measured"
    fi
fi
"$PY" benchmarks/suite_report.py "$OUTDIR"/model_*.json --json "$OUTDIR/suite.json" --markdown "$OUTDIR/suite.md"
echo "gpu_suite: $OUTDIR/suite.json, $OUTDIR/suite.md"
