"""rosbag2 bags without rosbag2: clip -> bag conversion, reading any rosbag2 bag, and decoding a bag back to a Clip.

Everything here uses the pure-Python `rosbags` library (typestore ``Stores.ROS2_KILTED``); nothing imports rclpy.

Bags written by `write_bag` / `clip_to_bag` (standard rosbag2, metadata version 9, MCAP by default or SQLite3):

- ``/tf_static``: tf2_msgs/msg/TFMessage, once at the start: camera_link -> camera_color_optical_frame.
- ``/scene/points``: sensor_msgs/msg/PointCloud2, once at the start, in ``map``: x, y, z float32 + rgb float32.
- ``/tf``: tf2_msgs/msg/TFMessage, one per frame: map -> camera_link at the frame stamp.
- ``/camera/color/camera_info``: sensor_msgs/msg/CameraInfo, one per frame, camera_color_optical_frame.
- ``/camera/color/image_raw``: sensor_msgs/msg/Image rgb8, one per frame, camera_color_optical_frame.
- ``/camera/depth/image_raw`` (if the clip has depth): sensor_msgs/msg/Image 32FC1 or 16UC1, same frame and stamps.

Conventions:
- Frames follow REP-105 and REP-103: ``map`` is the fixed world frame (x forward, y left, z up, metres);
  ``camera_link`` is the camera body (x forward, y left, z up); ``camera_color_optical_frame`` is the OpenCV optical
  frame (x right, y down, z forward). A clip's ``c2ws`` pose is T_map_optical; the bag carries
  T_map_link = T_map_optical @ inv(T_link_optical) on /tf, and the fixed T_link_optical (rotation only, quaternion
  xyzw = (-0.5, 0.5, -0.5, 0.5), as ``static_transform_publisher --yaw -pi/2 --roll -pi/2``) on /tf_static.
- Depth is registered to the colour image (same K, same optical frame). 32FC1 is metres with NaN where invalid
  (REP-118); 16UC1 is millimetres with 0 where invalid.
- Stamps: frame i is stamped ``start_time_ns + round((stamp_i - stamp_0) * 1e9)`` (header stamp == bag log time), so a
  clip at ``fps`` is stamped every 1/fps s. /tf_static and /scene/points are written at the start time with a
  transient-local (latched) offered QoS, so players deliver them to late subscribers.
- PointCloud2 ``rgb`` is the PCL packing: 0x00RRGGBB in a uint32, reinterpreted as float32 (what RViz reads).

Reading (`BagReader`, `bag_info`, `read_messages`) works on any rosbag2 bag directory (MCAP or SQLite3, split files,
message/file zstd compression) or a bare ``.mcap``/``.db3`` file, and yields raw CDR bytes in log-time order. A
truncated or corrupt bag raises DataError naming the path and the reason. `BagReader.decoded` deserializes with the
Kilted typestore plus the definitions embedded in the bag; types it cannot decode are skipped and counted.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stllm_core.config import check, check_choice
from stllm_core.data.sensor_arrays import (  # noqa: F401  (pack_rgb/unpack_rgb re-exported)
    compressed_depth_to_metres,
    compressed_to_rgb,
    image_to_depth,
    image_to_rgb,
    pack_rgb,
    pointcloud2_to_xyz_rgb,
    unpack_rgb,
)
from stllm_core.errors import DataError, InputError, STLLMError
from stllm_core.memory.transforms import TransformBuffer
from stllm_core.types import Clip, Frame, Scene

logger = logging.getLogger(__name__)

DEFAULT_START_NS = 1_700_000_000 * 10**9  # 2023-11-14T22:13:20Z: a fixed start keeps converted bags reproducible
STORAGES = ("mcap", "sqlite3")
DEPTH_ENCODINGS = ("32FC1", "16UC1", "none")
LATCHED_TOPICS = ("/tf_static", "/scene/points")
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
RIGID_TOL = 1e-4

#: Rotation of the OpenCV optical frame in the camera body frame (columns: optical x, y, z expressed in camera_link).
R_LINK_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
T_LINK_OPTICAL = np.eye(4)
T_LINK_OPTICAL[:3, :3] = R_LINK_OPTICAL
Q_LINK_OPTICAL_XYZW = (-0.5, 0.5, -0.5, 0.5)



@dataclass
class BagWriterConfig:
    """How `write_bag` / `clip_to_bag` lay a clip out as a bag (see the module docstring for the conventions)."""

    storage: str = "mcap"  # "mcap" | "sqlite3"
    compression: str = "none"  # "none" | "zstd" (MCAP: zstd chunks inside the file; SQLite3: rosbag2 per-message zstd)
    start_time_ns: int = DEFAULT_START_NS  # bag time of the first frame (ns since the epoch)
    depth_encoding: str = "32FC1"  # "32FC1" (metres, NaN invalid) | "16UC1" (mm, 0 invalid) | "none"
    world_frame: str = "map"
    body_frame: str = "camera_link"
    optical_frame: str = "camera_color_optical_frame"
    image_topic: str = "/camera/color/image_raw"
    camera_info_topic: str = "/camera/color/camera_info"
    depth_topic: str = "/camera/depth/image_raw"
    points_topic: str = "/scene/points"
    tf_topic: str = "/tf"
    tf_static_topic: str = "/tf_static"
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_choice("storage", self.storage, STORAGES)
        check_choice("depth_encoding", self.depth_encoding, DEPTH_ENCODINGS)
        check_choice("compression", self.compression, ("none", "zstd"))
        check(isinstance(self.start_time_ns, int) and self.start_time_ns >= 0, "start_time_ns", self.start_time_ns,
              "a non-negative integer (nanoseconds since the epoch)")
        for name in ("world_frame", "body_frame", "optical_frame"):
            v = getattr(self, name)
            check(isinstance(v, str) and v != "" and not v.startswith("/"), name, v, "a TF frame id without '/'")
        for name in ("image_topic", "camera_info_topic", "depth_topic", "points_topic", "tf_topic", "tf_static_topic"):
            v = getattr(self, name)
            check(isinstance(v, str) and v.startswith("/") and " " not in v, name, v, "an absolute topic name")


@dataclass(frozen=True)
class TopicInfo:
    name: str
    msgtype: str  # e.g. "sensor_msgs/msg/Image"
    count: int  # messages on this topic (from the bag's metadata)
    latched: bool  # offered with transient-local durability
    reliable: bool = True  # False when every recorded offered QoS profile is best effort (e.g. a camera driver's)
    depth: int = 0  # the recorded history depth (the largest offered; 0 = not recorded)


@dataclass(frozen=True)
class BagInfo:
    """What `ros2 bag info` says about a bag."""

    path: Path
    storage: str  # "mcap" | "sqlite3"
    topics: tuple[TopicInfo, ...]
    message_count: int
    start_ns: int  # log time of the first message (0 for an empty bag)
    end_ns: int  # log time of the last message (0 for an empty bag)

    @property
    def duration_sec(self) -> float:
        return (self.end_ns - self.start_ns) * 1e-9

    def topic(self, name: str) -> TopicInfo:
        for t in self.topics:
            if t.name == name:
                return t
        raise KeyError(f"Bag {self.path} has no topic {name!r}; it has {[t.name for t in self.topics]}.")

    def __str__(self) -> str:
        lines = [
            f"Bag:      {self.path}",
            f"Storage:  {self.storage}",
            f"Duration: {self.duration_sec:.3f} s",
            f"Start:    {self.start_ns} ns",
            f"Messages: {self.message_count}",
            "Topics:",
        ]
        width = max((len(t.name) for t in self.topics), default=0)
        for t in self.topics:
            lines.append(f"  {t.name:<{width}}  {t.msgtype:<36} {t.count:>6}{'  (latched)' if t.latched else ''}")
        return "\n".join(lines)


@dataclass(frozen=True)
class BagMessage:
    topic: str
    msgtype: str
    stamp_ns: int  # log (receive) time in the bag, ns since the epoch
    data: bytes  # CDR-serialized message, exactly as stored


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _recorded_qos(conn) -> tuple[bool, bool, int]:
    """(latched, reliable, depth) of a connection's recorded offered QoS profiles (reliable, depth 0 when none)."""
    from rosbags.interfaces import QosDurability, QosReliability

    profiles = getattr(conn.ext, "offered_qos_profiles", None) or []
    latched = any(getattr(q, "durability", None) == QosDurability.TRANSIENT_LOCAL for q in profiles)
    reliable = not profiles or any(getattr(q, "reliability", None) != QosReliability.BEST_EFFORT for q in profiles)
    depth = max((int(getattr(q, "depth", 0) or 0) for q in profiles), default=0)
    return latched, reliable, depth


