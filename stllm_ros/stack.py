"""The one description of the stllm stack, shared by launch/reasoning.launch.py and stllm-run (bare machines without
the `launch` package): which nodes, their names, and the default parameters file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeSpec:
    executable: str  # console script in lib/stllm_ros (what `ros2 run stllm_ros <executable>` starts)
    module: str  # python -m fallback when the console script is not on PATH
    name: str


# The node runs in the robot's namespace (root by default; `namespace:=robot1` / PushRosNamespace / stllm-run
# --namespace), and its default names are relative: stllm/ask, camera/color/image_raw, ... resolve under it.
NODES = (NodeSpec("stllm-reasoner", "stllm_ros.reasoner_node", "stllm_reasoner"),)

# Launch arguments -> node parameters (same names in the launch file and in stllm-run --param).
LAUNCH_ARGUMENTS = {
    "model": ("model", "model name or directory (stllm-smol, tiny-random, or a path)"),
    "backend": ("backend", "eager | compiled | tensorrt"),
    "device": ("device", "cpu | cuda | auto"),
    "image_topic": ("perception.image_topic", "RGB image topic"),
    "camera_info_topic": ("perception.camera_info_topic", "CameraInfo of the RGB image"),
    "depth_topic": ("perception.depth_topic", "depth image topic ('' = none)"),
    "points_topic": ("perception.points_topic", "PointCloud2 map from another mapper ('' = none)"),
    "world_frame": ("perception.world_frame", "fixed frame of poses and the map"),
}


# Replaying a bag: sim time, and lossless delivery (reliable, deep history) unless the user says otherwise; best effort
# (the camera default) drops frames whenever the node lags a few frames behind. User parameters given later win.
REPLAY_PARAMS = {"use_sim_time": True, "perception.sensor_qos": "reliable", "perception.sensor_depth": 100}


def player_arguments(bag: str, rate: float = 1.0, loop: bool = False) -> list[str]:
    """stllm-play's arguments for a replay into the stack: /clock; every topic reliable (the replay parameters subscribe
    reliably, which a best-effort recorded camera topic would not match); wait until the reasoner subscribes (it
    subscribes to all its inputs at once when configured, after the model has loaded: minutes on a first start), then
    let the other topics match, so that no frame is lost."""
    args = [bag, "--rate", str(rate), "--clock", "--reliable", "--wait-for-subscribers", "600", "--any-subscriber",
            "--delay", "2.0"]
    return args + (["--loop"] if loop else [])


def default_params_file() -> Path:
    """config/reasoner.yaml: in the source tree, or in share/stllm_ros/config of an install."""
    here = Path(__file__).resolve()
    for root in (here.parents[1], *here.parents):
        for cand in (root / "config" / "reasoner.yaml", root / "share" / "stllm_ros" / "config" / "reasoner.yaml"):
            if cand.exists():
                return cand
    raise FileNotFoundError("config/reasoner.yaml not found next to stllm_ros; pass --params-file")
