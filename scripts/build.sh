#!/usr/bin/env bash
# colcon build of this package (and tf2_msgs from third_party/ on bare machines), incremental, --symlink-install.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/paths.sh"
cd "$STLLM_ROOT"
# shellcheck disable=SC1091
source "$STLLM_VENV/bin/activate"
if [ "$STLLM_MODE" = wheels ]; then
  export AMENT_PREFIX_PATH="$STLLM_VENV" CMAKE_PREFIX_PATH="$STLLM_VENV"
  paths=(. third_party/tf2_msgs)
else
  paths=(.)
  python -c 'import tf2_msgs' 2>/dev/null || paths+=(third_party/tf2_msgs)
fi
exec 9>"$STLLM_ROOT/.build.lock"; flock 9
colcon --log-base log/colcon build --symlink-install --base-paths "${paths[@]}" \
  --cmake-args -DPython3_EXECUTABLE="$(command -v python)" -DBUILD_TESTING=OFF --event-handlers console_cohesion- summary+ 2>&1 \
  | grep -vE '^\s*$' | tail -n 5