class BagReader:
    """Read any rosbag2 bag (directory with metadata.yaml, or a bare .mcap / .db3 file).

    reader = BagReader("demo_bag")
    reader.info                       # BagInfo
    for m in reader.messages(): ...   # BagMessage(topic, msgtype, stamp_ns, data), in log-time order
    for m, msg in reader.decoded(): ...   # plus the deserialized message; reader.skipped counts undecodable types
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skipped: Counter[str] = Counter()  # msgtype -> messages skipped by `decoded` (type unknown)
        with self._open() as reader:
            try:
                conns = list(reader.connections)
                count = int(reader.message_count)
                start, end = int(reader.start_time), int(reader.end_time)
            except Exception as e:  # noqa: BLE001 - any failure of the storage backend is a bad bag
                raise self._error(e) from e
        self._msgdefs = {c.msgtype: c.msgdef for c in conns if c.msgdef is not None}
        topics: dict[str, TopicInfo] = {}
        for c in conns:
            prev = topics.get(c.topic)
            cnt = int(c.msgcount) + (prev.count if prev else 0)
            latched, reliable, depth = _recorded_qos(c)
            if prev:
                latched, reliable, depth = latched or prev.latched, reliable or prev.reliable, max(depth, prev.depth)
            topics[c.topic] = TopicInfo(c.topic, c.msgtype, cnt, latched, reliable, depth)
        storage = "sqlite3" if self.path.suffix == ".db3" else "mcap" if self.path.suffix == ".mcap" else ""
        if not storage:
            storage = "sqlite3" if any(self.path.glob("*.db3")) else "mcap"
        self.info = BagInfo(
            path=self.path, storage=storage, topics=tuple(topics.values()), message_count=count,
            start_ns=start if count else 0, end_ns=max(end - 1, start) if count else 0,
        )

    # -- raw -----------------------------------------------------------------------------------------------------------
    def _error(self, e: BaseException) -> DataError:
        return DataError(f"Cannot read bag {self.path}: {type(e).__name__}: {e}".rstrip(".") + ". "
                         "The bag is truncated, corrupt or not a rosbag2 bag (a bag whose recording was interrupted "
                         "may need `ros2 bag reindex`).")

    @contextmanager
    def _open(self):
        """The opened rosbags Reader; failures to open become DataError naming the bag."""
        from rosbags.rosbag2 import Reader

        if not self.path.exists():
            raise DataError(f"Bag {self.path} does not exist.")
        try:
            reader = Reader(self.path)
            reader.open()
        except Exception as e:  # noqa: BLE001
            raise self._error(e) from e
        try:
            yield reader
        finally:
            reader.close()

    def messages(self, topics: Collection[str] | None = None, start_ns: int | None = None,
                 stop_ns: int | None = None) -> Iterator[BagMessage]:
        """Messages of `topics` (all by default) with start_ns <= stamp < stop_ns, in log-time order.

        Raises DataError if the storage fails while reading, or if a full read finds fewer messages on a topic than
        the bag's metadata announces (a truncated file).
        """
        wanted = None if topics is None else set(topics)
        seen: Counter[str] = Counter()
        with self._open() as reader:
            try:
                for topic, msgtype, stamp, data in self._iter(reader, wanted, start_ns, stop_ns):
                    seen[topic] += 1
                    yield BagMessage(topic, msgtype, int(stamp), bytes(data))
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001
                raise self._error(e) from e
        if start_ns is None and stop_ns is None:
            short = [(t.name, seen[t.name], t.count) for t in self.info.topics
                     if (wanted is None or t.name in wanted) and seen[t.name] < t.count]
            if short:
                name, got, want = short[0]
                raise DataError(f"Bag {self.path} is truncated or corrupt: topic {name} has {got} readable "
                                f"message(s) but its metadata announces {want}.")

    @staticmethod
    def _iter(reader, wanted, start_ns, stop_ns):
        """(topic, msgtype, stamp, data) over every storage file, merged by stamp.

        rosbags' directory reader matches the metadata's connections to each file's connections including the offered
        QoS, which rosbag2 itself does not keep identical (e.g. its own talker test bags), and then drops every
        message. So the storage files are read with their own connections here.
        """
        inner = getattr(reader, "storage", None)
        storages = getattr(inner, "storages", None)
        if inner is None or (storages is None and not hasattr(inner, "messages")):
            # Unknown rosbags internals: fall back to the public API.
            conns = [c for c in reader.connections if wanted is None or c.topic in wanted]
            if conns:
                for c, t, d in reader.messages(connections=conns, start=start_ns, stop=stop_ns):
                    yield c.topic, c.msgtype, t, d
            return
        if storages is None:
            storages, compressed = [inner], False
        else:
            compressed = getattr(inner.metadata, "compression_mode", None) == "message"
        streams = []
        for s in storages:
            conns = [c for c in s.connections if wanted is None or c.topic in wanted]
            if conns:
                streams.append((t, c.topic, c.msgtype, d) for c, t, d in s.messages(conns, start_ns, stop_ns))
        for t, topic, msgtype, d in heapq.merge(*streams, key=lambda x: x[0]):
            if compressed:
                d = _zstd_decompress(d)
            yield topic, msgtype, t, d

    # -- decoded -------------------------------------------------------------------------------------------------------
    def decoded(self, topics: Collection[str] | None = None, typestore=None) -> Iterator[tuple[BagMessage, Any]]:
        """(BagMessage, deserialized rosbags message) pairs; messages of undecodable types are skipped and counted in
        `self.skipped` (one warning per type)."""
        ts = typestore or _typestore()
        ok: dict[str, bool] = {}
        for m in self.messages(topics):
            if m.msgtype not in ok:
                ok[m.msgtype] = self._ensure_type(ts, m.msgtype)
            if not ok[m.msgtype]:
                self.skipped[m.msgtype] += 1
                continue
            try:
                msg = ts.deserialize_cdr(m.data, m.msgtype)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"Bag {self.path}: a {m.msgtype} message on {m.topic} at {m.stamp_ns} ns does not "
                                f"deserialize: {type(e).__name__}: {e}.") from e
            yield m, msg

    def _ensure_type(self, ts, msgtype: str) -> bool:
        if msgtype in ts.types:
            return True
        from rosbags.interfaces import MessageDefinitionFormat
        from rosbags.typesys import get_types_from_idl, get_types_from_msg

        md = self._msgdefs.get(msgtype)
        try:
            if md is not None and md.format == MessageDefinitionFormat.MSG and md.data:
                ts.register(get_types_from_msg(md.data, msgtype))
                return True
            if md is not None and md.format == MessageDefinitionFormat.IDL and md.data:
                ts.register(get_types_from_idl(md.data))
                return msgtype in ts.types
        except Exception as e:  # noqa: BLE001
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            logger.warning("Bag %s: cannot use the embedded definition of %s (%s); skipping its messages.",
                           self.path, msgtype, reason)
            return False
        logger.warning("Bag %s: message type %s is unknown and the bag carries no definition; skipping its messages.",
                       self.path, msgtype)
        return False


def bag_info(path: str | Path) -> BagInfo:
    """Topics, counts and start/end of a rosbag2 bag (DataError if it cannot be read)."""
    return BagReader(path).info


def read_messages(path: str | Path, topics: Collection[str] | None = None) -> Iterator[BagMessage]:
    """Raw messages of a rosbag2 bag in log-time order: BagMessage(topic, msgtype, stamp_ns, data)."""
    return BagReader(path).messages(topics)


def _zstd_decompress(data: bytes) -> bytes:
    try:
        from compression import zstd  # Python >= 3.14
    except ImportError:
        from backports import zstd  # what rosbags depends on before 3.14
    return zstd.decompress(data)


# ----------------------------------------------------------------------------------------------------------------------
# Geometry helpers


def _check_rigid(T: np.ndarray, where: str) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise DataError(f"Pose {where} must be a finite 4x4 matrix; got shape {T.shape} with "
                        f"{int(np.sum(~np.isfinite(T)))} non-finite value(s).")
    R = T[:3, :3]
    err = float(np.abs(R.T @ R - np.eye(3)).max())
    if err > RIGID_TOL or abs(np.linalg.det(R) - 1.0) > RIGID_TOL or np.abs(T[3] - [0, 0, 0, 1]).max() > RIGID_TOL:
        raise DataError(f"Pose {where} is not a rigid transform (|R^T R - I| = {err:.2e}, det R = "
                        f"{np.linalg.det(R):.6f}, last row {T[3].tolist()}).")
    return T


def _quat_from_matrix(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    q = Rotation.from_matrix(R).as_quat()  # xyzw
    return -q if q[3] < 0 else q  # canonical sign: w >= 0


def _matrix(t, q_xyzw) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    q = np.asarray(q_xyzw, dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or abs(n - 1.0) > 1e-3:
        raise DataError(f"Quaternion {q.tolist()} is not a unit quaternion (norm {n}).")
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat(q / n).as_matrix()
    T[:3, 3] = t
    return T


# ----------------------------------------------------------------------------------------------------------------------
# Writing


class _Msgs:
    """Message constructors of the Kilted typestore."""

    def __init__(self, ts):
        self.ts = ts
        t = ts.types
        self.Time = t["builtin_interfaces/msg/Time"]
        self.Header = t["std_msgs/msg/Header"]
        self.Image = t["sensor_msgs/msg/Image"]
        self.CameraInfo = t["sensor_msgs/msg/CameraInfo"]
        self.RegionOfInterest = t["sensor_msgs/msg/RegionOfInterest"]
        self.PointCloud2 = t["sensor_msgs/msg/PointCloud2"]
        self.PointField = t["sensor_msgs/msg/PointField"]
        self.TFMessage = t["tf2_msgs/msg/TFMessage"]
        self.TransformStamped = t["geometry_msgs/msg/TransformStamped"]
        self.Transform = t["geometry_msgs/msg/Transform"]
        self.Vector3 = t["geometry_msgs/msg/Vector3"]
        self.Quaternion = t["geometry_msgs/msg/Quaternion"]

    def header(self, stamp_ns: int, frame_id: str):
        return self.Header(stamp=self.Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=frame_id)

    def transform(self, stamp_ns: int, parent: str, child: str, T: np.ndarray):
        q = _quat_from_matrix(T[:3, :3])
        t = T[:3, 3]
        return self.TransformStamped(
            header=self.header(stamp_ns, parent), child_frame_id=child,
            transform=self.Transform(translation=self.Vector3(x=float(t[0]), y=float(t[1]), z=float(t[2])),
                                     rotation=self.Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]),
                                                              w=float(q[3]))))

    def image(self, stamp_ns: int, frame_id: str, array: np.ndarray, encoding: str):
        a = np.ascontiguousarray(array)
        h, w = a.shape[:2]
        return self.Image(header=self.header(stamp_ns, frame_id), height=h, width=w, encoding=encoding,
                          is_bigendian=0, step=a.strides[0], data=a.view(np.uint8).reshape(-1))

    def camera_info(self, stamp_ns: int, frame_id: str, K: np.ndarray, width: int, height: int):
        P = np.zeros((3, 4))
        P[:, :3] = K
        return self.CameraInfo(
            header=self.header(stamp_ns, frame_id), height=height, width=width, distortion_model="plumb_bob",
            d=np.zeros(5), k=np.asarray(K, np.float64).reshape(9), r=np.eye(3).reshape(9), p=P.reshape(12),
            binning_x=0, binning_y=0,
            roi=self.RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))

    def cloud(self, stamp_ns: int, frame_id: str, xyz: np.ndarray, rgb: np.ndarray):
        n = int(xyz.shape[0])
        arr = np.zeros(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4")])
        arr["x"], arr["y"], arr["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        arr["rgb"] = pack_rgb(rgb)
        fields = [self.PointField(name=name, offset=4 * i, datatype=7, count=1)
                  for i, name in enumerate(("x", "y", "z", "rgb"))]
        return self.PointCloud2(header=self.header(stamp_ns, frame_id), height=1, width=n, fields=fields,
                                is_bigendian=False, point_step=16, row_step=16 * n,
                                data=arr.view(np.uint8).reshape(-1), is_dense=bool(np.all(np.isfinite(xyz))))


def _qos(latched: bool):
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(sec=0, nsec=0)
    return [Qos(history=QosHistory.KEEP_LAST, depth=1 if latched else 100, reliability=QosReliability.RELIABLE,
                durability=QosDurability.TRANSIENT_LOCAL if latched else QosDurability.VOLATILE, deadline=zero,
                lifespan=zero, liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=zero,
                avoid_ros_namespace_conventions=False)]


def write_bag(path: str | Path, frames: Iterable[Frame], scene: Scene | None = None,
              config: BagWriterConfig | None = None) -> BagInfo:
    """Write frames (+ depth when present and enabled) and an optional scene cloud as a rosbag2 bag at `path`.

    Frames must come in strictly increasing `stamp` order, share one image size, and have rigid world-from-optical
    poses (DataError names the offending frame). `frames` may be a generator: one frame is held at a time.
    Returns the BagInfo of the written bag.
    """
    from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer

    cfg = config or BagWriterConfig()
    path = Path(path)
    if path.exists():
        if not cfg.overwrite:
            raise DataError(f"Bag {path} already exists (pass overwrite=True / --overwrite to replace it).")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    ts = _typestore()
    M = _Msgs(ts)
    plugin = StoragePlugin.MCAP if cfg.storage == "mcap" else StoragePlugin.SQLITE3
    start = cfg.start_time_ns
    written = 0
    writer = Writer(path, version=9, storage_plugin=plugin)
    if cfg.compression == "zstd":
        mode = CompressionMode.STORAGE if cfg.storage == "mcap" else CompressionMode.MESSAGE
        writer.set_compression(mode, CompressionFormat.ZSTD)
    try:
        with writer as w:
            conns: dict[str, Any] = {}

            def put(topic: str, msgtype: str, msg, stamp_ns: int) -> None:
                if topic not in conns:
                    conns[topic] = w.add_connection(topic, msgtype, typestore=ts,
                                                    offered_qos_profiles=_qos(topic in LATCHED_TOPICS
                                                                              or topic == cfg.tf_static_topic))
                w.write(conns[topic], stamp_ns, ts.serialize_cdr(msg, msgtype))

            put(cfg.tf_static_topic, "tf2_msgs/msg/TFMessage",
                M.TFMessage(transforms=[M.transform(start, cfg.body_frame, cfg.optical_frame, T_LINK_OPTICAL)]), start)
            if scene is not None and scene.num_points > 0:
                xyz = np.asarray(scene.points, np.float32).reshape(-1, 3)
                rgb = np.asarray(scene.colors, np.uint8).reshape(-1, 3)
                if rgb.shape != xyz.shape:
                    raise DataError(f"Scene colours {rgb.shape} do not match points {xyz.shape}.")
                put(cfg.points_topic, "sensor_msgs/msg/PointCloud2",
                    M.cloud(start, scene.frame_id or cfg.world_frame, xyz, rgb), start)

            first_stamp = None
            last_ns = -1
            size = None
            T_opt_link = np.linalg.inv(T_LINK_OPTICAL)
            for i, f in enumerate(frames):
                if first_stamp is None:
                    first_stamp = f.stamp
                stamp_ns = start + int(round((f.stamp - first_stamp) * 1e9))
                if stamp_ns <= last_ns:
                    raise DataError(f"Frame {i} has stamp {f.stamp} s, not after the previous frame's; frame stamps "
                                    f"must be strictly increasing.")
                last_ns = stamp_ns
                img = np.asarray(f.image)
                if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                    raise DataError(f"Frame {i} image is {img.dtype} {img.shape}; expected uint8 (H, W, 3) RGB.")
                if size is None:
                    size = img.shape[:2]
                elif img.shape[:2] != size:
                    raise DataError(f"Frame {i} image is {img.shape[1]}x{img.shape[0]}; frame 0 is "
                                    f"{size[1]}x{size[0]} (one camera per bag).")
                K = np.asarray(f.K, np.float64)
                if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
                    raise DataError(f"Frame {i} K is not a finite 3x3 intrinsics matrix with positive focals: "
                                    f"{K.tolist()}.")
                T_map_opt = _check_rigid(f.T_world_cam, f"of frame {i}")
                h, w_ = size
                put(cfg.tf_topic, "tf2_msgs/msg/TFMessage",
                    M.TFMessage(transforms=[M.transform(stamp_ns, cfg.world_frame, cfg.body_frame,
                                                        T_map_opt @ T_opt_link)]), stamp_ns)
                put(cfg.camera_info_topic, "sensor_msgs/msg/CameraInfo",
                    M.camera_info(stamp_ns, cfg.optical_frame, K, w_, h), stamp_ns)
                put(cfg.image_topic, "sensor_msgs/msg/Image", M.image(stamp_ns, cfg.optical_frame, img, "rgb8"),
                    stamp_ns)
                if f.depth is not None and cfg.depth_encoding != "none":
                    d = np.asarray(f.depth, np.float32)
                    if d.shape != size:
                        raise DataError(f"Frame {i} depth is {d.shape}; expected {size} like its image.")
                    valid = np.isfinite(d) & (d > 0)
                    if cfg.depth_encoding == "32FC1":
                        out, enc = np.where(valid, d, np.float32(np.nan)).astype("<f4"), "32FC1"
                    else:
                        mm = np.where(valid, np.rint(d * 1000.0), 0)
                        out, enc = np.clip(mm, 0, 65535).astype("<u2"), "16UC1"
                    put(cfg.depth_topic, "sensor_msgs/msg/Image", M.image(stamp_ns, cfg.optical_frame, out, enc),
                        stamp_ns)
                written += 1
    except DataError:
        _remove(path)
        raise
    if written == 0:
        _remove(path)
        raise DataError(f"write_bag({path}): no frames given.")
    info = bag_info(path)
    logger.info("Wrote %s bag %s: %d frames, %d messages, %.2f s.", cfg.storage, path, written, info.message_count,
                info.duration_sec)
    return info


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def qa_path_for(bag_path: str | Path) -> Path:
    """Where `clip_to_bag` writes the clip's QA next to the bag: <bag>_qa.json."""
    p = Path(bag_path)
    return p.with_name(p.name.rstrip("/") + "_qa.json")


