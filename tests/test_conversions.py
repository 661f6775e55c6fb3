"""Round trips and refusals of stllm_ros.conversions (real message classes, no DDS)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg")

from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField  # noqa: E402

from stllm_core.errors import InputError  # noqa: E402
from stllm_ros import conversions as cv  # noqa: E402

RNG = np.random.default_rng(0)


def _rgb(h=48, w=64):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_color_round_trip_and_rgb_view(encoding):
    rgb = _rgb()
    alpha = RNG.integers(0, 256, rgb.shape[:2] + (1,), dtype=np.uint8)
    wire = rgb[:, :, ::-1] if encoding.startswith("bgr") else rgb
    if encoding.endswith("a8"):
        wire = np.concatenate([wire, alpha], axis=2)
    msg = cv.numpy_to_image(wire, encoding, stamp=12.5, frame_id="cam")
    assert (msg.width, msg.height, msg.step, msg.encoding) == (64, 48, 64 * wire.shape[2], encoding)
    assert msg.header.frame_id == "cam" and cv.stamp_to_sec(msg.header.stamp) == 12.5
    np.testing.assert_array_equal(cv.image_to_numpy(msg), wire)
    out = cv.image_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_mono8_becomes_gray_rgb():
    gray = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    out = cv.image_to_rgb(cv.numpy_to_image(gray, "mono8"))
    assert out.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_16bit_and_bayer_images_from_numpy_decode_on_real_messages():
    rgb16 = RNG.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    msg = cv.numpy_to_image(rgb16, "rgb16")
    assert msg.step == 6 * 3 * 2 and msg.is_bigendian == 0
    np.testing.assert_array_equal(cv.image_to_rgb(msg), (rgb16.astype(np.uint32) * 255 + 32767) // 65535)
    with pytest.raises(InputError, match="expected uint16"):
        cv.numpy_to_image(rgb16.astype(np.uint8), "rgb16")
    flat = np.tile(np.array([[200, 100], [100, 30]], np.uint8), (3, 4))  # RGGB mosaic of (200, 100, 30)
    out = cv.image_to_rgb(cv.numpy_to_image(flat, "bayer_rggb8"))
    np.testing.assert_array_equal(out, np.full((6, 8, 3), [200, 100, 30]))


def test_row_padding_is_removed():
    rgb = _rgb(4, 5)
    padded = np.zeros((4, 5 * 3 + 9), np.uint8)
    padded[:, :15] = rgb.reshape(4, 15)
    padded[:, 15:] = 255  # garbage in the padding must not leak
    msg = Image(height=4, width=5, encoding="rgb8", step=24)
    msg.data = padded.tobytes()
    np.testing.assert_array_equal(cv.image_to_rgb(msg), rgb)


def test_image_does_not_alias_message_buffer():
    msg = cv.numpy_to_image(_rgb(4, 4), "rgb8")
    out = cv.image_to_rgb(msg)
    out[:] = 0
    assert np.frombuffer(msg.data, np.uint8).any()


def test_depth_16uc1_millimetres_to_metres_with_holes():
    mm = np.array([[0, 1, 1500], [65535, 250, 0]], np.uint16)
    msg = cv.numpy_to_image(mm, "16UC1", frame_id="depth")
    assert msg.step == 6
    depth = cv.image_to_depth(msg)
    assert depth.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(depth), mm == 0)
    np.testing.assert_allclose(depth[mm > 0], mm[mm > 0] / 1000.0, rtol=1e-6)


def test_depth_float_to_16uc1_rounds_and_zeroes_invalid():
    m = np.array([[1.2344, np.nan, np.inf], [-1.0, 0.0, 2.0]], np.float32)
    mm = cv.image_to_numpy(cv.numpy_to_image(m, "16UC1"))
    np.testing.assert_array_equal(mm, [[1234, 0, 0], [0, 0, 2000]])
    with pytest.raises(InputError, match="65.535"):
        cv.numpy_to_image(np.full((2, 2), 70.0), "16UC1")


def test_depth_32fc1_exact_and_big_endian():
    m = RNG.uniform(0.1, 9.0, (6, 8)).astype(np.float32)
    m[0, 0] = np.nan
    msg = cv.numpy_to_image(m, "32FC1")
    np.testing.assert_array_equal(cv.image_to_depth(msg), m)
    big = Image(height=6, width=8, encoding="32FC1", step=32, is_bigendian=1)
    big.data = m.astype(">f4").tobytes()
    np.testing.assert_array_equal(cv.image_to_depth(big), m)


@pytest.mark.parametrize("encoding", ["nv21", "8UC3", "64FC1", ""])
def test_unknown_encoding_is_named(encoding):
    msg = Image(height=2, width=2, encoding=encoding, step=6)
    msg.data = bytes(12)
    with pytest.raises(InputError, match="Unsupported image encoding") as e:
        cv.image_to_numpy(msg)
    assert repr(encoding) in str(e.value)


def test_wrong_kind_of_encoding_is_refused():
    with pytest.raises(InputError, match="colour image"):
        cv.image_to_rgb(cv.numpy_to_image(np.ones((2, 2), np.float32), "32FC1"))
    with pytest.raises(InputError, match="depth image"):
        cv.image_to_depth(cv.numpy_to_image(_rgb(2, 2), "rgb8"))


def test_step_and_size_mismatch_are_refused():
    msg = Image(height=4, width=5, encoding="rgb8", step=14)
    msg.data = bytes(14 * 4)
    with pytest.raises(InputError, match="step=14"):
        cv.image_to_numpy(msg)
    msg = Image(height=4, width=5, encoding="rgb8", step=15)
    msg.data = bytes(15 * 4 - 1)
    with pytest.raises(InputError, match="59 data bytes"):
        cv.image_to_numpy(msg)
    with pytest.raises(InputError, match="empty image"):
        cv.image_to_numpy(Image(height=0, width=5, encoding="rgb8", step=15))


def test_numpy_to_image_refuses_bad_shapes_and_dtypes():
    with pytest.raises(InputError, match=r"shape \(4, 4\)"):
        cv.numpy_to_image(np.zeros((4, 4), np.uint8), "rgb8")
    with pytest.raises(InputError, match="dtype float64"):
        cv.numpy_to_image(np.zeros((4, 4, 3)), "rgb8")
    with pytest.raises(InputError, match="Unsupported"):
        cv.numpy_to_image(np.zeros((4, 4, 3), np.uint8), "jpeg")


# ------------------------------------------------------------------------------------------------- CameraInfo


def test_camera_info_round_trip_and_refusals():
    K = np.array([[525.0, 0, 319.5], [0, 525.0, 239.5], [0, 0, 1]])
    model = cv.camera_info_to_model(cv.K_to_camera_info(K, 640, 480, stamp=3.0, frame_id="cam"))
    assert (model.width, model.height, model.distorted) == (640, 480, False)
    cam = model.pinhole()
    np.testing.assert_array_equal(cam.K, K)
    assert cam.maps is None  # a zero D: the images are pinhole already
    with pytest.raises(InputError, match="fx, fy > 0"):
        cv.camera_info_to_model(CameraInfo(width=640, height=480))  # all-zero K, as an unconfigured driver sends
    with pytest.raises(InputError, match="0x480"):
        cv.camera_info_to_model(cv.K_to_camera_info(np.eye(3), 0, 480))
    info = cv.K_to_camera_info(K, 640, 480)
    info.distortion_model, info.d = "kannala_brandt_9", [0.1, 0.0, 0.0, 0.0]
    with pytest.raises(InputError, match="'kannala_brandt_9' with non-zero D .* plumb_bob"):
        cv.camera_info_to_model(info)
    info.d = [0.0] * 4  # an unknown model with a zero D is a pinhole camera
    assert not cv.camera_info_to_model(info).distorted
    info.p = [5.0] * 12  # P[2,2] must be 1
    with pytest.raises(InputError, match="P="):
        cv.camera_info_to_model(info)


def _distorted_info(model: str, D: list[float]) -> CameraInfo:
    K = np.array([[300.0, 0, 161.0], [0, 305.0, 118.0], [0, 0, 1]])
    info = cv.K_to_camera_info(K, 320, 240, frame_id="cam")
    info.distortion_model, info.d = model, D
    P = np.zeros((3, 4))
    P[:, :3] = [[280.0, 0, 159.5], [0, 280.0, 119.5], [0, 0, 1]]  # the rectified camera image_proc would publish
    info.p = P.ravel().tolist()
    return info


@pytest.mark.parametrize("model,D", [("plumb_bob", [-0.28, 0.07, 0.001, -0.0005, 0.0]),
                                     ("rational_polynomial", [-0.35, 0.1, 0.0005, 0.0, 0.0, 0.02, 0.0, 0.0]),
                                     ("equidistant", [0.05, -0.01, 0.002, 0.0])])
def test_raw_distorted_images_are_undistorted_into_P(model, D):
    """A point seen at its distorted pixel in a raw image lands at its pinhole pixel under P after undistortion."""
    import cv2

    info = _distorted_info(model, D)
    K, P = np.array(info.k).reshape(3, 3), np.array(info.p).reshape(3, 4)[:, :3]
    cam = cv.camera_info_to_model(info).pinhole()
    np.testing.assert_array_equal(cam.K, P)
    for X in ([0.3, -0.2, 1.0], [-0.35, 0.25, 1.0], [0.0, 0.0, 1.0]):
        obj = np.array([X], np.float64)
        if model == "equidistant":
            raw = cv2.fisheye.projectPoints(obj[None], np.zeros(3), np.zeros(3), K, np.array(D))[0][0, 0]
        else:
            raw = cv2.projectPoints(obj, np.zeros(3), np.zeros(3), K, np.array(D))[0][0, 0]
        img = np.zeros((240, 320, 3), np.uint8)
        cv2.circle(img, (int(round(raw[0])), int(round(raw[1]))), 2, (255, 255, 255), -1)
        out = cam.image(img)
        ys, xs = np.nonzero(out[..., 0] > 128)
        want = P @ obj[0] / obj[0][2]
        assert xs.size and abs(xs.mean() - want[0]) < 1.5 and abs(ys.mean() - want[1]) < 1.5, (X, xs.mean(), ys.mean())
        pinhole_K = K @ obj[0] / obj[0][2]  # where rays from K alone would expect the point in the raw image
        assert X[0] == 0 or np.hypot(*(pinhole_K[:2] - raw)) > 3


def test_depth_is_undistorted_by_nearest_sample_and_rectified_images_use_P():
    info = _distorted_info("plumb_bob", [-0.28, 0.07, 0.001, -0.0005, 0.0])
    depth = np.where(np.arange(320)[None, :] < 160, 1.0, 3.0).astype(np.float32).repeat(240, 0)
    out = cv.camera_info_to_model(info).pinhole().depth(depth)
    values = set(np.unique(out[np.isfinite(out)]).tolist())
    assert values == {1.0, 3.0}  # never a blend of two depths (a point in the air)
    assert np.isnan(out).any()  # outside the raw image: no measurement
    rect = cv.camera_info_to_model(info).pinhole(rectified=True)
    np.testing.assert_array_equal(rect.K, np.array(info.p).reshape(3, 4)[:, :3])
    assert rect.image(depth) is depth and rect.maps is None


# ------------------------------------------------------------------------------------------------ PointCloud2


def test_cloud_round_trip_exact():
    xyz = RNG.normal(size=(100, 3)).astype(np.float32)
    rgb = RNG.integers(0, 256, (100, 3), dtype=np.uint8)
    msg = cv.array_to_pointcloud2(xyz, rgb, stamp=1.25, frame_id="map")
    assert (msg.point_step, msg.row_step, msg.height, msg.width) == (16, 1600, 1, 100)
    arr = cv.pointcloud2_to_array(msg)
    assert arr.dtype == cv.CLOUD_DTYPE
    xyz2, rgb2 = cv.pointcloud2_to_xyz_rgb(msg)
    np.testing.assert_array_equal(xyz2, xyz)
    np.testing.assert_array_equal(rgb2, rgb)
    np.testing.assert_array_equal(cv.unpack_rgb(arr["rgb"]), rgb)


def test_pack_rgb_is_pcl_layout():
    packed = cv.pack_rgb(np.array([[255, 128, 1]], np.uint8))
    assert packed.view(np.uint32)[0] == 0x00FF8001


def test_cloud_without_color():
    xyz = RNG.normal(size=(10, 3)).astype(np.float32)
    msg = cv.array_to_pointcloud2(xyz)
    assert msg.point_step == 12
    xyz2, rgb2 = cv.pointcloud2_to_xyz_rgb(msg)
    np.testing.assert_array_equal(xyz2, xyz)
    assert rgb2 is None
    assert np.all(cv.pointcloud2_to_array(msg)["rgb"] == 0)


def _foreign_cloud(h, w, xyz, rgba_u32, pad_row=8):
    """An organised cloud laid out like a depth-camera driver: intensity first, float64 xyz, uint32 rgba, padding."""
    dt = np.dtype(
        {
            "names": ["intensity", "x", "y", "z", "rgba"],
            "formats": ["<f4", "<f8", "<f8", "<f8", "<u4"],
            "offsets": [0, 8, 16, 24, 32],
            "itemsize": 40,
        }
    )
    pts = np.zeros(h * w, dt)
    pts["intensity"] = 7.0
    pts["x"], pts["y"], pts["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    pts["rgba"] = rgba_u32
    rows = np.zeros((h, w * 40 + pad_row), np.uint8)
    rows[:, : w * 40] = pts.view(np.uint8).reshape(h, w * 40)
    msg = PointCloud2(height=h, width=w, point_step=40, row_step=w * 40 + pad_row, is_bigendian=False)
    msg.header.frame_id = "camera_depth_optical_frame"
    msg.fields = [
        PointField(name="intensity", offset=0, datatype=PointField.FLOAT32, count=1),
        PointField(name="x", offset=8, datatype=PointField.FLOAT64, count=1),
        PointField(name="y", offset=16, datatype=PointField.FLOAT64, count=1),
        PointField(name="z", offset=24, datatype=PointField.FLOAT64, count=1),
        PointField(name="rgba", offset=32, datatype=PointField.UINT32, count=1),
    ]
    msg.data = rows.tobytes()
    return msg


def test_cloud_any_layout_padded_rows_and_nan_skipping():
    h, w = 3, 4
    xyz = RNG.normal(size=(h * w, 3))
    xyz[[1, 6]] = np.nan  # holes of an organised cloud
    rgb = RNG.integers(0, 256, (h * w, 3), dtype=np.uint8)
    rgba = (0xFF << 24) | (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2]
    msg = _foreign_cloud(h, w, xyz, rgba.astype(np.uint32))
    xyz2, rgb2 = cv.pointcloud2_to_xyz_rgb(msg)
    keep = np.isfinite(xyz).all(axis=1)
    assert xyz2.shape == (keep.sum(), 3) and xyz2.dtype == np.float32
    np.testing.assert_array_equal(xyz2, xyz[keep].astype(np.float32))
    np.testing.assert_array_equal(rgb2, rgb[keep])
    assert cv.pointcloud2_to_array(msg, skip_nans=False).shape == (h * w,)


def test_cloud_refusals():
    msg = cv.array_to_pointcloud2(np.zeros((4, 3), np.float32))
    msg.fields = msg.fields[:2]
    with pytest.raises(InputError, match="lacks field.*z"):
        cv.pointcloud2_to_array(msg)
    msg = cv.array_to_pointcloud2(np.zeros((4, 3), np.float32))
    msg.data = bytes(47)
    with pytest.raises(InputError, match="47 data bytes"):
        cv.pointcloud2_to_array(msg)
    msg = cv.array_to_pointcloud2(np.zeros((4, 3), np.float32))
    msg.fields[2].datatype = PointField.INT32
    with pytest.raises(InputError, match="field 'z'"):
        cv.pointcloud2_to_array(msg)
    msg = cv.array_to_pointcloud2(np.zeros((4, 3), np.float32))
    msg.fields[2].offset = 10
    with pytest.raises(InputError, match="overruns point_step"):
        cv.pointcloud2_to_array(msg)
    with pytest.raises(InputError, match=r"shape \(4, 2\)"):
        cv.array_to_pointcloud2(np.zeros((4, 2)))


def test_empty_cloud():
    msg = cv.array_to_pointcloud2(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8))
    xyz, rgb = cv.pointcloud2_to_xyz_rgb(msg)
    assert xyz.shape == (0, 3) and rgb.shape == (0, 3)


# ------------------------------------------------------------------------------------------------- transforms


def test_transform_round_trip():
    q = np.array([0.1, -0.2, 0.3, 0.9])
    q /= np.linalg.norm(q)
    t = np.array([1.5, -2.0, 0.25])
    msg = cv.transform_to_msg("odom", "base_link", 1700000000.125, t, q)  # exactly representable in float64
    parent, child, stamp, t2, q2 = cv.transform_from_msg(msg)
    assert (parent, child) == ("odom", "base_link")
    assert msg.header.stamp.sec == 1700000000 and msg.header.stamp.nanosec == 125_000_000
    assert stamp == 1700000000.125
    np.testing.assert_array_equal(t2, t)
    np.testing.assert_allclose(q2, q, atol=1e-15)


def test_transform_strips_leading_slash_and_renormalises_small_drift():
    msg = cv.transform_to_msg("/map", "/odom", 1.0, np.zeros(3), np.array([0, 0, 0, 1.0005]))
    parent, child, _, _, q = cv.transform_from_msg(msg)
    assert (parent, child) == ("map", "odom")
    assert abs(np.linalg.norm(q) - 1.0) < 1e-12
    # what `ros2 run tf2_ros static_transform_publisher --qz 0.706 --qw 0.706 ...` sends, accepted as tf2 does
    msg = cv.transform_to_msg("base_link", "camera_link", 0.0, np.zeros(3), np.array([0, 0, 0.706, 0.706]))
    np.testing.assert_allclose(cv.transform_from_msg(msg)[4], [0, 0, 2 ** -0.5, 2 ** -0.5], atol=1e-12)


@pytest.mark.parametrize(
    "q", [[0, 0, 0, 0], [np.nan, 0, 0, 1], [0, 0, np.inf, 1], [0, 0, 0, 2.0], [0.5, 0.5, 0.5, 0.4]]
)
def test_transform_refuses_bad_quaternions(q):
    msg = cv.transform_to_msg("map", "odom", 1.0, np.zeros(3), np.array(q, float))
    with pytest.raises(InputError, match="quaternion of map -> odom.*(not normalised|non-finite)"):
        cv.transform_from_msg(msg)


def test_transform_refuses_bad_frames_and_translation():
    with pytest.raises(InputError, match="distinct"):
        cv.transform_from_msg(cv.transform_to_msg("map", "map", 1.0, np.zeros(3), np.array([0, 0, 0, 1.0])))
    with pytest.raises(InputError, match="distinct"):
        cv.transform_from_msg(cv.transform_to_msg("", "odom", 1.0, np.zeros(3), np.array([0, 0, 0, 1.0])))
    nan_t = cv.transform_to_msg("map", "odom", 1.0, np.array([np.nan, 0, 0]), np.array([0, 0, 0, 1.0]))
    with pytest.raises(InputError, match="translation"):
        cv.transform_from_msg(nan_t)


def test_stamp_conversion():
    assert cv.stamp_to_sec(cv.sec_to_stamp(5.000000001)) == pytest.approx(5.000000001, abs=1e-12)
    t = cv.sec_to_stamp(0.9999999999)
    assert (t.sec, t.nanosec) == (1, 0)
    with pytest.raises(InputError, match="stamp"):
        cv.sec_to_stamp(-1.0)
