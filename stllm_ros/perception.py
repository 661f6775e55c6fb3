"""Perception: the ROS adapter that feeds stllm_core.memory from camera, depth, point-cloud and TF topics.

`Perception(node, config)` attaches to ANY rclpy node (the reasoner hosts it in-process; `perception_node.py` hosts it
standalone). It owns no node and never spins: the host's executor runs its callbacks.

Threads and work:
- Subscription callbacks only convert the message to numpy (vectorised, ~1 ms for 640x480) and put it on a bounded
  queue; when the queue is full the OLDEST item is dropped and counted (`dropped["queue_full"]`).
- TF callbacks validate each transform and insert it into the TransformBuffer (cheap, as tf2_ros does), which
  follows tf2: a late sample is inserted in stamp order (only one older than `tf_cache_sec` is dropped), a frame may
  change parent (each sample keeps its parent), a transform closing a cycle is refused (`bad_input["tf_rejected"]`).
- One worker thread looks up T_world_cam at each image/depth/cloud stamp (an item whose pose is not known yet is kept
  pending, never given a guessed pose, until sensor data `pose_wait_sec` newer than it has arrived: waits are in the
  camera's time, so a machine too loaded to deliver TF on time, which delays the images as much, does not lose frames;
  `pose_wait_wall_sec` bounds the wait when no newer data comes), adds keyframes to the
  FrameBuffer, integrates depth/points into the SceneMap and publishes the map.
- Depth: at most one depth image per `depth_period_sec` (10 Hz) is decoded and integrated: a 640x480 frame costs
  8-12 ms at stride 4, so 30 Hz depth alone would take a third of a core from the model.
- Keyframes: at most one image per `keyframe_period_sec` is stored (skipped ones are not even converted unless
  depth needs them for colour). Depth is coloured by the colour image of the same camera within `color_match_sec`
  (aligned depth, e.g. RealSense aligned_depth_to_color); with `attach_depth` the keyframe of that stamp is re-stored
  with its full-size depth, which the FrameBuffer's "coverage" selection uses.
- Camera models: each image's rays come from its CameraInfo as image_proc defines it: raw images (image_raw) with a
  non-zero D are undistorted into pinhole images with P's intrinsics (OpenCV, maps built once per CameraInfo; depth
  by nearest sample), `image_rectified: true` takes rectified images (image_rect) with P as they are
  (stllm_core.geometry.camera).
- Transports: raw Image, or with `image_transport: compressed` / `depth_transport: compressedDepth` the
  CompressedImage topics image_transport names `<topic>/compressed` and `<depth_topic>/compressedDepth`.
- Time going backwards clears the TF history and keyframes (static TF and the map are kept) instead of rejecting
  everything after it: the node's clock jumping back by any amount (with use_sim_time: a bag replayed in a loop with
  /clock, a sim reset; tf2_ros' Buffer clears on the same event), or image or /tf stamps jumping back by more than
  `time_jump_reset_sec` (the same without /clock).

QoS: camera topics use `sensor_qos` ("sensor_data" = best effort, depth 5, matches both best-effort and reliable
publishers; "reliable" only matches reliable publishers but never loses a frame on the wire). Large frames over DDS
between processes need the SHM profile in config/fastdds_localhost.xml with best effort (see the README, "DDS").
/tf is reliable volatile depth 100, /tf_static reliable transient-local depth 100 (as tf2_ros), the map is reliable
transient-local depth 1 (RViz late joiners get it), /diagnostics reliable depth 10. The points subscription's durability
is `points_durability`: "auto" (default) adapts to the publishers present when perception starts, as `ros2 topic echo`
does: reliable transient local when they all offer it (a latched map, or `ros2 bag play` of a recorded latched topic,
reaches this late subscriber), else the sensor QoS (a live mapper's volatile cloud, which a transient-local reader would
not match).

Bad input never crashes and never yields a wrong pose: each cause is counted in `stats()["bad_input"]` (the item is
dropped) and logged at most once per `log_throttle_sec` per cause with the running count. An image, depth image or
cloud with a zero header stamp is such bad input (`no_stamp`): it cannot be placed in time, and a TF lookup at stamp 0
would mean "latest" (tf2), a guess for a message that may be older.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import JumpThreshold
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from stllm_core.config import check, check_choice, from_dict, is_frame_id, is_ros_name
from stllm_core.errors import ConfigError, InputError
from stllm_core.geometry.camera import CameraModel, Pinhole
from stllm_core.memory import FrameBuffer, FrameBufferConfig, SceneMap, SceneMapConfig, TransformBuffer
from stllm_core.types import Clip, Frame
from stllm_ros import conversions as cv

try:  # built by the integrator from third_party/ on bare machines; the real one on a ROS distro
    from tf2_msgs.msg import TFMessage
except ImportError:  # pragma: no cover - depends on the install
    TFMessage = None


@dataclass
class PerceptionConfig:
    """Topics, frames and bounds of Perception. Empty topic = that input is disabled. Times in seconds."""

    image_topic: str = "camera/color/image_raw"  # RGB image (rgb8, bgr8, rgba8, bgra8, mono8)
    camera_info_topic: str = "camera/color/camera_info"  # CameraInfo of the image (K)
    depth_topic: str = ""  # depth image (16UC1 mm or 32FC1 m), best aligned to the colour image
    depth_info_topic: str = ""  # CameraInfo of an unaligned depth image ("" = the colour CameraInfo); unaligned depth
    # has no colour image of its size and frame: set depth_requires_color false to integrate it in map.default_color
    points_topic: str = ""  # PointCloud2 from another mapper (nvblox, RTAB-Map), any frame with TF to world
    tf_topic: str = "/tf"  # tf2_msgs/TFMessage, dynamic transforms
    tf_static_topic: str = "/tf_static"  # tf2_msgs/TFMessage, static transforms (transient local)
    map_topic: str = "stllm/map"  # "" disables publishing
    diagnostics_topic: str = "/diagnostics"  # "" disables
    world_frame: str = "map"  # fixed frame of the poses and the map (REP-105); prefixed ids (robot1/map) are fine
    camera_frame: str = ""  # "" = the image header's frame_id (the optical frame, REP-103)
    image_transport: str = "raw"  # "raw" (Image on image_topic) | "compressed" (CompressedImage on <topic>/compressed)
    depth_transport: str = "raw"  # "raw" (Image on depth_topic) | "compressedDepth" (on <depth_topic>/compressedDepth)
    image_rectified: bool = False  # true: rectified images (image_rect), rays from P; false: raw, undistorted if D != 0
    sensor_qos: str = "sensor_data"  # "sensor_data" (best effort) | "reliable"
    sensor_depth: int = 5  # history of the image/info/depth/points subscriptions (5 = the sensor-data profile)
    points_durability: str = "auto"  # "auto" (the publishers' when perception starts) | "volatile" | "transient_local"
    queue_size: int = 8  # converted messages waiting for the worker; drop-oldest beyond
    max_pending: int = 32  # items waiting for their TF; drop-oldest beyond
    pose_wait_sec: float = 0.5  # camera time an item waits for its TF (dropped once data this much newer arrived)
    pose_wait_wall_sec: float = 5.0  # and at most this much wall time when no newer sensor data comes
    keyframe_period_sec: float = 0.1  # keep at most one image per period (0 = every image); 10 Hz keeps ~25 s
    # of 640x480 history in the default FrameBuffer bounds (256 frames, 256 MiB) where 30 Hz would keep ~8 s
    depth_period_sec: float = 0.1  # integrate at most one depth image per period (0 = every one; ~10 ms per 640x480)
    depth_stride: int = 4  # integrate every n-th depth pixel in both directions
    color_match_sec: float = 0.02  # a colour image this close in time to a depth image colours it
    depth_requires_color: bool = True  # drop depth that has no colour image (else integrate it in default_color)
    attach_depth: bool = True  # keep a depth image with the keyframe of the same stamp ("coverage" selection)
    tf_cache_sec: float = 10.0  # seconds of TF history kept
    time_jump_reset_sec: float = 3.0  # a stamp this much older than the last one = clock reset (bag loop): clear
    publish_map_period: float = 2.0  # 0 disables periodic map publishing
    diagnostics_period: float = 1.0  # 0 disables diagnostics
    log_throttle_sec: float = 30.0  # one warning per cause per this many seconds
    map_path: str = ""  # load the map from here at start (if present) and save it on close
    buffer: FrameBufferConfig = field(default_factory=FrameBufferConfig)
    map: SceneMapConfig = field(default_factory=SceneMapConfig)

    def __post_init__(self) -> None:
        if isinstance(self.buffer, dict):
            self.buffer = from_dict(FrameBufferConfig, self.buffer, "PerceptionConfig.buffer")
        if isinstance(self.map, dict):
            self.map = from_dict(SceneMapConfig, self.map, "PerceptionConfig.map")
        check(bool(self.image_topic), "image_topic", self.image_topic, "a topic name")
        check(bool(self.camera_info_topic), "camera_info_topic", self.camera_info_topic, "a topic name")
        frame_id = "a tf2 frame id such as 'map' or 'robot1/map' (no leading '/', no spaces)"
        check(is_frame_id(self.world_frame), "world_frame", self.world_frame, frame_id)
        check(self.camera_frame == "" or is_frame_id(self.camera_frame), "camera_frame", self.camera_frame,
              frame_id + " or '' (the image's)")
        for name in ("image_topic", "camera_info_topic", "depth_topic", "depth_info_topic", "points_topic", "tf_topic",
                     "tf_static_topic", "map_topic", "diagnostics_topic"):
            value = getattr(self, name)
            check(value == "" or is_ros_name(value), name, value,
                  "a ROS topic name (relative names resolve in the node's namespace) or ''")
        check_choice("sensor_qos", self.sensor_qos, ("sensor_data", "reliable"))
        check_choice("image_transport", self.image_transport, ("raw", "compressed"))
        check_choice("depth_transport", self.depth_transport, ("raw", "compressedDepth"))
        check(isinstance(self.image_rectified, bool), "image_rectified", self.image_rectified, "true or false")
        check_choice("points_durability", self.points_durability, ("auto", "volatile", "transient_local"))
        for name in ("queue_size", "max_pending", "depth_stride", "sensor_depth"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        for name in (
            "pose_wait_sec",
            "pose_wait_wall_sec",
            "keyframe_period_sec",
            "depth_period_sec",
            "publish_map_period",
            "diagnostics_period",
            "color_match_sec",
        ):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and value >= 0, name, value, "a number >= 0")
        for name in ("tf_cache_sec", "time_jump_reset_sec", "log_throttle_sec"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and value > 0, name, value, "a number > 0")
        if self.map.frame_id != self.world_frame:  # the map is built in world_frame by construction
            self.map = dataclasses.replace(self.map, frame_id=self.world_frame)


# ------------------------------------------------------------------------------------------------ Perception


@dataclass
class _Item:
    kind: str  # "image" | "depth" | "points"
    stamp: float
    frame_id: str
    data: Any  # image: (rgb, K); depth: (depth, K); points: (xyz, rgb)
    t_enqueued: float = field(default_factory=time.monotonic)


def _qos(reliable: bool, depth: int, transient: bool = False) -> QoSProfile:
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if transient else DurabilityPolicy.VOLATILE,
    )


def points_transient_local(durability: str, offered: list[QoSProfile]) -> bool:
    """Whether the points subscription is reliable transient local (else the sensor QoS): `durability` ("auto" |
    "volatile" | "transient_local"), `offered` the QoS of the topic's publishers. "auto": when there are publishers and
    they all offer reliable transient local (the late-joiner history is delivered over the reliable protocol; a reliable
    reader would not match a best-effort writer)."""
    if durability != "auto":
        return durability == "transient_local"
    return bool(offered) and all(q.durability == DurabilityPolicy.TRANSIENT_LOCAL
                                 and q.reliability == ReliabilityPolicy.RELIABLE for q in offered)


class Perception:
    """Subscriptions + TF feeding + a worker thread that fills FrameBuffer/SceneMap; map and diagnostics publishing.

    perception = Perception(node, PerceptionConfig(image_topic=..., world_frame="map"))
    clip = perception.clip(window_sec=10.0, num_frames=8)   # frames (with T_world_cam) + map snapshot
    perception.close()
    """

    def __init__(self, node: Node, config: PerceptionConfig | None = None):
        if TFMessage is None:
            raise ConfigError(
                "tf2_msgs is not importable; build the workspace (scripts/build.sh) and source scripts/env.sh "
                "(on a ROS distro, install ros-<distro>-tf2-msgs)."
            )
        self.node = node
        self.config = config = config or PerceptionConfig()
        self._log = node.get_logger()
        self._lock = threading.RLock()  # counters, camera info, last stamps, frame buffer
        self._tf_lock = threading.RLock()  # TransformBuffer + TF bookkeeping
        self._queue: collections.deque[_Item] = collections.deque()
        self._queue_cv = threading.Condition(threading.Lock())
        self._stop = threading.Event()

        self.transforms = TransformBuffer(cache_sec=config.tf_cache_sec)
        self.frames = FrameBuffer(config.buffer)
        self.scene_map = SceneMap(config.map)

        self._counts: collections.Counter[str] = collections.Counter()  # received / added / integrated
        self._dropped: collections.Counter[str] = collections.Counter()  # items lost with a cause
        self._bad: collections.Counter[str] = collections.Counter()  # bad input by cause
        self._last_logged: dict[str, float] = {}
        self._info: dict[str, CameraModel] = {}  # topic kind ("color", "depth") -> its latest CameraInfo
        self._last_image_stamp: float | None = None
        self._last_keyframe_stamp: float | None = None
        self._last_depth_stamp: float | None = None
        self._colors: collections.deque[tuple[float, str, np.ndarray]] = collections.deque(maxlen=8)  # to colour depth
        # (stamp, camera frame, rgb, K, T_world_cam) of the last keyframes, to attach depth to them
        self._recent: collections.deque[tuple[float, str, np.ndarray, np.ndarray, np.ndarray]] = collections.deque(
            maxlen=8
        )
        self._tf_last_stamp: dict[str, float] = {}
        self._static_tf: dict[str, tuple] = {}
        self._tf_version = 0
        self._tf_last_rx: float | None = None
        self._last_pose_error = ""
        self._map_version = 0
        self._map_published_version = -1
        self._next_map_publish = 0.0
        self._save_map_on_close = bool(config.map_path)
        if config.map_path:
            self._load_map(config.map_path)

        sensor = _qos(config.sensor_qos == "reliable", config.sensor_depth)  # depth 5 best effort = sensor data
        sensors, tf_group = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
        # image_transport's naming: the base topic resolved (namespace, remap rules), then the transport's suffix
        image = ((CompressedImage, node.resolve_topic_name(config.image_topic) + "/compressed")
                 if config.image_transport == "compressed" else (Image, config.image_topic))
        depth = ((CompressedImage, node.resolve_topic_name(config.depth_topic) + "/compressedDepth")
                 if config.depth_transport == "compressedDepth" and config.depth_topic else (Image, config.depth_topic))
        subs = [
            (*image, self._on_image, sensor, sensors),
            (CameraInfo, config.camera_info_topic, self._on_color_info, sensor, sensors),
            (TFMessage, config.tf_topic, self._on_tf, _qos(True, 100), tf_group),
            (TFMessage, config.tf_static_topic, self._on_tf_static, _qos(True, 100, transient=True), tf_group),
            (*depth, self._on_depth, sensor, sensors),
            (CameraInfo, config.depth_info_topic, self._on_depth_info, sensor, sensors),
            (PointCloud2, config.points_topic, self._on_points, self._points_qos(node, sensor), sensors),
        ]
        self._subs = [
            node.create_subscription(msg_type, topic, callback, qos, callback_group=group)
            for msg_type, topic, callback, qos, group in subs
            if topic
        ]
        self._map_pub = None
        if config.map_topic:
            self._map_pub = node.create_publisher(PointCloud2, config.map_topic, _qos(True, 1, transient=True))
        self._diag_pub = None
        self._diag_timer = None
        if config.diagnostics_topic and config.diagnostics_period > 0:
            self._diag_pub = node.create_publisher(DiagnosticArray, config.diagnostics_topic, _qos(True, 10))
            self._diag_timer = node.create_timer(
                config.diagnostics_period, self.publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup()
            )
        # as tf2_ros' Buffer does: the node's clock jumping back (a bag replayed in a loop with /clock, a sim reset)
        # clears the time-indexed state, whatever the size of the jump
        self._jump = node.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1), on_clock_change=False),
            post_callback=self._on_clock_jump)
        self._worker = threading.Thread(target=self._run, name="stllm-perception", daemon=True)
        self._worker.start()
        subscribed = ", ".join(f"{sub.topic_name} ({sub.msg_type.__name__})" for sub in self._subs)
        self._log.info(f"perception: world={config.world_frame} qos={config.sensor_qos}; subscribed to {subscribed}")

    # ------------------------------------------------------------------------------------------ public API

    def clip(self, window_sec: float, num_frames: int, strategy: str = "uniform", now: float | None = None) -> Clip:
        """The last `window_sec` s as up to `num_frames` keyframes (time order, poses in world_frame) + map snapshot."""
        with self._lock:
            frames = self.frames.select(window_sec, num_frames, now=now, strategy=strategy)
        return Clip(frames=tuple(frames), scene=self.scene_map.snapshot())

    def latest_frame(self) -> Frame | None:
        with self._lock:
            frames = self.frames.frames()
        return frames[-1] if frames else None

    def stats(self) -> dict[str, Any]:
        """Counters and fill levels (plain Python types): what arrived, what is held, what was dropped and why."""
        with self._lock:
            out = {
                "counts": dict(self._counts),
                "dropped": dict(self._dropped),
                "bad_input": dict(self._bad),
                "buffer": self.frames.stats(),
                "last_image_stamp": self._last_image_stamp,
                "last_pose_error": self._last_pose_error,
            }
        with self._queue_cv:
            out["queued"] = len(self._queue)
        out["pending"] = self._pending_count
        out["map"] = self.scene_map.stats()
        with self._tf_lock:
            dynamic = [s for c, s in self._tf_last_stamp.items() if c not in self._static_tf]
            held = self.transforms.stats()
            out["tf"] = {
                "frames": held["static_edges"] + held["dynamic_edges"],  # frames with a parent
                "static": len(self._static_tf),
                "latest_stamp": max(dynamic) if dynamic else None,
                "last_rx_age_sec": None if self._tf_last_rx is None else time.monotonic() - self._tf_last_rx,
                "counters": self.transforms.counters(),  # out_of_order, parent_change, ... since the last reset
            }
        return out

    def idle(self) -> bool:
        """True when nothing is queued or pending (all that arrived has been handled)."""
        with self._queue_cv:
            queued = len(self._queue)
        return queued == 0 and self._pending_count == 0 and not self._busy

    def close(self) -> None:
        """Stop the worker, remove subscriptions/publishers/timers from the node, save the map if map_path is set."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._jump.unregister()
        with self._queue_cv:
            self._queue_cv.notify_all()
        self._worker.join(10.0)
        for sub in self._subs:
            self.node.destroy_subscription(sub)
        self._subs = []
        if self._diag_timer is not None:
            self.node.destroy_timer(self._diag_timer)
        for pub in (self._map_pub, self._diag_pub):
            if pub is not None:
                self.node.destroy_publisher(pub)
        if self.config.map_path and self._save_map_on_close:
            try:
                self.scene_map.save(self.config.map_path)
                self._log.info(f"perception: map saved to {self.config.map_path} ({len(self.scene_map)} voxels)")
            except Exception as e:  # a failed save must not hide the shutdown
                self._log.error(f"perception: could not save the map to {self.config.map_path}: {e}")

    # ------------------------------------------------------------------------------------ bad-input accounting

    def _bad_input(self, cause: str, message: str) -> None:
        with self._lock:
            self._bad[cause] += 1
            n = self._bad[cause]
            now = time.monotonic()
            last = self._last_logged.get(cause)
            should_log = last is None or now - last >= self.config.log_throttle_sec
            if should_log:
                self._last_logged[cause] = now
        if should_log:
            self._log.warning(f"perception: {cause}: {message} (seen {n} time(s); throttled)")

    def _drop(self, cause: str, n: int = 1) -> None:
        with self._lock:
            self._dropped[cause] += n

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    # ---------------------------------------------------------------------------------------------- callbacks

    def _enqueue(self, item: _Item) -> None:
        with self._queue_cv:
            self._newest_stamp = max(self._newest_stamp, item.stamp)
            if len(self._queue) >= self.config.queue_size:
                self._queue.popleft()
                self._drop("queue_full")
            self._queue.append(item)
            self._queue_cv.notify()

    def _on_color_info(self, msg: CameraInfo) -> None:
        self._store_info("color", msg)

    def _on_depth_info(self, msg: CameraInfo) -> None:
        self._store_info("depth", msg)

    def _store_info(self, kind: str, msg: CameraInfo) -> None:
        try:
            model = cv.camera_info_to_model(msg)
        except InputError as e:
            self._bad_input("bad_camera_info", str(e))
            return
        with self._lock:
            self._info[kind] = model
            self._counts["camera_info_received"] += 1

    def _camera(self, kind: str, width: int, height: int, cause: str) -> Pinhole | None:
        """The pinhole view (K, undistortion) of the latest CameraInfo of `kind` for an image of this size."""
        with self._lock:
            info = self._info.get(kind) or (self._info.get("color") if kind == "depth" else None)
        if info is None:
            self._drop(f"no_camera_info_{kind}")
            return None
        if (info.width, info.height) != (width, height):
            self._bad_input(cause, f"{kind} image is {width}x{height} but its CameraInfo says "
                                   f"{info.width}x{info.height}")
            return None
        return info.pinhole(self.config.image_rectified)

    def _stamp(self, msg, what: str) -> float | None:
        """The header stamp in seconds, or None (counted as bad input `no_stamp`) when it is zero (unset)."""
        stamp = cv.stamp_to_sec(msg.header.stamp)
        if stamp == 0.0:
            self._bad_input("no_stamp", f"{what} with a zero header stamp: it cannot be placed in time (dropped)")
            return None
        return stamp

    def _points_qos(self, node, sensor: QoSProfile) -> QoSProfile:
        topic = self.config.points_topic
        offered = []
        if topic and self.config.points_durability == "auto":
            offered = [info.qos_profile for info in node.get_publishers_info_by_topic(node.resolve_topic_name(topic))]
        if not points_transient_local(self.config.points_durability, offered):
            return sensor
        return _qos(True, self.config.sensor_depth, transient=True)

    def _on_image(self, msg: Image | CompressedImage) -> None:
        self._count("images_received")
        stamp = self._stamp(msg, "image")
        if stamp is None:
            return
        frame_id = self.config.camera_frame or msg.header.frame_id.lstrip("/")
        if not frame_id:
            self._bad_input("no_frame_id", "image without header.frame_id and no camera_frame configured")
            return
        with self._lock:
            last = self._last_image_stamp
        if last is not None and stamp <= last:
            if last - stamp > self.config.time_jump_reset_sec:
                self._reset(f"image stamp jumped back {last - stamp:.3f} s (bag loop or clock reset)")
            else:
                self._bad_input("image_out_of_order", f"image stamp {stamp:.6f} <= previous {last:.6f}")
                return
        with self._lock:
            self._last_image_stamp = stamp
            kf = self._last_keyframe_stamp
        period = self.config.keyframe_period_sec
        keyframe = period <= 0 or kf is None or stamp - kf >= period
        if not keyframe and not self.config.depth_topic:  # not needed to colour depth either: skip before converting
            self._count("images_skipped_keyframe_period")
            return
        compressed = isinstance(msg, CompressedImage)
        if not compressed and msg.encoding not in cv.COLOR_ENCODINGS:
            self._bad_input("bad_encoding", f"image encoding {msg.encoding!r} on {self.config.image_topic}")
            return
        if not compressed:  # the size is known before decoding: refuse a mismatch without converting
            camera = self._camera("color", int(msg.width), int(msg.height), "image_info_size_mismatch")
            if camera is None:
                return
        try:
            rgb = cv.compressed_to_rgb(msg) if compressed else cv.image_to_rgb(msg)
        except InputError as e:
            self._bad_input("bad_image", str(e))
            return
        if compressed:
            camera = self._camera("color", int(rgb.shape[1]), int(rgb.shape[0]), "image_info_size_mismatch")
            if camera is None:
                return
        rgb, K = camera.image(rgb), camera.K  # a pinhole image (undistorted when its CameraInfo says distorted)
        if self.config.depth_topic:
            with self._lock:
                self._colors.append((stamp, frame_id, rgb))
        if not keyframe:
            self._count("images_skipped_keyframe_period")
            return
        with self._lock:
            self._last_keyframe_stamp = stamp
        self._enqueue(_Item("image", stamp, frame_id, (rgb, K)))

    def _on_depth(self, msg: Image | CompressedImage) -> None:
        self._count("depth_received")
        stamp = self._stamp(msg, "depth image")
        if stamp is None:
            return
        frame_id = self.config.camera_frame or msg.header.frame_id.lstrip("/")
        if not frame_id:
            self._bad_input("no_frame_id", "depth image without header.frame_id and no camera_frame configured")
            return
        with self._lock:
            last = self._last_depth_stamp
            period = self.config.depth_period_sec
            if period > 0 and last is not None and 0 <= stamp - last < period:
                self._counts["depth_skipped_period"] += 1
                return  # before decoding: skipped depth costs nothing
            self._last_depth_stamp = stamp
        compressed = isinstance(msg, CompressedImage)
        if not compressed and msg.encoding not in cv.DEPTH_ENCODINGS:
            self._bad_input("bad_depth_encoding", f"depth encoding {msg.encoding!r} on {self.config.depth_topic}")
            return
        if not compressed:  # the size is known before decoding: refuse a mismatch without converting
            camera = self._camera("depth", int(msg.width), int(msg.height), "depth_info_size_mismatch")
            if camera is None:
                return
        try:
            depth = cv.compressed_depth_to_metres(msg) if compressed else cv.image_to_depth(msg)
        except InputError as e:
            self._bad_input("bad_depth", str(e))
            return
        if compressed:
            camera = self._camera("depth", int(depth.shape[1]), int(depth.shape[0]), "depth_info_size_mismatch")
            if camera is None:
                return
        depth, K = camera.depth(depth), camera.K  # pinhole depth (undistorted nearest when its CameraInfo says so)
        finite = np.isfinite(depth)
        if not finite.all():
            n_inf = int(np.count_nonzero(np.isinf(depth)))
            if n_inf:  # REP-117: -Inf = too near, +Inf = too far: out of range, no measurement, not bad input
                self._count("depth_inf_pixels", n_inf)
            depth[~finite] = np.nan
        if not (finite & (depth > 0)).any():
            self._drop("depth_empty")
            return
        self._enqueue(_Item("depth", stamp, frame_id, (depth, K)))

    def _on_points(self, msg: PointCloud2) -> None:
        self._count("clouds_received")
        stamp = self._stamp(msg, "PointCloud2")
        if stamp is None:
            return
        frame_id = msg.header.frame_id.lstrip("/")
        if not frame_id:
            self._bad_input("no_frame_id", "PointCloud2 without header.frame_id")
            return
        try:
            xyz, rgb = cv.pointcloud2_to_xyz_rgb(msg)
        except InputError as e:
            self._bad_input("bad_cloud", str(e))
            return
        if xyz.shape[0] == 0:
            self._drop("cloud_empty")
            return
        if rgb is None:
            rgb = np.full(xyz.shape, 128, np.uint8)
        self._enqueue(_Item("points", stamp, frame_id, (xyz, rgb)))

    def _on_tf(self, msg) -> None:
        self._add_transforms(msg, static=False)

    def _on_tf_static(self, msg) -> None:
        self._add_transforms(msg, static=True)

    def _add_transforms(self, msg, static: bool) -> None:
        for tmsg in msg.transforms:
            try:
                parent, child, stamp, t, q = cv.transform_from_msg(tmsg)
            except InputError as e:
                self._bad_input("tf_bad_quaternion" if "quaternion" in str(e) else "tf_invalid", str(e))
                continue
            with self._tf_lock:
                last = self._tf_last_stamp.get(child)
                # far behind the newest sample of its frame: a clock reset (bag loop). A sample less late is inserted
                # in order by the buffer; a zero stamp is no clock (the buffer drops it when older than its cache)
                if not static and stamp > 0 and last is not None and last - stamp > self.config.time_jump_reset_sec:
                    self._reset(f"TF {parent} -> {child} jumped back {last - stamp:.3f} s (bag loop or clock reset)")
                try:
                    self.transforms.set_transform(parent, child, stamp, t, q, static=static)
                except (InputError, ValueError, LookupError) as e:
                    error = str(e)
                else:
                    error = ""
                    newest = self._tf_last_stamp.get(child)
                    self._tf_last_stamp[child] = stamp if static or newest is None else max(newest, stamp)
                    if static:
                        self._static_tf[child] = (parent, child, stamp, t, q)
                    else:
                        self._static_tf.pop(child, None)  # static -> dynamic: the buffer dropped the static one
                    self._tf_version += 1
                    self._tf_last_rx = time.monotonic()
            if error:
                self._bad_input("tf_rejected", error)
        with self._queue_cv:
            self._queue_cv.notify()  # pending items may now resolve

    def _on_clock_jump(self, jump) -> None:
        self._reset(f"the clock jumped back {-jump.delta.nanoseconds * 1e-9:.3f} s (bag loop or sim reset)")

    def last_reset(self) -> tuple[float, str] | None:
        """(seconds ago, why) of the last reset of the time-indexed state, or None."""
        last = self._last_reset
        return None if last is None else (time.monotonic() - last[0], last[1])

    def _reset(self, why: str) -> None:
        """Forget the time-indexed state (TF history, keyframes); keep static TF and the world map."""
        self._log.warning(f"perception: {why}; clearing the TF history and the frame buffer")
        self._last_reset = (time.monotonic(), why)
        with self._tf_lock:
            self.transforms = TransformBuffer(cache_sec=self.config.tf_cache_sec)
            for parent, child, stamp, t, q in self._static_tf.values():
                self.transforms.set_transform(parent, child, stamp, t, q, static=True)
            self._tf_last_stamp = {}
        with self._lock:
            self.frames.clear()
            self._last_image_stamp = None
            self._last_keyframe_stamp = None
            self._last_depth_stamp = None
            self._counts["resets"] += 1
        with self._queue_cv:
            self._drop("reset", len(self._queue))
            self._queue.clear()
            self._reset_pending = True
            self._newest_stamp = float("-inf")

    # ------------------------------------------------------------------------------------------------ worker

    _pending_count = 0
    _last_reset: tuple[float, str] | None = None
    _newest_stamp = float("-inf")  # the newest stamp of the sensor data queued (the camera's clock)
    _busy = False
    _reset_pending = False

    def _run(self) -> None:
        pending: dict[str, collections.deque[_Item]] = {k: collections.deque() for k in ("image", "depth", "points")}
        seen_tf_version = -1
        while not self._stop.is_set():
            with self._queue_cv:
                if not self._queue and self._tf_version == seen_tf_version:
                    self._queue_cv.wait(0.05)
                items = list(self._queue)
                self._queue.clear()
                if self._reset_pending:
                    self._reset_pending = False
                    n = sum(len(d) for d in pending.values())
                    for d in pending.values():
                        d.clear()
                    self._drop("reset", n)
                self._busy = bool(items)
            try:
                for item in items:
                    queue = pending[item.kind]
                    if len(queue) >= self.config.max_pending:
                        queue.popleft()
                        self._drop("pending_full")
                    queue.append(item)
                seen_tf_version = self._tf_version
                for queue in pending.values():
                    self._resolve(queue)
                self._pending_count = sum(len(d) for d in pending.values())
                self._maybe_publish_map()
            except Exception as e:  # the worker must survive anything a message can cause
                self._bad_input("worker_error", f"{type(e).__name__}: {e}")
            finally:
                self._busy = False

    def _lookup(self, frame_id: str, stamp: float) -> np.ndarray:
        with self._tf_lock:
            return self.transforms.lookup(
                self.config.world_frame, frame_id, stamp, tolerance=self.config.buffer.pose_tolerance_sec
            )

    def _tf_covers(self, frame_id: str, stamp: float) -> bool:
        """True when every dynamic transform above `frame_id` and above the world frame has a sample at or after
        `stamp`, so the lookup interpolates instead of extrapolating. Unknown frames count as covered (the lookup
        then says what is missing)."""
        with self._tf_lock:
            for start in (frame_id, self.config.world_frame):
                frame, seen = start, set()
                while frame not in seen:
                    parent = self.transforms.parent(frame, stamp)  # the parent valid at `stamp`
                    if parent is None:
                        break
                    seen.add(frame)
                    held = self.transforms.time_range(frame)  # None when static
                    if held is not None and held[1] < stamp:
                        return False
                    frame = parent
        return True

    def _resolve(self, queue: collections.deque[_Item]) -> None:
        """Handle items in stamp order; stop at the first whose pose is not available yet (TF arrives in order)."""
        cfg = self.config
        while queue:
            item = queue[0]
            may_wait = (self._newest_stamp - item.stamp <= cfg.pose_wait_sec
                        and time.monotonic() - item.t_enqueued < cfg.pose_wait_wall_sec)
            if may_wait and not self._tf_covers(item.frame_id, item.stamp):
                return  # TF has not reached this stamp yet: wait rather than extrapolate within the tolerance
            waiting_color = item.kind == "depth" and cfg.depth_requires_color and self._depth_color(item) is None
            if waiting_color and may_wait:
                return  # its colour image may still be on the way
            try:
                T = self._lookup(item.frame_id, item.stamp)
            except LookupError as e:
                self._last_pose_error = str(e)
                if may_wait:
                    return  # wait for TF to catch up
                queue.popleft()
                cause = "no_pose_" + type(e).__name__
                self._drop(cause)
                self._bad_input(cause, f"no {self.config.world_frame} <- {item.frame_id} pose at {item.stamp:.6f}: {e}")
                continue
            queue.popleft()
            if not np.all(np.isfinite(T)):
                self._bad_input("pose_nonfinite", f"non-finite pose for {item.frame_id} at {item.stamp:.6f}")
                continue
            self._handle(item, T)

    def _handle(self, item: _Item, T: np.ndarray) -> None:
        if item.kind == "image":
            rgb, K = item.data
            with self._lock:
                try:
                    self.frames.add(item.stamp, rgb, K, T)
                except InputError as e:
                    self._bad_input("frame_rejected", str(e))
                    return
                self._counts["frames_added"] += 1
                self._recent.append((item.stamp, item.frame_id, rgb, K, T))
        elif item.kind == "depth":
            self._handle_depth(item, T)
        else:
            xyz, rgb = item.data
            world = xyz.astype(np.float64) @ T[:3, :3].T + T[:3, 3]  # (N, 3) world_frame metres
            self.scene_map.integrate_points(world, rgb, stamp=item.stamp)
            self._count("clouds_integrated")
            self._map_version += 1

    def _depth_color(self, item: _Item) -> np.ndarray | None:
        """The colour image of the same camera and size closest in time to a depth item, within color_match_sec."""
        stamp, shape = item.stamp, item.data[0].shape
        with self._lock:
            candidates = [c for c in self._colors if c[1] == item.frame_id and c[2].shape[:2] == shape]
        if not candidates:
            return None
        best = min(candidates, key=lambda c: abs(c[0] - stamp))
        return best[2] if abs(best[0] - stamp) <= self.config.color_match_sec else None

    def _handle_depth(self, item: _Item, T: np.ndarray) -> None:
        """Integrate every depth_stride-th pixel into the map, coloured by the colour image of the same camera and
        stamp (within color_match_sec); with attach_depth, the keyframe of that stamp is re-stored with the depth."""
        depth, K = item.data  # (H, W) float32 metres (NaN = none), K of the depth image
        rgb = self._depth_color(item)
        if rgb is None and self.config.depth_requires_color:
            self._drop("depth_no_color")
            return
        s = self.config.depth_stride
        sub = depth[::s, ::s]  # pixel u' of `sub` is pixel u = s * u' of `depth`
        K_sub = K.copy()
        K_sub[:2, :] /= s  # fx/s, cx/s, fy/s, cy/s: exact for integer subsampling of pixel indices
        color = np.ascontiguousarray(rgb[::s, ::s]) if rgb is not None else None
        self.scene_map.integrate_depth(sub, K_sub, T, image=color, stamp=item.stamp, stride=1)
        self._count("depth_integrated")
        self._map_version += 1
        if not self.config.attach_depth:
            return
        with self._lock:
            keyframes = [r for r in self._recent if r[1] == item.frame_id and r[2].shape[:2] == depth.shape]
            match = min(keyframes, key=lambda r: abs(r[0] - item.stamp), default=None)
            if match is None or abs(match[0] - item.stamp) > self.config.color_match_sec:
                return
            stamp, _, rgb_kf, K_kf, T_kf = match
            if any(f.stamp == stamp for f in self.frames.frames()):  # still held: re-store it with its depth
                try:
                    self.frames.add(stamp, rgb_kf, K_kf, T_kf, depth=depth)
                    self._counts["depth_attached"] += 1
                except InputError as e:
                    self._bad_input("frame_rejected", str(e))

    # --------------------------------------------------------------------------------------- map / diagnostics

    def _load_map(self, path: str) -> None:
        if not os.path.exists(path):
            self._log.info(f"perception: no saved map at {path}; starting empty (it is saved there on close)")
            return
        try:
            self.scene_map = SceneMap.load(path, self.config.map)
        except Exception as e:  # keep running on an empty map, and never overwrite the file we could not read
            self._save_map_on_close = False
            self._log.error(f"perception: could not load the map from {path}: {e}; starting empty, not saving over it")
            return
        self._map_version += 1
        self._log.info(f"perception: map loaded from {path} ({len(self.scene_map)} voxels)")

    def publish_map(self) -> int:
        """Publish the current map snapshot now (world frame); returns the number of points."""
        if self._map_pub is None:
            return 0
        scene = self.scene_map.snapshot()
        msg = cv.array_to_pointcloud2(scene.points, scene.colors, frame_id=self.config.world_frame)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self._map_pub.publish(msg)
        self._count("maps_published")
        return scene.num_points

    def _maybe_publish_map(self) -> None:
        period = self.config.publish_map_period
        if period <= 0 or self._map_pub is None or self._map_version == self._map_published_version:
            return
        now = time.monotonic()
        if now < self._next_map_publish:
            return
        self._next_map_publish = now + period
        self._map_published_version = self._map_version
        self.publish_map()

    def diagnostics(self) -> DiagnosticStatus:
        s = self.stats()
        level, messages = DiagnosticStatus.OK, []
        if s["counts"].get("frames_added", 0) == 0:
            level, messages = DiagnosticStatus.WARN, ["no keyframe yet"]
        if s["tf"]["last_rx_age_sec"] is None or s["tf"]["last_rx_age_sec"] > 5.0:
            level = DiagnosticStatus.WARN
            messages.append("no TF for 5 s" if s["tf"]["last_rx_age_sec"] is not None else "no TF received")
        if s["last_pose_error"]:
            messages.append(f"last pose error: {s['last_pose_error']}")
        buf, smap = s["buffer"], s["map"]
        values = {
            "frames_held": buf["frames"],
            "max_frames": buf["max_frames"],
            "buffer_bytes": buf["bytes"],
            "max_bytes": buf["max_bytes"],
            "buffer_fill": buf["fill"],
            "queued": s["queued"],
            "pending": s["pending"],
            "map_voxels": smap["voxels"],
            "max_voxels": smap["max_voxels"],
            "map_bytes": smap["bytes"],
            "tf_frames": s["tf"]["frames"],
            "tf_static_frames": s["tf"]["static"],
            "tf_latest_stamp": s["tf"]["latest_stamp"],
            "tf_last_rx_age_sec": s["tf"]["last_rx_age_sec"],
        }
        values.update({f"count.{k}": v for k, v in s["counts"].items()})
        values.update({f"dropped.{k}": v for k, v in s["dropped"].items()})
        values.update({f"bad_input.{k}": v for k, v in s["bad_input"].items()})
        return DiagnosticStatus(
            level=level,
            name=f"{self.node.get_name()}: perception",
            message="; ".join(messages) or "ok",
            hardware_id=self.config.image_topic,
            values=[
                KeyValue(key=k, value="" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
                for k, v in values.items()
            ],
        )

    def publish_diagnostics(self) -> None:
        if self._diag_pub is None:
            return
        msg = DiagnosticArray()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.status = [self.diagnostics()]
        self._diag_pub.publish(msg)