def clip_to_bag(clip_dir: str | Path, bag_path: str | Path, config: BagWriterConfig | None = None,
                fps: float | None = None, progress: bool = False) -> BagInfo:
    """Convert an EPIC-style clip folder into a rosbag2 bag; copy its qa.json to <bag>_qa.json if it has one.

    Frames are stamped from the clip's stamps (meta.json; id/fps otherwise), or every 1/`fps` s if `fps` is given.
    """
    from stllm_core.data.clip_folder import ClipFolder

    cfg = config or BagWriterConfig()
    clip = ClipFolder.read(clip_dir)
    if fps is not None and not (np.isfinite(fps) and fps > 0):
        raise DataError(f"fps is {fps!r}; expected a positive number.")
    with_depth = clip.depth_paths is not None and cfg.depth_encoding != "none"
    world = str(clip.meta.get("world_frame", cfg.world_frame)) or cfg.world_frame

    def frames() -> Iterator[Frame]:
        idx: Iterable[int] = range(len(clip))
        if progress:
            from tqdm import tqdm

            idx = tqdm(idx, desc=f"clip -> {Path(bag_path).name}", unit="frame")
        for i in idx:
            f = clip.load_frame(i, with_depth=with_depth)
            if fps is not None:
                f = Frame(stamp=i / fps, image=f.image, K=f.K, T_world_cam=f.T_world_cam, depth=f.depth)
            yield f

    xyz, rgb = clip.points
    scene = Scene(points=xyz, colors=rgb, frame_id=world)
    if world != cfg.world_frame:
        from dataclasses import replace

        cfg = replace(cfg, world_frame=world)
    info = write_bag(bag_path, frames(), scene, cfg)
    qa = qa_path_for(bag_path)
    if clip.qa_path is not None:
        copy_qa(clip.qa_path, qa)
    elif qa.exists() and cfg.overwrite:
        qa.unlink()
    return info


