"""Decoding of what real ROS 2 camera drivers publish (stllm_core.data.sensor_arrays), against OpenCV and known values.

Messages are duck-typed namespaces (the decoders read fields only; tests/test_conversions.py covers rclpy messages):
every colour encoding of sensor_msgs/image_encodings.hpp the decoder claims (8/16-bit RGB/BGR(A), mono, YUV 4:2:2,
Bayer), row padding and big-endian data, image_transport CompressedImage (jpeg/png) and compressedDepth, REP-117 +-Inf
depth, big-endian PointCloud2, and bags whose camera topics are CompressedImage.
"""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from stllm_core.data import sensor_arrays as sa
from stllm_core.errors import InputError

RNG = np.random.default_rng(7)
H, W = 24, 32


def _smooth_rgb(h=H, w=W) -> np.ndarray:
    """A smooth colour image (demosaicing and JPEG are exact up to a few levels on it)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([40 + 180 * x / w, 60 + 150 * y / h, 200 - 120 * (x + y) / (w + h)], axis=2)
    return np.rint(rgb).astype(np.uint8)


def image(arr: np.ndarray, encoding: str, big_endian: bool = False, pad: int = 0) -> SimpleNamespace:
    """A sensor_msgs/Image with `arr` in its wire layout, `pad` garbage bytes after each row."""
    a = np.ascontiguousarray(arr)
    a = a.astype(a.dtype.newbyteorder(">" if big_endian else "<"))
    h, w = a.shape[:2]
    row = a.reshape(h, -1).view(np.uint8)
    rows = np.full((h, row.shape[1] + pad), 0xAB, np.uint8)
    rows[:, : row.shape[1]] = row
    return SimpleNamespace(header=SimpleNamespace(frame_id="cam"), height=h, width=w, encoding=encoding,
                           is_bigendian=big_endian, step=rows.shape[1], data=rows.tobytes())


def compressed(data: bytes | np.ndarray, fmt: str) -> SimpleNamespace:
    return SimpleNamespace(header=SimpleNamespace(frame_id="cam"), format=fmt,
                           data=data if isinstance(data, bytes) else np.ascontiguousarray(data, np.uint8).tobytes())


# ------------------------------------------------------------------------------------------------- sensor_msgs/Image


@pytest.mark.parametrize(("encoding", "code"), [("rgb8", None), ("bgr8", cv2.COLOR_RGB2BGR),
                                                ("rgba8", cv2.COLOR_RGB2RGBA), ("bgra8", cv2.COLOR_RGB2BGRA)])
def test_8bit_colour_with_row_padding(encoding, code):
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    wire = rgb if code is None else cv2.cvtColor(rgb, code)
    out = sa.image_to_rgb(image(wire, encoding, pad=5))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_mono8_is_replicated():
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    np.testing.assert_array_equal(sa.image_to_rgb(image(gray, "mono8", pad=3)), cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize(("encoding", "code"), [("rgb16", None), ("bgr16", cv2.COLOR_RGB2BGR),
                                                ("rgba16", cv2.COLOR_RGB2RGBA), ("bgra16", cv2.COLOR_RGB2BGRA),
                                                ("mono16", None)])
def test_16bit_colour_scaled_as_cv_bridge(encoding, code, big_endian):
    shape = (H, W) if encoding == "mono16" else (H, W, 3)
    rgb16 = RNG.integers(0, 65536, shape, dtype=np.uint16)
    rgb16.flat[:4] = [0, 65535, 32768, 128]
    wire = rgb16 if code is None else cv2.cvtColor(rgb16, code)
    out = sa.image_to_rgb(image(wire, encoding, big_endian=big_endian, pad=2))
    # cv_bridge's 16 -> 8 bit conversion is convertTo(CV_8U, 255/65535): saturate(round(v * 255 / 65535))
    expected = cv2.convertScaleAbs(rgb16, alpha=255.0 / 65535.0)
    if encoding == "mono16":
        expected = cv2.cvtColor(expected, cv2.COLOR_GRAY2RGB)
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out.astype(int) - (np.atleast_3d(rgb16) >> 8)).max() <= 1  # within 1 of v >> 8


def _uyvy_bytes(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(H, W) luma and (H, W/2) chroma planes -> UYVY (H, W, 2): U0 Y0 V0 Y1 ..."""
    out = np.empty(y.shape + (2,), np.uint8)
    out[:, :, 1] = y
    out[:, 0::2, 0], out[:, 1::2, 0] = u, v
    return out


