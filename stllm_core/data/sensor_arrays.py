"""numpy views of sensor_msgs/Image and sensor_msgs/PointCloud2, duck-typed over the message fields.

The same functions decode rclpy messages (stllm_ros.conversions, live topics) and rosbags-deserialized ones
(stllm_core.data.bags, recorded bags): one decoder for both. Vectorised numpy, no per-pixel or per-point loops; every
refusal raises `InputError` naming the field and the value seen.

Conventions: colour comes out as RGB uint8 (H, W, 3); depth as float32 metres (H, W) (16UC1 millimetres, 0 = no return
-> NaN; 32FC1 metres kept as is, REP-117); clouds as CLOUD_DTYPE (x, y, z float32 metres + rgb, the PCL packing of
0x00RRGGBB in a float32).
"""

from __future__ import annotations

import numpy as np

from stllm_core.errors import InputError

# encoding -> (numpy dtype of one channel, channels)
IMAGE_ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
}
COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
DEPTH_ENCODINGS = ("16UC1", "32FC1")

# sensor_msgs/PointField datatype -> numpy dtype (little endian)
POINTFIELD_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("i1"),  # INT8
    2: np.dtype("u1"),  # UINT8
    3: np.dtype("<i2"),  # INT16
    4: np.dtype("<u2"),  # UINT16
    5: np.dtype("<i4"),  # INT32
    6: np.dtype("<u4"),  # UINT32
    7: np.dtype("<f4"),  # FLOAT32
    8: np.dtype("<f8"),  # FLOAT64
}

#: The structured dtype `pointcloud2_to_array` returns and `array_to_pointcloud2` writes (16 bytes per point).
CLOUD_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4")])


def image_to_numpy(msg) -> np.ndarray:
    """Image -> array in the wire layout: (H, W) for one channel, (H, W, C) otherwise; channel order untouched.

    Row padding (`step` > width * bytes per pixel) is removed. Big-endian 16UC1/32FC1 are byte-swapped to native.
    The result is a fresh array (it does not alias the message buffer).
    """
    enc = msg.encoding
    if enc not in IMAGE_ENCODINGS:
        raise InputError(
            f"Unsupported image encoding {enc!r} (topic frame {msg.header.frame_id!r}); "
            f"supported: {', '.join(IMAGE_ENCODINGS)}."
        )
    dtype, channels = IMAGE_ENCODINGS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise InputError(f"Got an empty image {w}x{h} (encoding {enc!r}); expected width and height > 0.")
    row_bytes = w * channels * dtype.itemsize
    if step < row_bytes:
        raise InputError(
            f"Got step={step} for a {w}x{h} {enc} image; expected step >= {row_bytes} (width * pixel bytes)."
        )
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != step * h:
        raise InputError(
            f"Got {data.size} data bytes for a {w}x{h} {enc} image with step={step}; "
            f"expected step * height = {step * h}."
        )
    rows = data.reshape(h, step)[:, :row_bytes]
    wire = dtype.newbyteorder(">") if (msg.is_bigendian and dtype.itemsize > 1) else dtype
    arr = np.ascontiguousarray(rows).view(wire).reshape((h, w, channels) if channels > 1 else (h, w))
    return arr.astype(dtype, copy=True)


def image_to_rgb(msg) -> np.ndarray:
    """A colour or mono8 Image -> RGB uint8 (H, W, 3). Alpha is dropped, BGR is reordered, mono is replicated."""
    if msg.encoding not in COLOR_ENCODINGS:
        raise InputError(
            f"Got encoding {msg.encoding!r} for a colour image; expected one of {', '.join(COLOR_ENCODINGS)}."
        )
    arr = image_to_numpy(msg)
    enc = msg.encoding
    if enc == "mono8":
        return np.repeat(arr[:, :, None], 3, axis=2)
    if enc == "rgb8":
        return arr
    order = (2, 1, 0) if enc in ("bgr8", "bgra8") else (0, 1, 2)
    out = np.empty(arr.shape[:2] + (3,), np.uint8)
    for c, src in enumerate(order):  # one plane at a time: ~7x faster than a strided (H, W, 3) gather
        out[:, :, c] = arr[:, :, src]
    return out


def image_to_depth(msg) -> np.ndarray:
    """A depth Image -> float32 metres (H, W). 16UC1 millimetres: 0 (no return) becomes NaN. 32FC1 is copied as is."""
    if msg.encoding not in DEPTH_ENCODINGS:
        raise InputError(
            f"Got encoding {msg.encoding!r} for a depth image; expected one of {', '.join(DEPTH_ENCODINGS)}."
        )
    arr = image_to_numpy(msg)
    if msg.encoding == "16UC1":
        depth = arr.astype(np.float32) * np.float32(1e-3)
        depth[arr == 0] = np.nan
        return depth
    return arr