REA_PATH_FIELDS = ("video", "pointcloud", "c2ws", "K")


def copy_qa(src: Path, dst: Path) -> None:
    """Copy REA records from a clip's qa.json to `dst`, re-basing their relative paths (video, pointcloud, c2ws, K)
    so they still point into the clip folder when read from `dst`'s directory."""
    try:
        records = json.loads(Path(src).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{src} is not readable JSON: {e}.") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{src} must hold a JSON list of REA records.")
    src_dir, dst_dir = Path(src).resolve().parent, Path(dst).resolve().parent
    for r in records:
        for key in REA_PATH_FIELDS:
            v = r.get(key)
            if isinstance(v, str) and v and not Path(v).is_absolute():
                r[key] = os.path.relpath(src_dir / v, dst_dir)
    Path(dst).write_text(json.dumps(records, indent=1))


# ----------------------------------------------------------------------------------------------------------------------
# Decoding a bag back to frames


def _stamp_ns(header) -> int:
    return int(header.stamp.sec) * 10**9 + int(header.stamp.nanosec)


def read_bag_clip(
    path: str | Path,
    image_topic: str = "/camera/color/image_raw",
    camera_info_topic: str = "/camera/color/camera_info",
    depth_topic: str | None = "/camera/depth/image_raw",
    points_topic: str | None = "/scene/points",
    world_frame: str = "map",
    tf_tolerance_sec: float = 0.05,
    depth_match_sec: float = 0.02,
    max_frames: int | None = None,
    rectified: bool = False,
) -> Clip:
    """Read a camera bag back into a Clip: its images with their K and T_world_cam (world_frame <- image frame_id).

    `max_frames`: at most this many images, uniform in time (as the FrameBuffer selects); only those and their depth
    are decoded (a first pass reads the stamps), so a long recording costs the memory of the frames kept, not of the
    bag. None = every image.
    Poses are resolved through /tf_static and /tf (interpolated between /tf samples; up to `tf_tolerance_sec` beyond
    the ends). The camera model comes from the camera_info with the image's stamp, else the latest earlier one; raw
    images with a non-zero D are undistorted into pinhole images with P's intrinsics, `rectified` images (image_proc's
    image_rect) taken as they are with P (stllm_core.geometry.camera, as live perception does). Depth goes with the
    image of the nearest stamp within `depth_match_sec` (drivers stamp colour and depth separately: realsense-ros
    differs by milliseconds; live perception matches within color_match_sec, the same 20 ms), undistorted with the
    colour camera's model (aligned depth). The scene is the last cloud on `points_topic` (in world_frame) or empty.
    The image and depth topics may carry sensor_msgs/Image (any encoding of sensor_arrays' COLOR_ENCODINGS /
    DEPTH_ENCODINGS) or sensor_msgs/CompressedImage (image_transport "compressed" jpeg/png for colour, e.g.
    /camera/color/image_raw/compressed; "compressedDepth" png for depth). Depth without a measurement (NaN, 0 mm,
    +-Inf per REP-117) is NaN in the frames.
    """
    from stllm_core.geometry.camera import CameraModel
    from stllm_core.memory.frame_buffer import uniform_indices

    if max_frames is not None:
        check(isinstance(max_frames, int) and max_frames >= 1, "max_frames", max_frames, "an int >= 1 or None")
    reader = BagReader(path)
    topics = [t.name for t in reader.info.topics]
    if image_topic not in topics:
        raise DataError(f"Bag {path} has no image topic {image_topic}; topics: {topics}.")
    tf = TransformBuffer(cache_sec=max(10.0, reader.info.duration_sec + 10.0))  # the whole bag stays in the buffer
    infos: list[tuple[int, CameraModel]] = []
    image_stamps: list[tuple[int, str]] = []
    depth_stamps_seen: list[int] = []
    clouds: list[tuple[int, str, np.ndarray, np.ndarray]] = []
    wanted = {image_topic, camera_info_topic, "/tf", "/tf_static"} | {t for t in (depth_topic, points_topic) if t}

    def decode(m: BagMessage, fn, msg):
        try:
            return fn(msg)
        except InputError as e:
            raise DataError(f"Bag {path}: {m.topic} at {m.stamp_ns} ns: {e}") from e

    for m, msg in reader.decoded(wanted & set(topics)):  # pass 1: TF, camera models, clouds, the stamps
        if m.topic in ("/tf", "/tf_static"):
            for tr in msg.transforms:
                t, q = tr.transform.translation, tr.transform.rotation
                try:
                    tf.set_transform(tr.header.frame_id, tr.child_frame_id, _stamp_ns(tr.header) * 1e-9,
                                     (t.x, t.y, t.z), (q.x, q.y, q.z, q.w), static=m.topic == "/tf_static")
                except STLLMError as e:
                    where = f"{tr.header.frame_id} -> {tr.child_frame_id}"
                    raise DataError(f"Bag {path}: bad transform {where}: {e}") from e
        elif m.topic == camera_info_topic:
            model = decode(m, lambda x: CameraModel.from_arrays(x.width, x.height, x.k, x.d, x.distortion_model, x.p,
                                                                where=m.topic), msg)
            infos.append((_stamp_ns(msg.header), model))
        elif m.topic == image_topic:
            image_stamps.append((_stamp_ns(msg.header), msg.header.frame_id))
        elif depth_topic and m.topic == depth_topic:
            depth_stamps_seen.append(_stamp_ns(msg.header))
        elif points_topic and m.topic == points_topic:
            xyz, rgb = decode(m, pointcloud2_to_xyz_rgb, msg)
            rgb = np.full((len(xyz), 3), 255, np.uint8) if rgb is None else rgb
            clouds.append((_stamp_ns(msg.header), msg.header.frame_id, xyz, rgb))

    def lookup(frame_id: str, stamp_ns: int, tol_sec: float) -> np.ndarray:
        try:
            return tf.lookup(world_frame, frame_id, stamp_ns * 1e-9, tolerance=tol_sec)
        except LookupError as e:
            raise DataError(f"Bag {path}: no pose {world_frame} <- {frame_id} at {stamp_ns} ns: {e}") from e

    scene = Scene.empty(world_frame)
    if clouds:  # the last cloud is the scene, moved into world_frame
        stamp, frame_id, xyz, rgb = clouds[-1]
        if frame_id != world_frame:
            T = lookup(frame_id, stamp, tf_tolerance_sec)
            xyz = (xyz @ T[:3, :3].T.astype(np.float32) + T[:3, 3].astype(np.float32)).astype(np.float32)
        scene = Scene(points=xyz, colors=rgb, frame_id=world_frame, stamp=stamp * 1e-9)
    if not image_stamps:
        raise DataError(f"Bag {path} has no messages on {image_topic}.")
    if not infos:
        raise DataError(f"Bag {path} has no camera_info on {camera_info_topic}.")
    infos.sort(key=lambda x: x[0])
    info_stamps = [s for s, _ in infos]
    image_stamps.sort()
    if max_frames is not None and len(image_stamps) > max_frames:
        keep = uniform_indices(np.array([s for s, _ in image_stamps], np.float64) * 1e-9, max_frames)
        image_stamps = [image_stamps[i] for i in sorted(keep)]
    depth_stamps = np.array(sorted(depth_stamps_seen), np.int64)
    tol_ns = int(round(depth_match_sec * 1e9))

    def nearest_depth(stamp: int) -> int | None:
        j = int(np.searchsorted(depth_stamps, stamp))
        near = [int(depth_stamps[k]) for k in (j - 1, j) if 0 <= k < len(depth_stamps)]
        best = min(near, key=lambda s: abs(s - stamp), default=None)
        return best if best is not None and abs(best - stamp) <= tol_ns else None

    def camera_at(stamp: int):
        j = int(np.searchsorted(info_stamps, stamp, side="right")) - 1
        return infos[max(j, 0)][1].pinhole(rectified)

    wanted_images = {s for s, _ in image_stamps}
    depth_of = {s: nearest_depth(s) for s in wanted_images}
    wanted_depths = {d for d in depth_of.values() if d is not None}
    images: dict[int, np.ndarray] = {}
    depths: dict[int, np.ndarray] = {}
    for m, msg in reader.decoded({image_topic} | ({depth_topic} if wanted_depths else set())):  # pass 2: the pixels
        stamp = _stamp_ns(msg.header)
        if m.topic == image_topic and stamp in wanted_images and stamp not in images:
            to_rgb = compressed_to_rgb if m.msgtype == COMPRESSED_IMAGE else image_to_rgb
            images[stamp] = decode(m, to_rgb, msg)
        elif m.topic == depth_topic and stamp in wanted_depths and stamp not in depths:
            depth = decode(m, compressed_depth_to_metres if m.msgtype == COMPRESSED_IMAGE else image_to_depth, msg)
            depth[~np.isfinite(depth)] = np.nan  # +-Inf (too near / too far) is no measurement, like NaN
            depths[stamp] = depth

    frames = []
    for stamp, frame_id in image_stamps:
        camera = camera_at(stamp)
        d = depth_of[stamp]
        depth = camera.depth(depths[d]) if d is not None else None
        T = lookup(frame_id, stamp, tf_tolerance_sec)
        frames.append(Frame(stamp=stamp * 1e-9, image=camera.image(images[stamp]), K=camera.K.copy(), T_world_cam=T,
                            depth=depth))
    if reader.skipped:
        logger.warning("Bag %s: skipped %s.", path, dict(reader.skipped))
    return Clip(frames=tuple(frames), scene=scene)

