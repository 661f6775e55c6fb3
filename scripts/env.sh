# Source me: activates the venv and the colcon install tree (and keeps model loading offline). It leaves your DDS
# settings alone: tests, the demo and CI confine ROS traffic to loopback with scripts/loopback.sh, a robot must not.
_stllm_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$_stllm_dir/paths.sh"
source "$STLLM_VENV/bin/activate"
_stllm_u=$([[ $- == *u* ]] && echo 1 || echo 0); set +u   # colcon's setup.bash reads unset variables
if [ "$STLLM_MODE" = wheels ]; then export AMENT_PREFIX_PATH="$STLLM_VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"; fi
if [ -f "$STLLM_ROOT/install/setup.bash" ]; then source "$STLLM_ROOT/install/setup.bash"; fi
[ "$_stllm_u" = 1 ] && set -u
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$STLLM_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$STLLM_ROOT/install/stllm_ros/lib/stllm_ros:$PATH"
unset _stllm_dir _stllm_u
