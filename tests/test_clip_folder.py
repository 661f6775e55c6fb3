"""EPIC-style clip folders: write -> read round trip, and bad folders -> DataError naming the problem."""

import json
import shutil

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from stllm_core.data import ClipFolder, write_clip_folder
from stllm_core.data.clip_folder import frame_name
from stllm_core.errors import DataError
from stllm_core.types import Frame, Scene

K = np.array([[80.0, 0, 47.5], [0, 80.0, 35.5], [0, 0, 1]])


def make_frames(n=4, h=72, w=96, depth=True, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        T = np.eye(4)
        T[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-1, 1, 3)).as_matrix()
        T[:3, 3] = rng.uniform(-2, 2, 3)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        d = rng.uniform(0.3, 5.0, (h, w)).astype(np.float32) if depth else None
        if d is not None:
            d[0, 0] = np.nan
        frames.append(Frame(stamp=10.0 + 0.5 * i, image=img, K=K.copy(), T_world_cam=T, depth=d))
    return frames


def make_scene(n=50, seed=1):
    rng = np.random.default_rng(seed)
    return Scene(points=rng.uniform(-3, 3, (n, 3)).astype(np.float32),
                 colors=rng.integers(0, 256, (n, 3), dtype=np.uint8))


@pytest.fixture
def clip_dir(tmp_path):
    frames = make_frames()
    write_clip_folder(tmp_path / "clip", frames, make_scene(), fps=2.0, scene_id="kitchen_x",
                      frame_ids=[3, 5, 7, 9], image_format="png")
    return tmp_path / "clip", frames


def test_round_trip_png_exact(clip_dir):
    path, frames = clip_dir
    cf = ClipFolder.read(path)
    assert len(cf) == 4 and cf.frame_ids == [3, 5, 7, 9] and cf.fps == 2.0 and cf.scene_id == "kitchen_x"
    assert (path / "frames" / frame_name(7, "png")).exists() and (path / "c2ws" / "7.txt").exists()
    np.testing.assert_array_equal(cf.K, K)
    np.testing.assert_allclose(cf.stamps, [10.0, 10.5, 11.0, 11.5])
    scene = make_scene()
    xyz, rgb = cf.points
    np.testing.assert_array_equal(xyz, scene.points)
    np.testing.assert_array_equal(rgb, scene.colors)
    for i, f in enumerate(frames):
        g = cf.load_frame(i, with_depth=True)
        np.testing.assert_array_equal(g.image, f.image)  # PNG: exact
        np.testing.assert_array_equal(g.T_world_cam, f.T_world_cam)  # repr() text: exact float64
        assert g.stamp == f.stamp
        valid = np.isfinite(f.depth)
        assert np.isnan(g.depth[0, 0])
        np.testing.assert_allclose(g.depth[valid], f.depth[valid], atol=0.0005 + 1e-6)  # 1 mm quantization
    clip = cf.clip([0, 2])
    assert len(clip.frames) == 2 and clip.scene.num_points == 50 and clip.duration == pytest.approx(1.0)


def test_round_trip_jpeg_within_tolerance(tmp_path):
    frames = make_frames(n=2, depth=False)
    smooth = [Frame(f.stamp, np.full_like(f.image, 120) + np.arange(96, dtype=np.uint8)[None, :, None], f.K,
                    f.T_world_cam) for f in frames]
    write_clip_folder(tmp_path / "c", smooth, None, fps=2.0)
    cf = ClipFolder.read(tmp_path / "c")
    assert cf.depth_paths is None and cf.pointcloud_path is None and cf.points[0].shape == (0, 3)
    img = cf.load_frame(1).image
    assert np.abs(img.astype(int) - smooth[1].image.astype(int)).mean() < 2.0


def test_refuses_to_overwrite(clip_dir):
    path, frames = clip_dir
    with pytest.raises(DataError, match="already exists"):
        write_clip_folder(path, frames, None, fps=2.0)


def _expect(path, pattern):
    with pytest.raises(DataError, match=pattern):
        ClipFolder.read(path)


def test_missing_frame_named(clip_dir):
    path, _ = clip_dir
    (path / "frames" / frame_name(7, "png")).unlink()
    _expect(path, r"missing frame\(s\) \[7\]")


def test_missing_pose_named(clip_dir):
    path, _ = clip_dir
    (path / "c2ws" / "9.txt").unlink()
    _expect(path, r"Missing file .*c2ws/9\.txt")


def test_nan_pose_named(clip_dir):
    path, _ = clip_dir
    p = path / "c2ws" / "5.txt"
    p.write_text(p.read_text().replace(p.read_text().split()[3], "nan", 1))
    _expect(path, r"c2ws/5\.txt contains NaN")


def test_non_rigid_pose_named(clip_dir):
    path, _ = clip_dir
    T = np.eye(4)
    T[0, 0] = 2.0  # a scale, not a rotation
    (path / "c2ws" / "3.txt").write_text("\n".join(" ".join(map(str, r)) for r in T))
    _expect(path, r"c2ws/3\.txt is not rigid")


def test_bad_K(clip_dir):
    path, _ = clip_dir
    (path / "K.txt").write_text("1 0 0\n0 1 0\n")
    _expect(path, r"K\.txt has 6 numbers; expected a 3x3")
    (path / "K.txt").write_text("-5 0 1\n0 5 1\n0 0 1\n")
    _expect(path, "focal lengths")


def test_bad_pointcloud_and_meta(clip_dir):
    path, _ = clip_dir
    np.save(path / "kitchen_x_vert.npy", np.zeros((10, 4), np.float32))
    _expect(path, r"shape \(10, 4\); expected \(N, 6\)")
    (path / "meta.json").write_text("{not json")
    _expect(path, r"meta\.json is not valid JSON")


def test_missing_depth_frame_and_frames_dir(clip_dir):
    path, _ = clip_dir
    (path / "depth" / frame_name(5, "png")).unlink()
    _expect(path, r"lacks depth frame\(s\) \[5\]")
    shutil.rmtree(path / "frames")
    _expect(path, "has no frames/ directory")


def test_without_meta_ids_come_from_files(clip_dir):
    path, _ = clip_dir
    (path / "meta.json").unlink()
    cf = ClipFolder.read(path)
    assert cf.frame_ids == [3, 5, 7, 9] and cf.fps == 30.0
    np.testing.assert_allclose(cf.stamps, np.array([3, 5, 7, 9]) / 30.0)
    meta = {"frame_ids": [3, 5], "fps": 0}
    (path / "meta.json").write_text(json.dumps(meta))
    _expect(path, r"`fps` is 0")
