"""Clip -> rosbag2 -> read back (stllm_core.data.bags, rosbags only, no rclpy); real rosbag2 bags; corrupt bags."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from stllm_core.data.bags import (
    R_LINK_OPTICAL,
    BagReader,
    BagWriterConfig,
    bag_info,
    clip_to_bag,
    pack_rgb,
    qa_path_for,
    read_bag_clip,
    read_messages,
    unpack_rgb,
    write_bag,
)
from stllm_core.errors import ConfigError, DataError
from stllm_core.types import Frame, Scene

EXTERNAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "external" / "rosbag2_bags"
if not EXTERNAL.is_dir():
    EXTERNAL = Path("/work/shared/data/external/rosbag2_bags")
REAL_BAGS = sorted(p.name for p in EXTERNAL.glob("*_*") if p.is_dir()) if EXTERNAL.is_dir() else []
K = np.array([[60.0, 0.0, 15.5], [0.0, 58.0, 11.5], [0.0, 0.0, 1.0]])


def make_frames(n: int = 8, fps: float = 10.0, size=(24, 32), seed: int = 0, depth: bool = True) -> list[Frame]:
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        T = np.eye(4)
        T[:3, :3] = Rotation.random(random_state=seed * 100 + i).as_matrix()
        T[:3, 3] = rng.normal(scale=2.0, size=3)
        d = None
        if depth:
            d = (rng.integers(300, 5000, size=size) / 1000.0).astype(np.float32)  # whole millimetres
            d[0, :3] = np.nan  # invalid pixels
        img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        frames.append(Frame(stamp=5.0 + i / fps, image=img, K=K.copy(), T_world_cam=T, depth=d))
    return frames


def make_scene(n: int = 200, seed: int = 0) -> Scene:
    rng = np.random.default_rng(seed)
    return Scene(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 256, (n, 3), dtype=np.uint8))


def assert_same_frames(src: list[Frame], got, depth_exact: bool = True) -> None:
    assert len(got) == len(src)
    for i, (a, b) in enumerate(zip(src, got)):
        np.testing.assert_array_equal(b.image, a.image, err_msg=f"frame {i}")
        np.testing.assert_allclose(b.T_world_cam, a.T_world_cam, rtol=0, atol=1e-6, err_msg=f"pose {i}")
        np.testing.assert_array_equal(b.K, a.K)
        # stamps relative to the first frame (absolute float seconds near 1.7e9 carry ~0.2 us of rounding)
        assert abs((b.stamp - got[0].stamp) - (a.stamp - src[0].stamp)) < 1e-6
        if a.depth is None:
            assert b.depth is None
        elif depth_exact:
            np.testing.assert_array_equal(b.depth, a.depth)
        else:
            np.testing.assert_allclose(b.depth, a.depth, rtol=0, atol=5e-4, equal_nan=True)


@pytest.mark.parametrize("storage,depth_encoding,compression", [
    ("mcap", "32FC1", "none"), ("mcap", "16UC1", "zstd"), ("sqlite3", "16UC1", "none"), ("sqlite3", "32FC1", "zstd")])
def test_round_trip_frames_poses_intrinsics_depth_scene(tmp_path, storage, depth_encoding, compression):
    frames, scene = make_frames(), make_scene()
    cfg = BagWriterConfig(storage=storage, depth_encoding=depth_encoding, compression=compression,
                          start_time_ns=1_600_000_000_123_456_789)
    info = write_bag(tmp_path / "bag", frames, scene, cfg)

    assert info.storage == storage
    assert (tmp_path / "bag" / "metadata.yaml").exists()
    assert info.message_count == 2 + 4 * len(frames)
    assert info.start_ns == cfg.start_time_ns
    assert info.end_ns == cfg.start_time_ns + 700_000_000  # 8 frames at 10 fps
    counts = {t.name: t.count for t in info.topics}
    assert counts == {"/tf_static": 1, "/scene/points": 1, "/tf": 8, "/camera/color/camera_info": 8,
                      "/camera/color/image_raw": 8, "/camera/depth/image_raw": 8}
    assert {t.name for t in info.topics if t.latched} == {"/tf_static", "/scene/points"}

    clip = read_bag_clip(tmp_path / "bag")
    assert_same_frames(frames, clip.frames, depth_exact=depth_encoding == "32FC1")
    assert clip.frames[0].stamp == pytest.approx(1_600_000_000.123456789, abs=1e-6)
    np.testing.assert_array_equal(clip.scene.points, scene.points)
    np.testing.assert_array_equal(clip.scene.colors, scene.colors)
    assert clip.scene.frame_id == "map"


def test_tf_conventions_rep105(tmp_path):
    """A camera looking along map +x with its image up = map +z is camera_link == map (REP-103 body axes)."""
    T = np.eye(4)
    T[:3, :3] = R_LINK_OPTICAL  # optical z (forward) = map x, optical x (right) = map -y, optical y (down) = map -z
    T[:3, 3] = [1.0, 2.0, 3.0]
    f = make_frames(1, depth=False)[0]
    write_bag(tmp_path / "b", [Frame(f.stamp, f.image, f.K, T)], None, BagWriterConfig())
    msgs = {m.topic: msg for m, msg in BagReader(tmp_path / "b").decoded()}
    (tf,) = msgs["/tf"].transforms
    assert (tf.header.frame_id, tf.child_frame_id) == ("map", "camera_link")
    r, t = tf.transform.rotation, tf.transform.translation
    np.testing.assert_allclose([r.x, r.y, r.z, abs(r.w)], [0, 0, 0, 1], atol=1e-12)
    np.testing.assert_allclose([t.x, t.y, t.z], [1, 2, 3])
    (st,) = msgs["/tf_static"].transforms
    assert (st.header.frame_id, st.child_frame_id) == ("camera_link", "camera_color_optical_frame")
    q = st.transform.rotation
    np.testing.assert_allclose([q.x, q.y, q.z, q.w], [-0.5, 0.5, -0.5, 0.5], atol=1e-12)
    img = msgs["/camera/color/image_raw"]
    assert (img.encoding, img.header.frame_id, img.step) == ("rgb8", "camera_color_optical_frame", 32 * 3)
    info = msgs["/camera/color/camera_info"]
    np.testing.assert_array_equal(np.asarray(info.p).reshape(3, 4)[:, :3], K)
    assert "/scene/points" not in msgs and "/camera/depth/image_raw" not in msgs


def test_rgb_packing_is_pcl_layout():
    rgb = np.array([[255, 0, 0], [1, 2, 3], [0, 0, 255]], np.uint8)
    packed = pack_rgb(rgb)
    assert packed.dtype == np.float32
    assert packed.view(np.uint32).tolist() == [0xFF0000, 0x010203, 0x0000FF]
    np.testing.assert_array_equal(unpack_rgb(packed), rgb)


def test_clip_folder_to_bag_and_back(tmp_path):
    from stllm_core.data.clip_folder import ClipFolder, write_clip_folder

    frames, scene = make_frames(6, fps=15.0), make_scene(50)
    clip_dir = write_clip_folder(tmp_path / "clip", frames, scene, fps=15.0, image_format="png")
    qa = [{"id": "q0", "video": "frames", "K": "K.txt", "c2ws": "c2ws", "pointcloud": "clip_vert.npy",
           "conversations": [{"from": "human", "value": "<image>\nWhere is the mug?"}]}]
    (clip_dir / "qa.json").write_text(json.dumps(qa))
    folder = ClipFolder.read(clip_dir)

    info = clip_to_bag(clip_dir, tmp_path / "out" / "clip_bag")
    assert info.topic("/camera/color/image_raw").count == 6
    qa_out = json.loads(qa_path_for(tmp_path / "out" / "clip_bag").read_text())
    assert qa_out == [{**qa[0], "video": "../clip/frames", "K": "../clip/K.txt", "c2ws": "../clip/c2ws",
                       "pointcloud": "../clip/clip_vert.npy"}]  # still valid from the QA file's folder
    back = read_bag_clip(tmp_path / "out" / "clip_bag")
    src = [folder.load_frame(i, with_depth=True) for i in range(len(folder))]
    assert_same_frames(src, back.frames)
    np.testing.assert_array_equal(back.scene.points, folder.points[0])

    # --fps overrides the clip's stamps; the bag refuses to overwrite unless asked
    with pytest.raises(DataError, match="already exists"):
        clip_to_bag(clip_dir, tmp_path / "out" / "clip_bag")
    info = clip_to_bag(clip_dir, tmp_path / "out" / "clip_bag", BagWriterConfig(overwrite=True, storage="sqlite3"),
                       fps=2.0)
    assert info.storage == "sqlite3" and info.duration_sec == pytest.approx(2.5)


def test_bad_frames_are_refused_and_leave_no_bag(tmp_path):
    frames = make_frames(3, depth=False)
    bad = np.array(frames[1].T_world_cam)
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match=r"of frame 1 .*non-finite"):
        write_bag(tmp_path / "nan", [frames[0], Frame(frames[1].stamp, frames[1].image, K, bad)])
    assert not (tmp_path / "nan").exists()
    sheared = np.array(frames[1].T_world_cam)
    sheared[:3, :3] *= 1.1
    with pytest.raises(DataError, match="of frame 1 is not a rigid"):
        write_bag(tmp_path / "shear", [frames[0], Frame(frames[1].stamp, frames[1].image, K, sheared)])
    with pytest.raises(DataError, match="strictly increasing"):
        write_bag(tmp_path / "order", [frames[1], frames[0]])
    with pytest.raises(DataError, match="no frames"):
        write_bag(tmp_path / "empty", [])
    with pytest.raises(ConfigError, match="storage"):
        BagWriterConfig(storage="rosbag1")
    with pytest.raises(ConfigError, match="image_topic"):
        BagWriterConfig(image_topic="camera")


@pytest.mark.skipif(not REAL_BAGS, reason="shared/data/external/rosbag2_bags not present")
@pytest.mark.parametrize("name", REAL_BAGS)
def test_real_rosbag2_bags_read(name):
    """Bags written by rosbag2 itself (and by the mcap CLI): every announced message is read, in log-time order."""
    path = EXTERNAL / name
    reader = BagReader(path)
    meta_counts = {t.name: t.count for t in reader.info.topics}
    msgs = list(reader.messages())
    assert len(msgs) == reader.info.message_count == sum(meta_counts.values()) > 0
    stamps = [m.stamp_ns for m in msgs]
    assert stamps == sorted(stamps)
    assert (stamps[0], stamps[-1]) == (reader.info.start_ns, reader.info.end_ns)
    decoded = list(reader.decoded())
    # test_msgs service events are not in the Kilted typestore: skipped and counted, everything else decodes
    assert len(decoded) + sum(reader.skipped.values()) == len(msgs)
    assert set(reader.skipped) <= {"test_msgs/srv/BasicTypes_Event"}
    if name.startswith("talker"):
        texts = [msg.data for m, msg in decoded if m.topic == "/topic"]
        assert texts == [f"Hello, world! {i}" for i in range(10)]
        assert [m.topic for m in read_messages(path, topics=["/topic"])] == ["/topic"] * 10
    if name.startswith("bag_with_topics"):
        assert reader.skipped["test_msgs/srv/BasicTypes_Event"] == 8


def _truncated_copy(src: Path, dst: Path, fraction: float) -> Path:
    shutil.copytree(src, dst)
    os.chmod(dst, 0o755)
    for f in dst.iterdir():
        os.chmod(f, 0o644)
    (storage,) = [f for f in dst.iterdir() if f.suffix in (".mcap", ".db3")]
    with open(storage, "r+b") as fh:
        fh.truncate(int(storage.stat().st_size * fraction))
    return dst


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_truncated_bag_raises_data_error_naming_the_bag(tmp_path, storage):
    write_bag(tmp_path / "good", make_frames(4), make_scene(), BagWriterConfig(storage=storage))
    bad = _truncated_copy(tmp_path / "good", tmp_path / "bad", 0.5)
    with pytest.raises(DataError, match=r"Cannot read bag .*bad.*truncated, corrupt"):
        list(BagReader(bad).messages())


@pytest.mark.skipif(not REAL_BAGS, reason="shared/data/external/rosbag2_bags not present")
def test_truncated_real_bag_and_garbage_files(tmp_path):
    bad = _truncated_copy(EXTERNAL / "talker_mcap", tmp_path / "talker_bad", 0.7)
    with pytest.raises(DataError, match="talker_bad"):
        bag_info(bad)
    garbage = tmp_path / "garbage.mcap"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="garbage.mcap"):
        bag_info(garbage)
    with pytest.raises(DataError, match="does not exist"):
        bag_info(tmp_path / "nope")


def _write_custom_bag(path: Path, tf_stamps_ns, image_stamps_ns, translations, depth_offset_ns=None) -> None:
    """A bag with /tf samples and images at different stamps (as a real robot records), written with rosbags; with
    `depth_offset_ns`, a 32FC1 depth image per image, stamped that much later (filled with the image's index + 1)."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from stllm_core.data.bags import T_LINK_OPTICAL, _Msgs

    ts = get_typestore(Stores.ROS2_KILTED)
    M = _Msgs(ts)
    img = np.zeros((4, 6, 3), np.uint8)
    events = [(s, "tf", i) for i, s in enumerate(tf_stamps_ns)] + [(s, "img", i) for i, s in enumerate(image_stamps_ns)]
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        c_static = w.add_connection("/tf_static", "tf2_msgs/msg/TFMessage", typestore=ts)
        c_tf = w.add_connection("/tf", "tf2_msgs/msg/TFMessage", typestore=ts)
        c_info = w.add_connection("/camera/color/camera_info", "sensor_msgs/msg/CameraInfo", typestore=ts)
        c_img = w.add_connection("/camera/color/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        c_depth = w.add_connection("/camera/depth/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        t0 = min(s for s, _, _ in events)
        static = M.TFMessage(transforms=[M.transform(t0, "camera_link", "cam_opt", T_LINK_OPTICAL)])
        w.write(c_static, t0, ts.serialize_cdr(static, "tf2_msgs/msg/TFMessage"))
        for s, kind, i in sorted(events):
            if kind == "tf":
                T = np.eye(4)
                T[:3, 3] = translations[i]
                msg = M.TFMessage(transforms=[M.transform(s, "map", "camera_link", T)])
                w.write(c_tf, s, ts.serialize_cdr(msg, "tf2_msgs/msg/TFMessage"))
            else:
                w.write(c_info, s, ts.serialize_cdr(M.camera_info(s, "cam_opt", K, 6, 4), "sensor_msgs/msg/CameraInfo"))
                w.write(c_img, s, ts.serialize_cdr(M.image(s, "cam_opt", img, "bgr8"), "sensor_msgs/msg/Image"))
                if depth_offset_ns is not None:
                    d = np.full(img.shape[:2], i + 1.0, np.float32)
                    sd = s + depth_offset_ns
                    w.write(c_depth, sd, ts.serialize_cdr(M.image(sd, "cam_opt", d, "32FC1"), "sensor_msgs/msg/Image"))


def test_read_bag_clip_interpolates_tf_and_refuses_extrapolation(tmp_path):
    s0 = 1_000 * 10**9
    _write_custom_bag(tmp_path / "interp", [s0, s0 + 10**9], [s0 + 250_000_000, s0 + 10**9],
                      [(0.0, 0.0, 0.0), (2.0, -4.0, 1.0)])
    clip = read_bag_clip(tmp_path / "interp")
    expected = optical_pose_at([0.5, -1.0, 0.25])
    np.testing.assert_allclose(clip.frames[0].T_world_cam, expected, atol=1e-9)
    np.testing.assert_allclose(clip.frames[1].T_world_cam[:3, 3], [2.0, -4.0, 1.0], atol=1e-12)

    # an image 0.5 s after the last /tf sample: no silently wrong pose
    _write_custom_bag(tmp_path / "extra", [s0, s0 + 10**9], [s0 + 1_500_000_000], [(0, 0, 0), (1, 0, 0)])
    with pytest.raises(DataError, match="would extrapolate"):
        read_bag_clip(tmp_path / "extra")
    with pytest.raises(DataError, match="no image topic /cam"):
        read_bag_clip(tmp_path / "interp", image_topic="/cam")


def test_read_bag_clip_matches_depth_stamped_apart_from_colour(tmp_path):
    """realsense-ros stamps colour and depth separately (milliseconds apart): depth goes with the nearest colour image
    within depth_match_sec (20 ms), never with a farther one."""
    s0 = 1_000 * 10**9
    stamps = [s0 + k * 33_000_000 for k in range(4)]  # 30 Hz
    _write_custom_bag(tmp_path / "near", [s0, s0 + 10**9], stamps, [(0, 0, 0), (1, 0, 0)], depth_offset_ns=-3_000_000)
    clip = read_bag_clip(tmp_path / "near")
    assert [float(f.depth[0, 0]) for f in clip.frames] == [1.0, 2.0, 3.0, 4.0]  # each with its own depth
    stamps = [s0 + k * 100_000_000 for k in range(4)]  # 10 Hz, depth 40 ms after each image: none within 20 ms
    _write_custom_bag(tmp_path / "far", [s0, s0 + 10**9], stamps, [(0, 0, 0), (1, 0, 0)], depth_offset_ns=40_000_000)
    assert all(f.depth is None for f in read_bag_clip(tmp_path / "far").frames)
    clip = read_bag_clip(tmp_path / "far", depth_match_sec=0.05)
    assert [float(f.depth[0, 0]) for f in clip.frames] == [1.0, 2.0, 3.0, 4.0]



def test_read_bag_clip_max_frames_keeps_uniform_frames_with_their_depth(tmp_path):
    """max_frames: uniform in time as the FrameBuffer selects, each frame and its depth as the full read gives them."""
    s0 = 1_000 * 10**9
    stamps = [s0 + k * 33_000_000 for k in range(10)]
    _write_custom_bag(tmp_path / "b", [s0, s0 + 10**9], stamps, [(0, 0, 0), (1, 0, 0)], depth_offset_ns=-3_000_000)
    full = read_bag_clip(tmp_path / "b")
    few = read_bag_clip(tmp_path / "b", max_frames=4)
    assert len(full.frames) == 10 and len(few.frames) == 4
    assert [f.stamp for f in few.frames] == [full.frames[i].stamp for i in (0, 3, 6, 9)]
    by_stamp = {f.stamp: f for f in full.frames}
    for f in few.frames:
        np.testing.assert_array_equal(f.image, by_stamp[f.stamp].image)
        np.testing.assert_array_equal(f.depth, by_stamp[f.stamp].depth)
        np.testing.assert_array_equal(f.T_world_cam, by_stamp[f.stamp].T_world_cam)
    with pytest.raises(ConfigError, match="max_frames"):
        read_bag_clip(tmp_path / "b", max_frames=0)

def optical_pose_at(t) -> np.ndarray:
    from stllm_core.data.bags import T_LINK_OPTICAL

    T = np.array(T_LINK_OPTICAL)
    T[:3, 3] = t
    return T


def test_clip2bag_cli(tmp_path, capsys):
    from stllm_core.data.cli import clip2bag_main
    from stllm_core.data.clip_folder import write_clip_folder

    write_clip_folder(tmp_path / "clip", make_frames(4), make_scene(10), fps=10.0, image_format="png")
    rc = clip2bag_main([str(tmp_path / "clip"), str(tmp_path / "bag"), "--storage", "sqlite3", "--depth", "16UC1",
                        "--compress", "--start-time", "1234.5", "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Storage:  sqlite3" in out and "/camera/depth/image_raw" in out
    info = bag_info(tmp_path / "bag")
    assert info.start_ns == 1_234_500_000_000 and info.message_count == 2 + 4 * 4
    assert not qa_path_for(tmp_path / "bag").exists()  # the clip has no qa.json

    assert clip2bag_main([str(tmp_path / "clip"), str(tmp_path / "bag"), "-q"]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert clip2bag_main([str(tmp_path / "missing"), str(tmp_path / "bag2"), "-q"]) == 2
    assert "missing" in capsys.readouterr().err


def test_reasim_clip_to_bag_keeps_frames_poses_and_usable_qa(tmp_path):
    """A REA-Sim kitchen clip (JPEG frames, depth, cloud, QA) -> bag -> back: same decoded frames, QA readable."""
    from stllm_core.data.clip_folder import ClipFolder
    from stllm_core.data.rea import read_rea_json
    from stllm_core.data.reasim.generate import generate_reasim

    generate_reasim(tmp_path / "rs", scenes=1, clips_per_scene=1, frames=8, size=(96, 72), questions_per_type=1,
                    seed=3, workers=1)
    (clip_dir,) = [p for p in (tmp_path / "rs" / "clips").iterdir() if p.is_dir()]
    folder = ClipFolder.read(clip_dir)
    clip_to_bag(clip_dir, tmp_path / "bags" / "kitchen", BagWriterConfig(depth_encoding="16UC1"))
    back = read_bag_clip(tmp_path / "bags" / "kitchen")
    src = [folder.load_frame(i, with_depth=True) for i in range(len(folder))]
    assert_same_frames(src, back.frames, depth_exact=False)
    assert back.scene.num_points == folder.points[0].shape[0] > 0
    records = read_rea_json(qa_path_for(tmp_path / "bags" / "kitchen"), on_error="raise")
    assert len(records) == len(folder.read_qa()) >= 1


REAL_RGBD = EXTERNAL.parent / "open3d_rgbd"


@pytest.mark.skipif(not REAL_RGBD.is_dir(), reason="shared/data/external/open3d_rgbd not present")
def test_real_rgbd_sequence_to_clip_to_bag(tmp_path):
    """The real Augmented ICL-NUIM RGB-D frames (ground-truth trajectory) -> clip folder -> bag -> back."""
    from stllm_core.data.clip_folder import ClipFolder
    from stllm_core.data.rgbd import convert_rgbd_sequence

    clip_dir = convert_rgbd_sequence(REAL_RGBD, tmp_path / "clip", trajectory=REAL_RGBD / "trajectory.log", fps=30.0,
                                      max_frames=3)
    folder = ClipFolder.read(clip_dir)
    info = clip_to_bag(clip_dir, tmp_path / "bag", BagWriterConfig(compression="zstd"))
    assert info.topic("/camera/color/image_raw").count == len(folder) == 3
    assert info.duration_sec == pytest.approx(2 / 30.0, abs=1e-6)
    back = read_bag_clip(tmp_path / "bag")
    src = [folder.load_frame(i, with_depth=True) for i in range(len(folder))]
    assert_same_frames(src, back.frames)
    np.testing.assert_array_equal(back.frames[0].K, [[525.0, 0, 319.5], [0, 525.0, 239.5], [0, 0, 1]])
    assert back.frames[0].image.shape == (480, 640, 3)
    assert back.scene.num_points == folder.points[0].shape[0] > 1000
