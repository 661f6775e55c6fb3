"""Conversions between ROS 2 messages and the numpy/core types of stllm_core (no cv_bridge, no sensor_msgs_py).

Everything here is vectorised numpy: no per-pixel or per-point Python loops. Every refusal raises
`stllm_core.errors.InputError` naming the field and the value seen.

Conventions:
- Colour images come out as RGB uint8 (H, W, 3) (`image_to_rgb`), whatever the colour encoding on the wire
  (COLOR_ENCODINGS: rgb/bgr/rgba/bgra 8 and 16 bit, mono8/16, YUV 4:2:2, Bayer); CompressedImage via
  `compressed_to_rgb` (jpeg/png) and `compressed_depth_to_metres` (compressedDepth png).
- Depth comes out as float32 metres (H, W) (`image_to_depth`): 16UC1 is millimetres (0 = no return, mapped to NaN),
  32FC1 is metres (REP-117: NaN/+-Inf are kept; callers mask non-finite values).
- Point clouds: a structured array with float32 fields x, y, z (metres, in `header.frame_id`) and rgb, the PCL packing
  of 0x00RRGGBB in a uint32 reinterpreted as float32 (what RViz and PCL read).
- CameraInfo -> CameraModel (`camera_info_to_model`): K, D, P; raw distorted images are undistorted into pinhole
  images before their rays are computed (stllm_core.geometry.camera).
- Stamps: `builtin_interfaces/Time` <-> float seconds (`sec + nanosec * 1e-9`).
- Transforms: `TransformStamped` <-> (parent, child, stamp, t (3,) metres, q (4,) xyzw), meaning T_parent_child.
"""

from __future__ import annotations

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import TransformStamped
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField

from stllm_core.data.sensor_arrays import (  # noqa: F401  (re-exported: the decoding half lives in stllm_core)
    CLOUD_DTYPE,
    COLOR_ENCODINGS,
    DEPTH_ENCODINGS,
    IMAGE_ENCODINGS,
    POINTFIELD_DTYPES,
    compressed_depth_to_metres,
    compressed_to_rgb,
    image_to_depth,
    image_to_numpy,
    image_to_rgb,
    pack_rgb,
    pointcloud2_to_array,
    pointcloud2_to_xyz_rgb,
    unpack_rgb,
)
from stllm_core.errors import InputError
from stllm_core.geometry.camera import CameraModel
from stllm_core.geometry.poses import validate_quaternion

# ---------------------------------------------------------------------------------------------------------- time


def stamp_to_sec(stamp: Time) -> float:
    """builtin_interfaces/Time -> float seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


def sec_to_stamp(t: float) -> Time:
    """Float seconds -> builtin_interfaces/Time (rounded to the nearest nanosecond)."""
    if not np.isfinite(t) or t < 0:
        raise InputError(f"Got {t!r} for a stamp; expected a finite, non-negative number of seconds.")
    sec = int(np.floor(t))  # split first: t * 1e9 would lose nanoseconds beyond 2**53
    ns = int(round((t - sec) * 1e9))
    if ns >= 1_000_000_000:
        sec, ns = sec + 1, ns - 1_000_000_000
    return Time(sec=sec, nanosec=ns)


# --------------------------------------------------------------------------------------------------------- images


def numpy_to_image(arr: np.ndarray, encoding: str, stamp: float | Time = 0.0, frame_id: str = "") -> Image:
    """Array -> Image (little endian, no row padding).

    - Colour encodings: `arr` already has the wire layout and dtype, uint8 (or uint16 for the 16-bit ones) (H, W, C)
      in that channel order ((H, W) for mono and Bayer, (H, W, 2) for YUV 4:2:2).
    - 16UC1: `arr` is uint16 millimetres, or float metres (converted: round(m * 1000), NaN/Inf/<=0 -> 0).
    - 32FC1: `arr` is float metres.
    """
    if encoding not in IMAGE_ENCODINGS:
        raise InputError(f"Unsupported image encoding {encoding!r}; supported: {', '.join(IMAGE_ENCODINGS)}.")
    dtype, channels = IMAGE_ENCODINGS[encoding]
    arr = np.asarray(arr)
    expected_ndim = 2 if channels == 1 else 3
    if arr.ndim == 3 and channels == 1 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != expected_ndim or (channels > 1 and arr.shape[2] != channels):
        want = "(H, W)" if channels == 1 else f"(H, W, {channels})"
        raise InputError(f"Got an array of shape {arr.shape} for encoding {encoding!r}; expected {want}.")
    if encoding == "16UC1" and arr.dtype.kind == "f":
        mm = np.where(np.isfinite(arr) & (arr > 0), np.round(arr * 1000.0), 0.0)
        if mm.max(initial=0.0) > np.iinfo(np.uint16).max:
            raise InputError(
                f"Depth up to {float(np.nanmax(arr)):.3f} m does not fit 16UC1 millimetres (max 65.535 m)."
            )
        arr = mm.astype(np.uint16)
    elif encoding not in ("16UC1", "32FC1") and arr.dtype != dtype:
        raise InputError(f"Got dtype {arr.dtype} for encoding {encoding!r}; expected {dtype}.")
    elif encoding == "16UC1" and arr.dtype != np.uint16:
        raise InputError(f"Got dtype {arr.dtype} for encoding '16UC1'; expected uint16 millimetres or float metres.")
    arr = np.ascontiguousarray(arr, dtype=dtype.newbyteorder("<"))
    msg = Image()
    msg.header.stamp = stamp if isinstance(stamp, Time) else sec_to_stamp(stamp)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(arr.shape[1] * channels * dtype.itemsize)
    msg.data = arr.tobytes()
    return msg


# ---------------------------------------------------------------------------------------------------- CameraInfo


def camera_info_to_model(msg: CameraInfo) -> CameraModel:
    """CameraInfo -> CameraModel (K, D, distortion model, P and the size it describes); InputError when K, the size,
    D or P cannot be used. `.pinhole(rectified)` gives the intrinsics of pinhole images and the undistortion of raw
    ones (stllm_core.geometry.camera)."""
    return CameraModel.from_arrays(msg.width, msg.height, msg.k, msg.d, msg.distortion_model, msg.p,
                                   where=f"CameraInfo (frame {msg.header.frame_id!r})")


def K_to_camera_info(
    K: np.ndarray, width: int, height: int, stamp: float | Time = 0.0, frame_id: str = ""
) -> CameraInfo:
    """K (3, 3) + size -> CameraInfo (plumb_bob with zero distortion, P = [K | 0])."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise InputError(f"Got K of shape {K.shape}; expected (3, 3).")
    msg = CameraInfo()
    msg.header.stamp = stamp if isinstance(stamp, Time) else sec_to_stamp(stamp)
    msg.header.frame_id = frame_id
    msg.width, msg.height = int(width), int(height)
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    msg.k = K.ravel().tolist()
    msg.r = np.eye(3).ravel().tolist()
    P = np.zeros((3, 4))
    P[:, :3] = K
    msg.p = P.ravel().tolist()
    return msg