@pytest.mark.parametrize("encoding", ["uyvy", "yuv422", "yuyv", "yuv422_yuy2"])
def test_yuv422_known_values_and_opencv_round_trip(encoding):
    uyvy = encoding in ("uyvy", "yuv422")  # "yuv422" is ROS's (deprecated) name of UYVY, "yuv422_yuy2" of YUYV
    # known values: BT.601 limited range (what OpenCV and cv_bridge use), R = 1.164 (Y-16) + 1.596 (V-128), ...
    y = np.array([[16, 235, 100, 100, 180, 180]], np.uint8)
    u = np.array([[128, 200, 40]], np.uint8)
    v = np.array([[128, 60, 220]], np.uint8)
    wire = _uyvy_bytes(y, u, v)
    if not uyvy:
        wire = wire[:, :, ::-1].copy()  # Y0 U0 Y1 V0
        wire[:, 0::2, 1], wire[:, 1::2, 1] = u, v
        wire[:, :, 0] = y
    yf, uf, vf = 1.164 * (y - 16.0), np.repeat(u - 128.0, 2, axis=1), np.repeat(v - 128.0, 2, axis=1)
    formula = np.stack([yf + 1.596 * vf, yf - 0.392 * uf - 0.813 * vf, yf + 2.017 * uf], axis=2)
    out = sa.image_to_rgb(image(wire, encoding))
    assert np.abs(out.astype(float) - np.clip(formula, 0, 255)).max() <= 1.0
    np.testing.assert_array_equal(out[0, :2], [[0, 0, 0], [255, 255, 255]])
    # round trip through OpenCV's encoder (colour constant over each pixel pair: chroma is shared)
    rgb = np.repeat(_smooth_rgb(H, W // 2), 2, axis=1)
    wire = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY if uyvy else cv2.COLOR_RGB2YUV_YUYV)
    out = sa.image_to_rgb(image(wire, encoding, pad=4))
    assert out.shape == (H, W, 3) and np.abs(out.astype(int) - rgb).max() <= 3


def test_yuv422_odd_width_is_refused():
    with pytest.raises(InputError, match="even width"):
        sa.image_to_rgb(image(np.zeros((2, 3, 2), np.uint8), "uyvy"))


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """RGB (H, W, 3) -> Bayer mosaic; `pattern` names the colours of the top-left 2x2 block, row-major (ROS)."""
    m = np.empty(rgb.shape[:2], rgb.dtype)
    for i, c in enumerate(pattern):
        dy, dx = divmod(i, 2)
        m[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(c)]
    return m


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_patterns_round_trip(pattern):
    flat = np.empty((H, W, 3), np.uint8)
    flat[:] = (200, 100, 30)
    out = sa.image_to_rgb(image(_mosaic(flat, pattern), f"bayer_{pattern}8", pad=1))
    np.testing.assert_array_equal(out, flat)  # a flat colour comes back exactly, borders included
    for other in {"rggb", "bggr", "gbrg", "grbg"} - {pattern}:  # the test tells the patterns apart
        assert not np.array_equal(sa.image_to_rgb(image(_mosaic(flat, pattern), f"bayer_{other}8")), flat)
    smooth = _smooth_rgb()
    out = sa.image_to_rgb(image(_mosaic(smooth, pattern), f"bayer_{pattern}8"))
    assert np.abs(out[2:-2, 2:-2].astype(int) - smooth[2:-2, 2:-2]).max() <= 4
    # 16-bit Bayer (big endian here): scaled to 8 bit like the colour encodings, then demosaiced
    wide = _mosaic(smooth.astype(np.uint16) * 257, pattern)
    out16 = sa.image_to_rgb(image(wide, f"bayer_{pattern}16", big_endian=True))
    np.testing.assert_array_equal(out16, out)


def test_unsupported_encodings_name_the_encoding_and_the_supported_ones():
    for enc in ("nv21", "8UC3", "32FC1"):
        with pytest.raises(InputError, match=f"'{enc}'.*supported: rgb8, bgr8.*bayer_rggb8") as e:
            sa.image_to_rgb(image(np.zeros((2, 2, 3), np.uint8), enc))
        assert "yuyv" in str(e.value) and "mono16" in str(e.value)
    with pytest.raises(InputError, match="'mono16' for a depth image; supported: 16UC1, 32FC1"):
        sa.image_to_depth(image(np.zeros((2, 2), np.uint16), "mono16"))


# ------------------------------------------------------------------------------------------------------------ depth


def test_depth_16uc1_big_endian_and_rep117_infinities_kept():
    mm = np.array([[0, 1500, 65535]], np.uint16)
    d = sa.image_to_depth(image(mm, "16UC1", big_endian=True, pad=2))
    np.testing.assert_allclose(d, [[np.nan, 1.5, 65.535]], rtol=1e-6)
    m = np.array([[1.0, np.nan, np.inf, -np.inf]], np.float32)
    np.testing.assert_array_equal(sa.image_to_depth(image(m, "32FC1", big_endian=True)), m)


def test_infinite_depth_is_no_measurement_not_bad_input():
    from stllm_core.memory import SceneMap, SceneMapConfig

    smap = SceneMap(SceneMapConfig(voxel_size=0.1))
    depth = np.full((8, 8), 2.0, np.float32)
    depth[0, :4] = [np.inf, -np.inf, np.nan, 0.0]
    K = np.array([[8.0, 0, 3.5], [0, 8.0, 3.5], [0, 0, 1]])
    assert smap.integrate_depth(depth, K, np.eye(4)) > 0
    counts = smap.stats()["counts"]
    assert counts.get("bad_input", 0) == 0 and counts["depth_invalid_pixels"] == 4, counts


# ------------------------------------------------------------------------------------------------- CompressedImage


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8", "bgr8; jpeg compressed bgr8"])
def test_compressed_jpeg(fmt):
    rgb = _smooth_rgb()
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    out = sa.compressed_to_rgb(compressed(buf, fmt))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 2.0 and np.abs(out.astype(int) - rgb).max() <= 12


def test_compressed_png_exact_in_every_layout():
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    for fmt, arr in [("png", bgr), ("bgr8; png compressed bgr8", bgr), ("rgba8; png compressed bgr8", bgr),
                     ("rgb8; png compressed rgb8", rgb),  # an old publisher that encoded RGB bytes as they were
                     ("png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA))]:
        out = sa.compressed_to_rgb(compressed(cv2.imencode(".png", arr)[1], fmt))
        np.testing.assert_array_equal(out, rgb, err_msg=fmt)
    gray = rgb[:, :, 0].copy()
    out = sa.compressed_to_rgb(compressed(cv2.imencode(".png", gray)[1], "mono8; png compressed "))
    np.testing.assert_array_equal(out, cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))
    bgr16 = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    out = sa.compressed_to_rgb(compressed(cv2.imencode(".png", bgr16)[1], "rgb16; png compressed bgr16"))
    np.testing.assert_array_equal(out, cv2.cvtColor(cv2.convertScaleAbs(bgr16, alpha=255 / 65535), cv2.COLOR_BGR2RGB))


def test_compressed_refusals():
    with pytest.raises(InputError, match="Could not decode 64 bytes"):
        sa.compressed_to_rgb(compressed(RNG.integers(0, 256, 64, dtype=np.uint8), "jpeg"))
    with pytest.raises(InputError, match="Could not decode 0 bytes"):
        sa.compressed_to_rgb(compressed(b"", "png"))
    with pytest.raises(InputError, match="compressed_depth_to_metres"):
        sa.compressed_to_rgb(compressed(b"xyz", "16UC1; compressedDepth png"))


def _depth_header(a: float = 0.0, b: float = 0.0) -> bytes:
    return np.array([(0, a, b)], sa.COMPRESSED_DEPTH_HEADER).tobytes()


def test_compressed_depth_16uc1_png():
    mm = RNG.integers(300, 9000, (H, W)).astype(np.uint16)
    mm[0, :3] = 0
    data = _depth_header() + cv2.imencode(".png", mm)[1].tobytes()
    assert len(_depth_header()) == 12
    for fmt in ("16UC1; compressedDepth png", "16UC1; compressedDepth", "16UC1"):
        d = sa.compressed_depth_to_metres(compressed(data, fmt))
        assert d.dtype == np.float32 and d.shape == (H, W)
        np.testing.assert_array_equal(np.isnan(d), mm == 0)
        np.testing.assert_allclose(d[mm > 0], mm[mm > 0] / 1000.0, rtol=1e-6)


def test_compressed_depth_32fc1_inverse_depth_quantization():
    # the publisher's encoding (compressed_depth_image_transport, defaults depth_quantization=100, depth_max=10 m)
    z0, depth_max = np.float32(100.0), np.float32(10.0)
    a = z0 * (z0 + np.float32(1.0))
    b = np.float32(1.0) - a / depth_max
    depth = RNG.uniform(0.3, 9.5, (H, W)).astype(np.float32)
    depth[0, :4] = [np.nan, np.inf, 10.0, 12.0]  # no return, too far, at and beyond depth_max: all coded 0
    with np.errstate(invalid="ignore"):
        inv = np.where(depth < depth_max, a / depth + b, 0).astype(np.uint16)  # float -> ushort truncates
    data = _depth_header(a, b) + cv2.imencode(".png", inv)[1].tobytes()
    d = sa.compressed_depth_to_metres(compressed(data, "32FC1; compressedDepth png"))
    valid = np.isfinite(depth) & (depth < depth_max)
    np.testing.assert_array_equal(np.isnan(d), ~valid)
    step = depth[valid] ** 2 / a  # one quantization step of inverse depth, in metres
    assert np.all(np.abs(d[valid] - depth[valid]) <= step * 1.01 + 1e-6)


def test_compressed_depth_refusals():
    png = cv2.imencode(".png", np.ones((2, 2), np.uint16))[1].tobytes()
    with pytest.raises(InputError, match=r"'mono8'.*supported: 16UC1, 32FC1"):
        sa.compressed_depth_to_metres(compressed(_depth_header() + png, "mono8; compressedDepth png"))
    with pytest.raises(InputError, match="'compressedDepth rvl'.*supported: 'compressedDepth png'"):
        sa.compressed_depth_to_metres(compressed(_depth_header() + png, "16UC1; compressedDepth rvl"))
    with pytest.raises(InputError, match="12-byte header"):
        sa.compressed_depth_to_metres(compressed(_depth_header(), "16UC1; compressedDepth png"))
    with pytest.raises(InputError, match="single-channel 16-bit PNG"):
        rgb_png = cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))[1].tobytes()
        sa.compressed_depth_to_metres(compressed(_depth_header() + rgb_png, "16UC1; compressedDepth png"))
    with pytest.raises(InputError, match="depth quantization"):
        sa.compressed_depth_to_metres(compressed(_depth_header(0.0, 1.0) + png, "32FC1; compressedDepth png"))


