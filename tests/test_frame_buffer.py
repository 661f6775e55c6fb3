"""FrameBuffer: bounds (count, age, bytes), pending poses, uniform and coverage selection, bad input, threads."""

import logging
import threading

import numpy as np
import pytest

from stllm_core.errors import ConfigError, InputError
from stllm_core.geometry.poses import make_transform
from stllm_core.memory import ExtrapolationError, FrameBuffer, FrameBufferConfig, TransformBuffer, uniform_indices
from stllm_core.memory.voxels import depth_to_world_points, key_centers, pack_keys, unpack_keys, voxel_keys

K = np.array([[50.0, 0.0, 16.0], [0.0, 50.0, 12.0], [0.0, 0.0, 1.0]])
ID = [0.0, 0.0, 0.0, 1.0]


def img(value: int = 0, h: int = 24, w: int = 32) -> np.ndarray:
    return np.full((h, w, 3), value % 256, np.uint8)


def pose_x(x: float) -> np.ndarray:
    return make_transform([x, 0.0, 0.0], ID)


def filled(n: int, dt: float = 0.1, **cfg) -> FrameBuffer:
    buf = FrameBuffer(FrameBufferConfig(**cfg))
    for i in range(n):
        buf.add(i * dt, img(i), K, pose_x(i * dt))
    return buf


def test_config_is_validated():
    with pytest.raises(ConfigError, match="max_frames"):
        FrameBufferConfig(max_frames=0)
    with pytest.raises(ConfigError, match="max_age_sec"):
        FrameBufferConfig(max_age_sec=-1.0)
    FrameBufferConfig(max_age_sec=float("inf"))  # no age bound is allowed


def test_count_bound_evicts_oldest():
    buf = filled(25, max_frames=10)
    frames = buf.frames()
    assert [round(f.stamp, 6) for f in frames] == [round(i * 0.1, 6) for i in range(15, 25)]
    assert buf.stats()["dropped"] == {"evicted_count": 15}
    # stored arrays are copies and read-only
    assert not frames[0].image.flags.writeable and frames[0].T_world_cam[0, 3] == pytest.approx(1.5)


def test_age_bound_is_relative_to_the_newest_stamp():
    buf = filled(30, dt=0.5, max_age_sec=3.0)  # stamps 0 .. 14.5
    stamps = [f.stamp for f in buf.frames()]
    assert stamps[0] == 11.5 and stamps[-1] == 14.5 and len(stamps) == 7


def test_memory_stays_within_bounds_when_fed_ten_times_capacity():
    frame_bytes = 24 * 32 * 3 + 24 * 32 * 4  # image + float32 depth
    cfg = dict(max_frames=1000, max_bytes=20 * frame_bytes)
    buf = FrameBuffer(FrameBufferConfig(**cfg))
    for i in range(200):  # 10x the byte capacity
        buf.add(float(i), img(i), K, pose_x(i), depth=np.ones((24, 32), np.float32))
        assert buf.nbytes <= cfg["max_bytes"]
    s = buf.stats()
    assert s["frames"] == 20 and s["bytes"] == 20 * frame_bytes and s["dropped"]["evicted_bytes"] == 180
    with pytest.raises(InputError, match="exceeds max_bytes"):
        buf.add(500.0, img(0, 240, 320), K, pose_x(0))


def test_out_of_order_and_duplicate_stamps():
    buf = FrameBuffer()
    for s in (1.0, 3.0, 2.0):
        buf.add(s, img(int(s)), K, pose_x(s))
    buf.add(2.0, img(99), K, pose_x(20.0))  # replaces the frame at 2.0
    frames = buf.frames()
    assert [f.stamp for f in frames] == [1.0, 2.0, 3.0]
    assert frames[1].image[0, 0, 0] == 99 and frames[1].T_world_cam[0, 3] == 20.0
    assert buf.stats()["counts"] == {"added": 4, "out_of_order": 1, "replaced": 1}
    assert buf.nbytes == 3 * img().nbytes


def test_bad_frames_are_refused_and_counted():
    buf = FrameBuffer()
    bad_pose = pose_x(0.0)
    bad_pose[0, 0] = 2.0
    cases = [
        ((float("nan"), img(), K, pose_x(0)), "stamp must be finite"),
        ((0.0, np.zeros((4, 4), np.float32), K, pose_x(0)), r"\(H, W, 3\) uint8"),
        ((0.0, img(), np.full((3, 3), np.nan), pose_x(0)), "K of the frame"),
        ((0.0, img(), K, bad_pose), "not a finite 4x4 rigid"),
    ]
    for args, words in cases:
        with pytest.raises(InputError, match=words):
            buf.add(*args)
    with pytest.raises(InputError, match="does not match image"):
        buf.add(0.0, img(), K, pose_x(0), depth=np.ones((5, 5), np.float32))
    assert len(buf) == 0 and buf.stats()["dropped"] == {"bad_input": 5}


