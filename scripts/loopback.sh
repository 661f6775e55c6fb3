# Source me (after env.sh) for tests, the demo and CI: ROS 2 discovery and traffic stay on this machine's loopback
# (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, and a Fast DDS profile with UDP on 127.0.0.1 only and 16 MiB shared-memory
# segments so camera frames fit). Never for a robot: a camera or RViz on another computer would see nothing.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export FASTDDS_DEFAULT_PROFILES_FILE="$STLLM_ROOT/config/fastdds_localhost.xml"