# ----------------------------------------------------------------------------------------------------- PointCloud2


def _cloud(xyz: np.ndarray, rgb_u32: np.ndarray, order: str) -> SimpleNamespace:
    """x, y, z float64 at 8/16/24 and rgb uint32 at 32 (intensity float32 at 0), byte order `order`."""
    dt = np.dtype({"names": ["intensity", "x", "y", "z", "rgb"],
                   "formats": [order + "f4", order + "f8", order + "f8", order + "f8", order + "u4"],
                   "offsets": [0, 8, 16, 24, 32], "itemsize": 40})
    pts = np.zeros(len(xyz), dt)
    pts["x"], pts["y"], pts["z"], pts["rgb"], pts["intensity"] = xyz[:, 0], xyz[:, 1], xyz[:, 2], rgb_u32, 3.0
    f = [SimpleNamespace(name=n, offset=o, datatype=t, count=1)
         for n, o, t in [("intensity", 0, 7), ("x", 8, 8), ("y", 16, 8), ("z", 24, 8), ("rgb", 32, 6)]]
    return SimpleNamespace(header=SimpleNamespace(frame_id="lidar"), height=1, width=len(xyz), fields=f,
                           is_bigendian=order == ">", point_step=40, row_step=40 * len(xyz), data=pts.tobytes())