def _field_dtype(field, where: str) -> np.dtype:
    if field.datatype not in POINTFIELD_DTYPES:
        raise InputError(f"Got datatype {field.datatype} for field {field.name!r} in {where}; expected 1..8.")
    if field.count != 1:
        raise InputError(f"Got count {field.count} for field {field.name!r} in {where}; expected 1.")
    return POINTFIELD_DTYPES[field.datatype]


def pointcloud2_to_array(msg, skip_nans: bool = True) -> np.ndarray:
    """PointCloud2 -> structured array of CLOUD_DTYPE (N,) (x, y, z float32 metres; rgb packed float32).

    Reads any layout that has x, y, z (float32 or float64, any offsets, any extra fields, padded rows). Colour comes
    from an `rgb` or `rgba` field (float32 or uint32 packing 0x00RRGGBB); without one, rgb is 0 (black).
    Points with a non-finite coordinate are dropped when `skip_nans` (organised clouds mark holes with NaN).
    Only little-endian clouds are accepted (`is_bigendian` must be false).
    """
    where = f"PointCloud2 (frame {msg.header.frame_id!r})"
    if msg.is_bigendian:
        raise InputError(f"Got is_bigendian=true in {where}; only little-endian clouds are supported.")
    fields = {f.name: f for f in msg.fields}
    missing = [n for n in ("x", "y", "z") if n not in fields]
    if missing:
        raise InputError(f"{where} lacks field(s) {', '.join(missing)}; has {', '.join(fields) or 'none'}.")
    color_name = "rgb" if "rgb" in fields else ("rgba" if "rgba" in fields else None)
    names = ["x", "y", "z"] + ([color_name] if color_name else [])
    dtypes = [_field_dtype(fields[n], where) for n in names]
    for n, dt in zip(names, dtypes, strict=True):
        if n in "xyz" and dt.kind != "f":
            raise InputError(f"Got datatype {dt} for field {n!r} in {where}; expected float32 or float64.")
        if n == color_name and dt.itemsize != 4:
            raise InputError(f"Got datatype {dt} for field {n!r} in {where}; expected a 4-byte packed colour.")
        if fields[n].offset + dt.itemsize > msg.point_step:
            raise InputError(
                f"Field {n!r} at offset {fields[n].offset} ({dt}) overruns point_step={msg.point_step} in {where}."
            )
    h, w, point_step, row_step = int(msg.height), int(msg.width), int(msg.point_step), int(msg.row_step)
    if row_step < w * point_step:
        raise InputError(f"Got row_step={row_step} in {where}; expected >= width * point_step = {w * point_step}.")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != row_step * h:
        raise InputError(f"Got {data.size} data bytes in {where}; expected row_step * height = {row_step * h}.")
    if h * w == 0:
        return np.zeros(0, CLOUD_DTYPE)
    rows = np.ascontiguousarray(data.reshape(h, row_step)[:, : w * point_step])
    view_dtype = np.dtype(
        {
            "names": names,
            "formats": [dt if n in "xyz" else np.dtype("<u4") for n, dt in zip(names, dtypes, strict=True)],
            "offsets": [fields[n].offset for n in names],
            "itemsize": point_step,
        }
    )
    src = rows.view(view_dtype).reshape(-1)
    out = np.empty(src.shape[0], CLOUD_DTYPE)
    for n in ("x", "y", "z"):
        out[n] = src[n]
    if color_name:
        out["rgb"] = (src[color_name] & np.uint32(0x00FFFFFF)).view(np.float32)
    else:
        out["rgb"] = 0.0
    if skip_nans:
        ok = np.isfinite(out["x"]) & np.isfinite(out["y"]) & np.isfinite(out["z"])
        if not ok.all():
            out = out[ok]
    return out


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 RGB -> (N,) float32 holding 0x00RRGGBB bit-for-bit (PCL/RViz packing)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    packed = (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2].astype(np.uint32)
    return packed.view(np.float32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """(N,) float32 packed colours -> (N, 3) uint8 RGB."""
    u = np.ascontiguousarray(packed, dtype=np.float32).view(np.uint32)
    return np.stack([(u >> 16) & 0xFF, (u >> 8) & 0xFF, u & 0xFF], axis=1).astype(np.uint8)


def pointcloud2_to_xyz_rgb(msg, skip_nans: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """PointCloud2 -> (xyz (N, 3) float32 metres, rgb (N, 3) uint8 or None when the cloud has no colour field)."""
    has_color = any(f.name in ("rgb", "rgba") for f in msg.fields)
    arr = pointcloud2_to_array(msg, skip_nans=skip_nans)
    xyz = np.stack([arr["x"], arr["y"], arr["z"]], axis=1)
    return xyz, (unpack_rgb(arr["rgb"]) if has_color else None)
