"""The robot's memory, free of ROS: a transform tree (TransformBuffer), the recent past as keyframes (FrameBuffer) and a
bounded voxel map of the environment (SceneMap). Conventions: REP-103/105 frames, world frame `map`, camera poses are
world-from-camera for the OpenCV optical frame, stamps are float seconds. See docs/memory.md."""

from stllm_core.memory.frame_buffer import STRATEGIES, FrameBuffer, FrameBufferConfig, uniform_indices
from stllm_core.memory.scene_map import SceneMap, SceneMapConfig
from stllm_core.memory.transforms import (
    DisconnectedError,
    ExtrapolationError,
    TransformBuffer,
    TransformLookupError,
    UnknownFrameError,
)

__all__ = [
    "STRATEGIES",
    "DisconnectedError",
    "ExtrapolationError",
    "FrameBuffer",
    "FrameBufferConfig",
    "SceneMap",
    "SceneMapConfig",
    "TransformBuffer",
    "TransformLookupError",
    "UnknownFrameError",
    "uniform_indices",
]
