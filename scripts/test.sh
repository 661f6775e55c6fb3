#!/usr/bin/env bash
# The test command (what .ci/run calls): lint, then the test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$(dirname "${BASH_SOURCE[0]}")/loopback.sh"
cd "$STLLM_ROOT"
ruff check .
python -m pytest "$@"