def test_pending_frames_get_exactly_their_pose_or_are_dropped(caplog):
    tf = TransformBuffer()
    tf.set_transform("map", "cam", 0.0, [0.0, 0.0, 0.0], ID)
    buf = FrameBuffer(FrameBufferConfig(pose_timeout_sec=1.0, max_pending=3))

    def lookup(stamp):
        return tf.lookup("map", "cam", stamp, tolerance=0.0)

    buf.add_pending(0.5, img(1), K, received=100.0)
    buf.add_pending(1.5, img(2), K, received=100.0)
    assert buf.resolve(lookup, now=100.2) == 0 and buf.pending == 2  # TF has not reached 0.5 yet: wait
    tf.set_transform("map", "cam", 1.0, [1.0, 0.0, 0.0], ID)
    assert buf.resolve(lookup, now=100.3) == 1 and buf.pending == 1
    assert buf.frames()[0].T_world_cam[0, 3] == pytest.approx(0.5)  # interpolated, exact
    with caplog.at_level(logging.WARNING, logger="stllm_core.memory.frame_buffer"):
        assert buf.resolve(lookup, now=101.0) == 0  # 1.5 s never gets TF: dropped after the timeout
        buf.add_pending(1.7, img(3), K, received=100.0)
        buf.resolve(lookup, now=101.5)
    assert buf.pending == 0 and len(buf) == 1
    assert buf.stats()["dropped"] == {f"no_pose_{ExtrapolationError.__name__}": 2}
    assert sum("no pose" in r.message for r in caplog.records) == 1  # warned once per cause
    # the pending queue is bounded: the oldest goes
    for i in range(5):
        buf.add_pending(10.0 + i, img(i), K)
    assert buf.pending == 3 and buf.stats()["dropped"]["pending_full"] == 2
    # a lookup returning garbage never becomes a stored pose
    nan_pose = np.full((4, 4), np.nan)
    assert buf.resolve(lambda s: nan_pose) == 0 and len(buf) == 1 and buf.stats()["dropped"]["bad_pose"] == 3


def test_uniform_selection_is_linspace_in_time_without_duplicates():
    assert uniform_indices(np.arange(10.0), 4) == [0, 3, 6, 9]
    assert uniform_indices(np.array([0.0, 0.1, 0.2, 5.0, 10.0]), 3) == [0, 3, 4]
    # clustered stamps: nearest free frames, never the same one twice
    stamps = np.array([0.0, 0.01, 0.02, 0.03, 10.0])
    assert uniform_indices(stamps, 4) == [0, 2, 3, 4]  # targets 0, 3.3, 6.7, 10 -> 0, 0.03, 10, then 0.02
    buf = filled(100, dt=0.1)  # 0.0 .. 9.9 s
    frames = buf.select(window_sec=4.0, num_frames=5)  # window [5.9, 9.9]
    assert [round(f.stamp, 6) for f in frames] == [5.9, 6.9, 7.9, 8.9, 9.9]
    frames = buf.select(window_sec=2.0, num_frames=3, now=5.0)  # window [3.0, 5.0]
    assert [round(f.stamp, 6) for f in frames] == [3.0, 4.0, 5.0]
    assert len(buf.select(window_sec=0.25, num_frames=8)) == 3  # fewer frames than asked: all of them
    assert buf.select(window_sec=1.0, num_frames=4, now=-5.0) == []
    assert len(buf.select(float("inf"), 100)) == 100
    with pytest.raises(ConfigError, match="strategy"):
        buf.select(1.0, 2, strategy="random")


def wall_depth(h: int = 24, w: int = 32, z: float = 2.0) -> np.ndarray:
    return np.full((h, w), z, np.float32)


