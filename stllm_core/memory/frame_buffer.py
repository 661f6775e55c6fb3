"""FrameBuffer: the recent past as keyframes (image, K, world-from-camera pose, optional depth), bounded, selectable.

Bounds (all enforced on every add; the oldest frames go first):
- `max_frames` frames, `max_age_sec` seconds behind the newest stamp (data time, so bags replay the same way), and
  `max_bytes` of image + depth arrays. A single frame larger than `max_bytes` is refused.
- Frames whose longest side exceeds `max_image_side` (640 px) are stored downscaled (colour INTER_AREA, depth nearest,
  K rescaled): the models read 64-384 px, and 1280x720 RGB-D at full size (6.4 MB a frame) would fit only ~4 s of
  keyframes at 10 Hz in the default 256 MiB; at 640x360 (1.6 MB) the default bounds hold ~16 s.

Poses: a frame enters the buffer only with its pose. Frames whose pose is not known yet go to a bounded pending queue
(`add_pending`) and are moved in by `resolve(pose_lookup)` once `pose_lookup(stamp)` succeeds; those still without a
pose after `pose_timeout_sec` (monotonic wall time since they arrived) are dropped with the cause counted
(``no_pose_<ErrorType>``). A frame is never stored with a guessed pose.

Selection (`select`): the frames of the last `window_sec` seconds, reduced to `num_frames`:
- "uniform": uniform in time, as ST-LLM samples video: `np.linspace` between the first and last frame of the window,
  each target takes the nearest frame not taken yet (no duplicates while enough frames exist).
- "coverage": greedy maximum coverage, as Video-3D-LLM selects frames: each step takes the frame whose depth adds the
  most 0.1 m voxels (world frame) not yet seen; ties and zero-gain steps fall back to uniform order. Without depth in
  the window it falls back to "uniform".
Selected frames are returned in time order.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stllm_core.config import check, check_choice
from stllm_core.errors import InputError
from stllm_core.geometry.poses import check_rigid
from stllm_core.geometry.rays import rescale_intrinsics
from stllm_core.memory.voxels import depth_to_world_points, voxel_keys
from stllm_core.types import Frame

logger = logging.getLogger(__name__)

STRATEGIES = ("uniform", "coverage")


@dataclass
class FrameBufferConfig:
    max_frames: int = 256  # frames held at most
    max_age_sec: float = 60.0  # seconds behind the newest frame's stamp
    max_bytes: int = 256 << 20  # image + depth bytes held at most
    max_image_side: int = 640  # frames larger than this (longest side, px) are stored downscaled, K rescaled (0 = off)
    pose_tolerance_sec: float = 0.05  # how far a frame stamp may be from TF samples (lookup tolerance, seconds)
    pose_timeout_sec: float = 1.0  # how long a pending frame waits for its pose (monotonic seconds)
    max_pending: int = 64  # pending frames held at most (the oldest is dropped)
    coverage_voxel: float = 0.1  # voxel size (m) of the "coverage" selection
    coverage_stride: int = 8  # depth pixels sampled every n rows/cols for coverage
    coverage_max_range: float = 10.0  # depth beyond this (m) ignored by coverage

    def __post_init__(self):
        check(isinstance(self.max_frames, int) and self.max_frames >= 1, "max_frames", self.max_frames, "an int >= 1")
        check(_pos(self.max_age_sec), "max_age_sec", self.max_age_sec, "a positive number of seconds")
        check(isinstance(self.max_bytes, int) and self.max_bytes >= 1, "max_bytes", self.max_bytes, "an int >= 1")
        check(isinstance(self.max_image_side, int) and self.max_image_side >= 0, "max_image_side",
              self.max_image_side, "an int >= 0 (pixels; 0 = store full size)")
        check(_nonneg(self.pose_tolerance_sec), "pose_tolerance_sec", self.pose_tolerance_sec, "seconds >= 0")
        check(_nonneg(self.pose_timeout_sec), "pose_timeout_sec", self.pose_timeout_sec, "seconds >= 0")
        check(
            isinstance(self.max_pending, int) and self.max_pending >= 1, "max_pending", self.max_pending, "an int >= 1"
        )
        check(_pos(self.coverage_voxel), "coverage_voxel", self.coverage_voxel, "a positive size in metres")
        check(
            isinstance(self.coverage_stride, int) and self.coverage_stride >= 1,
            "coverage_stride",
            self.coverage_stride,
            "an int >= 1",
        )
        check(_pos(self.coverage_max_range), "coverage_max_range", self.coverage_max_range, "a positive range (m)")


def _pos(x) -> bool:
    """A positive number of seconds/metres; +inf allowed (no bound)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) and x > 0


