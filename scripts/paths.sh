# Shared by the scripts: where the venv lives. It cannot live inside the repository: the repository root is the
# package's source directory and CMake refuses exported include paths (numpy's, inside the venv) "prefixed in the
# source directory". Override with STLLM_VENV.
if [ -n "${ROS_DISTRO:-}" ]; then STLLM_MODE=distro; else STLLM_MODE=wheels; fi
STLLM_VENV="${STLLM_VENV:-$HOME/.local/share/stllm/venv-$([ "$STLLM_MODE" = wheels ] && echo kilted-wheels || echo "$ROS_DISTRO")}"
STLLM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export STLLM_MODE STLLM_VENV STLLM_ROOT
