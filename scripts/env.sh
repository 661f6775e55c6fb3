# Source me: activates the venv and the colcon install tree, and keeps ROS traffic on loopback.
_stllm_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$_stllm_dir/paths.sh"
source "$STLLM_VENV/bin/activate"
_stllm_u=$([[ $- == *u* ]] && echo 1 || echo 0); set +u   # colcon's setup.bash reads unset variables
if [ "$STLLM_MODE" = wheels ]; then export AMENT_PREFIX_PATH="$STLLM_VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"; fi
if [ -f "$STLLM_ROOT/install/setup.bash" ]; then source "$STLLM_ROOT/install/setup.bash"; fi
[ "$_stllm_u" = 1 ] && set -u
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export FASTDDS_DEFAULT_PROFILES_FILE="$STLLM_ROOT/config/fastdds_localhost.xml"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$STLLM_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$STLLM_ROOT/install/stllm_ros/lib/stllm_ros:$PATH"
unset _stllm_dir _stllm_u