def _nonneg(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


@dataclass
class _Pending:
    stamp: float
    image: np.ndarray
    K: np.ndarray
    depth: np.ndarray | None
    received: float  # monotonic seconds


class FrameBuffer:
    """Bounded keyframe memory; thread-safe. See the module docstring for bounds, pending poses and selection."""

    def __init__(self, config: FrameBufferConfig | None = None):
        self.config = config or FrameBufferConfig()
        self._lock = threading.RLock()
        self._stamps: list[float] = []  # sorted
        self._frames: list[Frame] = []  # same order
        self._nbytes = 0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._dropped: collections.Counter[str] = collections.Counter()
        self._counts: collections.Counter[str] = collections.Counter()
        self._coverage_cache: dict[float, np.ndarray] = {}  # stamp -> unique voxel keys (int64)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------- adding

    def add(self, stamp: float, image, K, T_world_cam, depth=None) -> Frame:
        """Store a keyframe with its pose (copies the arrays; they are read-only in the buffer).

        stamp: seconds; image: (H, W, 3) uint8 RGB; K: (3, 3) pixels; T_world_cam: (4, 4) world-from-camera
        (OpenCV optical frame), rigid; depth: optional (H, W) float32 metres (NaN/0 = no measurement).
        A frame with the stamp of one held is replaced; an out-of-order stamp is inserted in place.
        Raises InputError (counted under ``bad_input``) for malformed input; evicts the oldest frames to stay in bounds.
        """
        return self._store(stamp, image, K, T_world_cam, depth, "bad_input")

    def _store(self, stamp, image, K, T_world_cam, depth, bad_cause: str) -> Frame:
        try:
            stamp, image, K, depth = self._check_frame(stamp, image, K, depth)
            T = check_rigid(T_world_cam, f"T_world_cam of the frame at {stamp:.6f} s")
        except InputError:
            with self._lock:
                self._dropped[bad_cause] += 1
            raise
        frame = Frame(stamp=stamp, image=_frozen(image), K=_frozen(K), T_world_cam=_frozen(T), depth=_frozen(depth))
        size = _frame_bytes(frame)
        if size > self.config.max_bytes:
            with self._lock:
                self._dropped["too_large"] += 1
            raise InputError(f"a frame of {size} bytes exceeds max_bytes={self.config.max_bytes}")
        with self._lock:
            i = bisect.bisect_left(self._stamps, stamp)
            if i < len(self._stamps) and self._stamps[i] == stamp:
                self._nbytes -= _frame_bytes(self._frames[i])
                self._frames[i] = frame
                self._coverage_cache.pop(stamp, None)
                self._counts["replaced"] += 1
            else:
                if i < len(self._stamps):
                    self._counts["out_of_order"] += 1
                self._stamps.insert(i, stamp)
                self._frames.insert(i, frame)
            self._nbytes += size
            self._counts["added"] += 1
            self._evict()
        return frame

    def _check_frame(self, stamp, image, K, depth):
        if not isinstance(stamp, (int, float, np.floating, np.integer)) or not math.isfinite(float(stamp)):
            raise InputError(f"frame stamp must be finite seconds; got {stamp!r}")
        stamp = float(stamp)
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise InputError(
                f"frame image at {stamp:.6f} s must be (H, W, 3) uint8 RGB; got {image.shape} {image.dtype}"
            )
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise InputError(f"K of the frame at {stamp:.6f} s must be a finite 3x3 with fx, fy > 0; got {K.tolist()}")
        if depth is not None:
            depth = np.asarray(depth, dtype=np.float32)
            if depth.shape != image.shape[:2]:
                raise InputError(
                    f"depth {depth.shape} of the frame at {stamp:.6f} s does not match image {image.shape[:2]}"
                )
        side = self.config.max_image_side
        H, W = image.shape[:2]
        if side and max(H, W) > side:
            import cv2

            s = side / max(H, W)
            size = (max(1, round(W * s)), max(1, round(H * s)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            K = rescale_intrinsics(K, (W, H), size)
            if depth is not None:
                depth = cv2.resize(depth, size, interpolation=cv2.INTER_NEAREST)
        return stamp, image, K, depth

    def _evict(self) -> None:
        cfg = self.config
        newest = self._stamps[-1]
        while self._frames:
            if len(self._frames) > cfg.max_frames:
                cause = "evicted_count"
            elif newest - self._stamps[0] > cfg.max_age_sec:
                cause = "evicted_age"
            elif self._nbytes > cfg.max_bytes:
                cause = "evicted_bytes"
            else:
                break
            frame = self._frames.pop(0)
            self._stamps.pop(0)
            self._coverage_cache.pop(frame.stamp, None)
            self._nbytes -= _frame_bytes(frame)
            self._dropped[cause] += 1

    # ---------------------------------------------------------------------------------------- pending poses

    def add_pending(self, stamp: float, image, K, depth=None, received: float | None = None) -> None:
        """Queue a frame whose pose is not known yet; `resolve` stores it once its pose is. `received` is the
        monotonic time it arrived (default now). The queue holds `max_pending` frames; the oldest is dropped."""
        try:
            stamp, image, K, depth = self._check_frame(stamp, image, K, depth)
        except InputError:
            with self._lock:
                self._dropped["bad_input"] += 1
            raise
        item = _Pending(stamp, image, K, depth, time.monotonic() if received is None else float(received))
        with self._lock:
            self._pending.append(item)
            while len(self._pending) > self.config.max_pending:
                self._pending.popleft()
                self._dropped["pending_full"] += 1

    def resolve(self, pose_lookup: Callable[[float], np.ndarray], now: float | None = None) -> int:
        """Store every pending frame whose pose `pose_lookup(stamp)` now gives (it raises LookupError when unknown).

        Frames still without a pose `pose_timeout_sec` after they arrived are dropped and counted as
        ``no_pose_<ErrorType>``; a lookup returning a non-rigid matrix drops the frame as ``bad_pose``.
        Returns the number of frames stored.
        """
        now = time.monotonic() if now is None else float(now)
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
        keep, stored = [], 0
        for item in items:
            try:
                T = pose_lookup(item.stamp)
            except LookupError as e:
                if now - item.received >= self.config.pose_timeout_sec:
                    cause = f"no_pose_{type(e).__name__}"
                    with self._lock:
                        self._dropped[cause] += 1
                    self._warn_once(cause, f"frame at {item.stamp:.6f} s dropped: no pose ({e})")
                else:
                    keep.append(item)
                continue
            try:
                self._store(item.stamp, item.image, item.K, T, item.depth, "bad_pose")
                stored += 1
            except InputError as e:
                self._warn_once("bad_pose", f"frame at {item.stamp:.6f} s dropped: {e}")
        with self._lock:
            self._pending.extendleft(reversed(keep))  # frames queued meanwhile stay behind the older ones
            while len(self._pending) > self.config.max_pending:
                self._pending.popleft()
                self._dropped["pending_full"] += 1
        return stored

    def _warn_once(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            logger.warning("%s (further '%s' drops are only counted)", message, cause)

    # ---------------------------------------------------------------------------------------------- selection

    def select(
        self, window_sec: float, num_frames: int, now: float | None = None, strategy: str = "uniform"
    ) -> list[Frame]:
        """Up to `num_frames` frames with stamps in [now - window_sec, now] (now defaults to the newest stamp),
        in time order. See the module docstring for "uniform" and "coverage"."""
        check_choice("strategy", strategy, STRATEGIES)
        if not (isinstance(num_frames, int) and num_frames >= 1):
            raise InputError(f"num_frames must be an int >= 1; got {num_frames!r}")
        if not (isinstance(window_sec, (int, float)) and window_sec >= 0):
            raise InputError(f"window_sec must be seconds >= 0; got {window_sec!r}")
        with self._lock:
            if not self._frames:
                return []
            end = self._stamps[-1] if now is None else float(now)
            lo = bisect.bisect_left(self._stamps, end - window_sec) if math.isfinite(window_sec) else 0
            hi = bisect.bisect_right(self._stamps, end)
            frames = self._frames[lo:hi]
        if len(frames) <= num_frames:
            return list(frames)
        stamps = np.array([f.stamp for f in frames])
        if strategy == "coverage":
            chosen = self._coverage(frames, stamps, num_frames)
        else:
            chosen = uniform_indices(stamps, num_frames)
        return [frames[i] for i in sorted(chosen)]

    def _coverage(self, frames: list[Frame], stamps: np.ndarray, k: int) -> list[int]:
        if not any(f.depth is not None for f in frames):
            with self._lock:
                self._counts["coverage_fallback_uniform"] += 1
            return uniform_indices(stamps, k)
        keys = [self._voxel_keys(f) for f in frames]
        allkeys = np.concatenate(keys)
        _, inverse = np.unique(allkeys, return_inverse=True)
        ids = np.split(inverse, np.cumsum([len(x) for x in keys])[:-1])
        covered = np.zeros(int(inverse.max(initial=-1)) + 1, dtype=bool)
        order = uniform_indices(stamps, len(frames))  # tie-break: earlier in time first
        chosen: list[int] = []
        taken = np.zeros(len(frames), dtype=bool)
        for _ in range(k):
            gains = np.array([(~covered[ids[i]]).sum() if not taken[i] else -1 for i in range(len(frames))])
            best = int(np.argmax(gains))
            if gains[best] <= 0:
                break
            chosen.append(best)
            taken[best] = True
            covered[ids[best]] = True
        if len(chosen) < k:  # nothing new to see: fill uniformly in time among the rest
            rest = [i for i in order if not taken[i]]
            extra = uniform_indices(stamps[rest], k - len(chosen))
            chosen += [rest[j] for j in extra]
        return chosen

    def _voxel_keys(self, frame: Frame) -> np.ndarray:
        with self._lock:
            cached = self._coverage_cache.get(frame.stamp)
        if cached is not None:
            return cached
        keys = np.zeros(0, np.int64)
        if frame.depth is not None:
            cfg = self.config
            xyz = depth_to_world_points(
                frame.depth, frame.K, frame.T_world_cam, cfg.coverage_stride, 0.0, cfg.coverage_max_range
            )
            keys = np.unique(voxel_keys(xyz, cfg.coverage_voxel)[0])
        with self._lock:
            self._coverage_cache[frame.stamp] = keys
        return keys

    # ------------------------------------------------------------------------------------------ introspection

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    @property
    def nbytes(self) -> int:
        """Bytes of image + depth arrays held."""
        with self._lock:
            return self._nbytes

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def frames(self) -> list[Frame]:
        """Every held frame, in time order."""
        with self._lock:
            return list(self._frames)

    def stats(self) -> dict:
        """Fill levels and what was dropped, by cause (plain Python types for diagnostics)."""
        with self._lock:
            cfg = self.config
            return {
                "frames": len(self._frames),
                "max_frames": cfg.max_frames,
                "bytes": self._nbytes,
                "max_bytes": cfg.max_bytes,
                "fill": max(len(self._frames) / cfg.max_frames, self._nbytes / cfg.max_bytes),
                "pending": len(self._pending),
                "oldest_stamp": self._stamps[0] if self._stamps else None,
                "newest_stamp": self._stamps[-1] if self._stamps else None,
                "counts": dict(self._counts),
                "dropped": dict(self._dropped),
            }

    def clear(self) -> None:
        """Forget every frame and pending frame (counters are kept)."""
        with self._lock:
            self._dropped["cleared"] += len(self._frames) + len(self._pending)
            self._stamps, self._frames, self._nbytes = [], [], 0
            self._pending.clear()
            self._coverage_cache.clear()


def uniform_indices(stamps: np.ndarray, k: int) -> list[int]:
    """Indices of `k` of the sorted `stamps` closest to `np.linspace(first, last, k)`, without duplicates.

    Each target takes its nearest free frame (ties to the earlier one). Example: stamps 0, 1, ..., 9 and k = 4
    -> targets 0, 3, 6, 9 -> indices [0, 3, 6, 9].
    """
    n = len(stamps)
    if k >= n:
        return list(range(n))
    targets = np.linspace(stamps[0], stamps[-1], k)
    taken = np.zeros(n, dtype=bool)
    out = []
    for t in targets:
        order = np.argsort(np.abs(stamps - t), kind="stable")
        i = int(next(j for j in order if not taken[j]))
        taken[i] = True
        out.append(i)
    return sorted(out)


def _frozen(a: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return None
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def _frame_bytes(frame: Frame) -> int:
    return int(frame.image.nbytes + (frame.depth.nbytes if frame.depth is not None else 0))