# --------------------------------------------------------------------------------------------------- PointCloud2


def array_to_pointcloud2(
    xyz: np.ndarray, rgb: np.ndarray | None = None, stamp: float | Time = 0.0, frame_id: str = "map"
) -> PointCloud2:
    """xyz (N, 3) metres [+ rgb (N, 3) uint8] -> unorganised PointCloud2 (height 1, dense, little endian).

    Fields: x, y, z float32 at offsets 0, 4, 8 and, with colour, rgb float32 at 12 (point_step 16 or 12).
    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InputError(f"Got xyz of shape {xyz.shape}; expected (N, 3).")
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.shape != xyz.shape:
            raise InputError(f"Got rgb of shape {rgb.shape} for xyz of shape {xyz.shape}; expected equal shapes.")
    n = xyz.shape[0]
    names = ["x", "y", "z"] + (["rgb"] if rgb is not None else [])
    arr = np.empty(n, np.dtype([(nm, "<f4") for nm in names]))
    arr["x"], arr["y"], arr["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    if rgb is not None:
        arr["rgb"] = pack_rgb(rgb)
    msg = PointCloud2()
    msg.header.stamp = stamp if isinstance(stamp, Time) else sec_to_stamp(stamp)
    msg.header.frame_id = frame_id
    msg.height, msg.width = 1, n
    msg.fields = [PointField(name=nm, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, nm in enumerate(names)]
    msg.is_bigendian = False
    msg.point_step = arr.dtype.itemsize
    msg.row_step = msg.point_step * n
    msg.is_dense = bool(np.isfinite(xyz).all())
    msg.data = arr.tobytes()
    return msg


# ---------------------------------------------------------------------------------------------------- transforms


def transform_from_msg(msg: TransformStamped) -> tuple[str, str, float, np.ndarray, np.ndarray]:
    """TransformStamped -> (parent, child, stamp seconds, t (3,) float64 metres, q (4,) float64 xyzw, unit norm).

    Refuses empty or equal frame ids, non-finite translations, and NaN/Inf or non-normalised quaternions by tf2's
    rule (|‖q‖² - 1| > 0.01, geometry.poses.validate_quaternion: a zero or garbage rotation must never become a pose);
    nearly-unit ones are renormalised.
    """
    parent = msg.header.frame_id.lstrip("/")
    child = msg.child_frame_id.lstrip("/")
    stamp = stamp_to_sec(msg.header.stamp)
    if not parent or not child or parent == child:
        raise InputError(
            f"Got parent {parent!r} and child {child!r} in a TransformStamped; expected two distinct names."
        )
    tr, ro = msg.transform.translation, msg.transform.rotation
    t = np.array([tr.x, tr.y, tr.z], dtype=np.float64)
    q = np.array([ro.x, ro.y, ro.z, ro.w], dtype=np.float64)
    if not np.all(np.isfinite(t)):
        raise InputError(
            f"Got translation {t.tolist()} for {parent} -> {child} at {stamp:.9f}; expected finite values."
        )
    q = validate_quaternion(q, f"quaternion of {parent} -> {child} at {stamp:.9f}")
    return parent, child, stamp, t, q


def transform_to_msg(parent: str, child: str, stamp: float | Time, t: np.ndarray, q: np.ndarray) -> TransformStamped:
    """(parent, child, stamp, t (3,), q (4,) xyzw) -> TransformStamped (T_parent_child)."""
    msg = TransformStamped()
    msg.header.stamp = stamp if isinstance(stamp, Time) else sec_to_stamp(stamp)
    msg.header.frame_id = parent
    msg.child_frame_id = child
    tr, ro = msg.transform.translation, msg.transform.rotation
    tr.x, tr.y, tr.z = (float(v) for v in t)
    ro.x, ro.y, ro.z, ro.w = (float(v) for v in q)
    return msg