def test_coverage_selection_prefers_frames_that_see_new_space():
    """Four cameras: three look at the same wall patch, one turns to another wall. Picking 2 for coverage takes the
    odd one out plus one of the others; uniform picks the first and last."""
    buf = FrameBuffer(FrameBufferConfig(coverage_stride=2))
    turned = make_transform([0.0, 0.0, 0.0], [0.0, 0.7071067811865476, 0.0, 0.7071067811865476])  # 90 deg about y
    poses = [pose_x(0.0), pose_x(0.01), turned, pose_x(0.02)]
    for i, T in enumerate(poses):
        buf.add(float(i), img(i), K, T, depth=wall_depth())
    cov = buf.select(10.0, 2, strategy="coverage")
    assert 2.0 in [f.stamp for f in cov] and len(cov) == 2
    assert [f.stamp for f in buf.select(10.0, 2)] == [0.0, 3.0]
    # nothing new to see after the first two picks: the rest is filled uniformly, still no duplicates
    cov3 = buf.select(10.0, 4, strategy="coverage")
    assert sorted(f.stamp for f in cov3) == [0.0, 1.0, 2.0, 3.0]


def test_coverage_falls_back_to_uniform_without_depth():
    buf = filled(10, dt=1.0)
    assert [f.stamp for f in buf.select(100.0, 4, strategy="coverage")] == [0.0, 3.0, 6.0, 9.0]
    assert buf.stats()["counts"]["coverage_fallback_uniform"] == 1


def test_voxel_keys_round_trip_and_depth_backprojection():
    ijk = np.array([[0, 0, 0], [-1, 2, -3], [(1 << 20) - 1, -(1 << 20), 5]])
    np.testing.assert_array_equal(unpack_keys(pack_keys(ijk)), ijk)
    keys, ok = voxel_keys(np.array([[0.25, -0.05, 0.0], [np.nan, 0, 0], [1e9, 0, 0]]), 0.1)
    assert ok.tolist() == [True, False, False]
    np.testing.assert_array_equal(unpack_keys(keys), [[2, -1, 0]])
    np.testing.assert_allclose(key_centers(keys, 0.1), [[0.25, -0.05, 0.05]])
    Kd = np.array([[100.0, 0, 50.0], [0, 100.0, 40.0], [0, 0, 1]])
    depth = np.full((80, 160), np.nan, np.float32)
    depth[40, 150] = 2.0
    np.testing.assert_allclose(depth_to_world_points(depth, Kd, np.eye(4)), [[2.0, 0.0, 2.0]])


def test_concurrent_add_and_select():
    buf = FrameBuffer(FrameBufferConfig(max_frames=50))
    errors = []

    def producer():
        for i in range(500):
            buf.add(i * 0.01, img(i), K, pose_x(i * 0.01))

    def consumer():
        for _ in range(300):
            frames = buf.select(0.3, 8)
            stamps = [f.stamp for f in frames]
            if stamps != sorted(set(stamps)) or any(abs(f.T_world_cam[0, 3] - f.stamp) > 1e-12 for f in frames):
                errors.append(stamps)

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(buf) == 50


def test_large_frames_are_stored_downscaled_so_the_default_budget_holds_the_window():
    """1280x720 RGB-D (a RealSense at 720p) is stored at 640x360 with K rescaled: the default 256 MiB then holds more
    than 15 s of 10 Hz keyframes (at full size, 6.4 MB a frame, it held 4 s, less than the 10 s default window)."""
    from stllm_core.geometry.rays import rescale_intrinsics

    buf = FrameBuffer()
    K = np.array([[910.0, 0, 639.5], [0, 910.0, 359.5], [0, 0, 1]])
    image = np.zeros((720, 1280, 3), np.uint8)
    image[:, 640:] = 255
    depth = np.full((720, 1280), 2.0, np.float32)
    depth[:360] = np.nan
    frame = buf.add(1.0, image, K, np.eye(4), depth)
    assert frame.image.shape == (360, 640, 3) and frame.depth.shape == (360, 640)
    np.testing.assert_allclose(frame.K, rescale_intrinsics(K, (1280, 720), (640, 360)))
    assert frame.K[0, 2] == 319.5 and frame.K[0, 0] == 455.0
    assert frame.image[:, :319].max() == 0 and frame.image[:, 321:].min() == 255  # the content stays in place
    assert set(np.unique(frame.depth[180:]).tolist()) == {2.0} and np.isnan(frame.depth[:180]).all()  # nearest
    per_frame = buf.nbytes
    assert per_frame == 640 * 360 * (3 + 4)
    assert buf.config.max_bytes // per_frame >= 150  # > 15 s at 10 Hz
    full = FrameBuffer(FrameBufferConfig(max_image_side=0)).add(1.0, image, K, np.eye(4), depth)
    assert full.image.shape == (720, 1280, 3)  # 0 keeps full size
    with pytest.raises(ConfigError, match="max_image_side"):
        FrameBufferConfig(max_image_side=-1)
