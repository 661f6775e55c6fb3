"""Real RGB-D sequences (../shared/data/external) -> EPIC-style clip folders, checked by depth re-projection."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from stllm_core.data import ClipFolder
from stllm_core.data.clip_folder import frame_name
from stllm_core.data.rgbd import convert_rgbd_sequence, read_trajectory_log
from stllm_core.errors import DataError

EXT = Path("/work/shared/data/external")
ICL = EXT / "icl_nuim_livingroom1_micro"
O3D = EXT / "open3d_rgbd"
pytestmark = pytest.mark.skipif(not ICL.is_dir() or not O3D.is_dir(), reason="external RGB-D data not present")


def reprojection_error(cf: ClipFolder, a: int, b: int) -> float:
    """Median |z_predicted - z_measured| (m) of frame a's depth points re-projected into frame b."""
    da, db = cf.load_depth(a), cf.load_depth(b)
    v, u = np.nonzero(np.isfinite(da))
    z = da[v, u]
    K = cf.K
    pc = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z, np.ones_like(z)])
    pb = np.linalg.inv(cf.poses[b]) @ cf.poses[a] @ pc
    ub = np.rint(K[0, 0] * pb[0] / pb[2] + K[0, 2]).astype(int)
    vb = np.rint(K[1, 1] * pb[1] / pb[2] + K[1, 2]).astype(int)
    ok = (pb[2] > 0) & (ub >= 0) & (ub < db.shape[1]) & (vb >= 0) & (vb < db.shape[0])
    zb = db[vb[ok], ub[ok]]
    good = np.isfinite(zb)
    assert good.sum() > 10000
    return float(np.median(np.abs(zb[good] - pb[2][ok][good])))


def test_ground_truth_sequence(tmp_path):
    out = convert_rgbd_sequence(O3D, tmp_path / "o3d", cloud_frames=5, world="first-camera")
    cf = ClipFolder.read(out)
    assert cf.frame_ids == [0, 1, 2, 3, 4] and cf.fps == 30.0
    np.testing.assert_allclose(cf.K, [[525, 0, 319.5], [0, 525, 239.5], [0, 0, 1]])
    np.testing.assert_allclose(cf.poses[0], np.eye(4), atol=1e-12)
    gt = read_trajectory_log(O3D / "trajectory.log")
    rel = np.linalg.inv(gt[0]) @ gt[4]
    np.testing.assert_allclose(cf.poses[4], rel, atol=1e-9)
    for i in range(5):  # byte copies
        assert (out / "frames" / frame_name(i)).read_bytes() == (O3D / "color" / f"{i:05d}.jpg").read_bytes()
        assert (out / "depth" / frame_name(i, "png")).read_bytes() == (O3D / "depth" / f"{i:05d}.png").read_bytes()
    assert reprojection_error(cf, 0, 4) < 0.01  # noisy sensor depth, ground-truth poses
    xyz, rgb = cf.points
    assert xyz.shape[0] > 5000 and rgb.dtype == np.uint8
    assert cf.load_frame(2).image.shape == (480, 640, 3)


def test_icl_sequence_z_up(tmp_path):
    out = convert_rgbd_sequence(ICL, tmp_path / "icl", stride=10, max_frames=6, cloud_frames=3)
    cf = ClipFolder.read(out)
    assert cf.frame_ids == [0, 10, 20, 30, 40, 50]
    np.testing.assert_allclose(cf.stamps, np.array(cf.frame_ids) / 30.0)
    # REP-103 map at the first camera: its optical axis is +x, its image "down" is -z
    np.testing.assert_allclose(cf.poses[0][:3, 2], [1, 0, 0], atol=1e-9)
    np.testing.assert_allclose(cf.poses[0][:3, 1], [0, 0, -1], atol=1e-9)
    np.testing.assert_allclose(cf.poses[0][:3, 3], 0, atol=1e-9)
    assert reprojection_error(cf, 0, 1) < 0.003  # clean depth, estimated trajectory (measured 0.8 mm)
    xyz, _ = cf.points
    # every cloud point sits in front of the first camera's image plane and within the depth range seen
    assert xyz.shape[0] > 5000 and np.all(xyz[:, 0] > -1.0) and np.abs(xyz).max() < 10


def test_bad_inputs(tmp_path):
    seq = tmp_path / "seq"
    shutil.copytree(O3D, seq, ignore=shutil.ignore_patterns("other_formats"))
    text = (seq / "trajectory.log").read_text().splitlines()
    text[7] = "nan 0 0 0"  # block 1, second matrix row
    (seq / "trajectory.log").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"frame 1 in .*trajectory\.log contains NaN"):
        convert_rgbd_sequence(seq, tmp_path / "out1")
    (seq / "trajectory.log").write_text("\n".join(text[:5]) + "\n")  # only frame 0
    with pytest.raises(DataError, match=r"no pose for frame\(s\) \[1, 2, 3, 4\]"):
        convert_rgbd_sequence(seq, tmp_path / "out2")
    (seq / "trajectory.log").unlink()
    (seq / "odometry.log").unlink()
    with pytest.raises(DataError, match=r"No trajectory \(\.log\) found"):
        convert_rgbd_sequence(seq, tmp_path / "out3")
    with pytest.raises(DataError, match="does not exist"):
        convert_rgbd_sequence(tmp_path / "nothing", tmp_path / "out4")


def test_cli(tmp_path):
    from stllm_core.data.cli import rgbd2clip_main

    assert rgbd2clip_main([str(O3D), str(tmp_path / "c"), "--max-frames", "2", "--no-depth"]) == 0
    cf = ClipFolder.read(tmp_path / "c")
    assert len(cf) == 2 and cf.depth_paths is None and cf.pointcloud_path is None
    assert rgbd2clip_main([str(O3D), str(tmp_path / "c"), "--max-frames", "2"]) == 2  # exists, no --overwrite