def test_big_endian_pointcloud2_is_byte_swapped():
    xyz = RNG.normal(size=(20, 3))
    xyz[3] = np.nan
    rgb = RNG.integers(0, 256, (20, 3), dtype=np.uint8)
    packed = sa.pack_rgb(rgb).view(np.uint32) | np.uint32(0xFF000000)
    big = _cloud(xyz, packed, ">")
    xyz_b, rgb_b = sa.pointcloud2_to_xyz_rgb(big)
    keep = np.isfinite(xyz).all(axis=1)
    np.testing.assert_array_equal(xyz_b, xyz[keep].astype(np.float32))
    np.testing.assert_array_equal(rgb_b, rgb[keep])
    little = sa.pointcloud2_to_array(_cloud(xyz, packed, "<"), skip_nans=False)
    np.testing.assert_array_equal(sa.pointcloud2_to_array(big, skip_nans=False).view(np.uint8), little.view(np.uint8))


# ------------------------------------------------------------------------------------------- bags with compression


def test_bag_with_compressed_colour_and_depth_topics(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from stllm_core.data.bags import T_LINK_OPTICAL, _Msgs, read_bag_clip

    ts = get_typestore(Stores.ROS2_KILTED)
    M = _Msgs(ts)
    CompressedImage = ts.types["sensor_msgs/msg/CompressedImage"]
    K = np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]])
    rgb = _smooth_rgb()
    mm = RNG.integers(300, 5000, (H, W)).astype(np.uint16)
    mm[0, 0] = 0
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    depth_data = np.frombuffer(_depth_header() + cv2.imencode(".png", mm)[1].tobytes(), np.uint8)
    s0 = 1_000 * 10**9
    with Writer(tmp_path / "bag", version=9, storage_plugin=StoragePlugin.MCAP) as w:
        topics = {
            "/tf_static": "tf2_msgs/msg/TFMessage",
            "/camera/color/camera_info": "sensor_msgs/msg/CameraInfo",
            "/camera/color/image_raw/compressed": "sensor_msgs/msg/CompressedImage",
            "/camera/depth/image_raw/compressedDepth": "sensor_msgs/msg/CompressedImage",
        }
        conns = {t: w.add_connection(t, ty, typestore=ts) for t, ty in topics.items()}

        def write(topic, msg):
            w.write(conns[topic], s0, ts.serialize_cdr(msg, topics[topic]))

        T = np.eye(4)
        write("/tf_static", M.TFMessage(transforms=[M.transform(s0, "map", "camera_link", T),
                                                    M.transform(s0, "camera_link", "cam", T_LINK_OPTICAL)]))
        write("/camera/color/camera_info", M.camera_info(s0, "cam", K, W, H))
        write("/camera/color/image_raw/compressed",
              CompressedImage(header=M.header(s0, "cam"), format="rgb8; jpeg compressed bgr8", data=jpeg.ravel()))
        write("/camera/depth/image_raw/compressedDepth",
              CompressedImage(header=M.header(s0, "cam"), format="16UC1; compressedDepth png", data=depth_data))
    clip = read_bag_clip(tmp_path / "bag", image_topic="/camera/color/image_raw/compressed",
                         depth_topic="/camera/depth/image_raw/compressedDepth", points_topic=None)
    (f,) = clip.frames
    assert f.image.shape == (H, W, 3) and np.abs(f.image.astype(int) - rgb).mean() < 2.0
    np.testing.assert_array_equal(np.isnan(f.depth), mm == 0)
    np.testing.assert_allclose(f.depth[mm > 0], mm[mm > 0] / 1000.0, rtol=1e-6)
