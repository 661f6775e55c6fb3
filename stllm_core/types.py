"""The data that flows between memory, data, model and ROS adapters.

Conventions (REP-103/105): the world frame is `map` (x forward, y left, z up). Camera poses are world-from-camera
4x4 matrices for the OpenCV optical frame of the camera (x right, y down, z forward). Stamps are float seconds.
Images are RGB uint8 (H, W, 3); depth is float32 metres (H, W), NaN or 0 where invalid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One keyframe: an RGB image with its intrinsics and the camera pose at its stamp."""

    stamp: float  # seconds
    image: np.ndarray  # (H, W, 3) uint8 RGB
    K: np.ndarray  # (3, 3) float64 intrinsics of `image` (pixels)
    T_world_cam: np.ndarray  # (4, 4) float64 world-from-camera (optical frame)
    depth: np.ndarray | None = None  # (H, W) float32 metres, optional


@dataclass(frozen=True)
class Scene:
    """A point-cloud snapshot of the environment in the world frame."""

    points: np.ndarray  # (N, 3) float32 xyz metres
    colors: np.ndarray  # (N, 3) uint8 RGB
    frame_id: str = "map"
    stamp: float = 0.0

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    @staticmethod
    def empty(frame_id: str = "map") -> Scene:
        return Scene(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8), frame_id)


@dataclass(frozen=True)
class Clip:
    """What a question is asked about: frames in time order plus the scene map."""

    frames: tuple[Frame, ...]
    scene: Scene = field(default_factory=Scene.empty)

    @property
    def start(self) -> float:
        return self.frames[0].stamp if self.frames else 0.0

    @property
    def end(self) -> float:
        return self.frames[-1].stamp if self.frames else 0.0

    @property
    def duration(self) -> float:
        return self.end - self.start
