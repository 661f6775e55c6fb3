"""SceneMap: depth of a known plane lands where geometry says, colours, bad depth, range, memory bound, eviction
order, consistent snapshots under concurrent updates, exact npz round trip, PLY export read by open3d."""

import threading

import numpy as np
import pytest

from stllm_core.errors import ConfigError, DataError, InputError
from stllm_core.geometry.poses import R_BODY_OPTICAL, make_transform, matrix_to_quat
from stllm_core.memory import SceneMap, SceneMapConfig
from stllm_core.memory.voxels import unpack_keys

H, W = 48, 64
K = np.array([[40.0, 0.0, 31.5], [0.0, 40.0, 23.5], [0.0, 0.0, 1.0]])


def camera_looking_down(height: float = 1.5, pitch_deg: float = 30.0) -> np.ndarray:
    """World-from-optical pose: camera at (0, 0, height) looking along +x, pitched down by `pitch_deg`."""
    p = np.deg2rad(pitch_deg)
    R_world_body = np.array([[np.cos(p), 0, np.sin(p)], [0, 1, 0], [-np.sin(p), 0, np.cos(p)]])  # pitch down about y
    return make_transform([0.0, 0.0, height], matrix_to_quat(R_world_body @ R_BODY_OPTICAL))


def ground_depth(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth image (optical z, metres) of the ground plane z = 0, and the exact world hit point of each pixel."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1)  # z = 1
    world_dirs = rays @ T[:3, :3].T
    t = -T[2, 3] / world_dirs[..., 2]  # the ray parameter where world z = 0 (depth, since optical z of the ray is 1)
    depth = np.where(t > 0, t, np.nan).astype(np.float32)
    hits = T[:3, 3] + world_dirs * t[..., None]
    return depth, hits


def test_config_is_validated():
    with pytest.raises(ConfigError, match="voxel_size"):
        SceneMapConfig(voxel_size=0.0)
    with pytest.raises(ConfigError, match="max_range"):
        SceneMapConfig(min_range=2.0, max_range=1.0)
    with pytest.raises(ConfigError, match="default_color"):
        SceneMapConfig(default_color=(0, 0, 300))


def test_depth_of_a_known_plane_lands_where_geometry_says():
    T = camera_looking_down()
    depth, hits = ground_depth(T)
    valid = np.isfinite(depth) & (depth >= 0.1) & (depth <= 5.0)
    assert 0.3 < valid.mean() < 1.0  # part of the image sees the ground within range
    voxel = 0.06
    m = SceneMap(SceneMapConfig(voxel_size=voxel, max_range=5.0))
    n = m.integrate_depth(depth, K, T, stamp=12.5)
    assert n == int(valid.sum())
    scene = m.snapshot()
    assert scene.frame_id == "map" and scene.stamp == 12.5
    pts = scene.points.astype(np.float64)
    assert np.all(np.abs(pts[:, 2]) <= voxel)  # the ground, within one voxel
    # every voxel contains an exact hit point, and every exact hit lies in a map voxel (one voxel = half-size box)
    truth = hits[valid]
    d = np.abs(pts[:, None, :] - truth[None, :, :]).max(axis=2)  # (voxels, hits) Chebyshev distance
    assert np.all(d.min(axis=1) <= voxel / 2 + 1e-4)
    assert np.all(d.min(axis=0) <= voxel / 2 + 1e-4)
    # far edge of the range is respected: nothing beyond max_range from the camera
    assert np.linalg.norm(pts - T[:3, 3], axis=1).max() <= 5.0 / np.cos(np.deg2rad(45)) + voxel


def test_colours_average_and_follow_changes_with_capped_weight():
    m = SceneMap(SceneMapConfig(voxel_size=1.0, max_color_weight=3))
    p = np.array([[0.5, 0.5, 0.5]])
    m.integrate_points(np.repeat(p, 2, axis=0), np.array([[100, 0, 0], [200, 0, 0]], np.uint8))
    assert m.snapshot().colors.tolist() == [[150, 0, 0]]
    m.integrate_points(p)  # no colour: default grey counts as one observation
    assert m.snapshot().colors.tolist() == [[round((150 * 2 + 128) / 3), 43, 43]]
    for _ in range(20):  # the surface turned blue: the capped mean follows
        m.integrate_points(p, np.array([[0, 0, 255]], np.uint8))
    c = m.snapshot().colors[0]
    assert c[2] >= 250 and c[0] <= 5
    assert m.arrays()["hits"].tolist() == [23]


def test_nan_inf_zero_and_out_of_range_depth_are_ignored_and_counted():
    T = make_transform([0.0, 0.0, 0.0], matrix_to_quat(R_BODY_OPTICAL))
    depth = np.full((H, W), 2.0, np.float32)
    depth[0, :10] = np.nan
    depth[1, :5] = np.inf
    depth[2, :3] = 0.0
    depth[3, :7] = 9.0  # beyond max_range
    m = SceneMap(SceneMapConfig(voxel_size=0.05, max_range=5.0))
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 1] = 200
    n = m.integrate_depth(depth, K, T, image=image)
    assert n == H * W - 25
    c = m.stats()["counts"]
    assert c["depth_invalid_pixels"] == 18 and c["depth_out_of_range_pixels"] == 7
    scene = m.snapshot()
    assert np.all(np.abs(scene.points[:, 0] - 2.0) <= 0.05) and np.all(scene.colors[:, 1] == 200)
    # stride: every 4th pixel in both directions
    m2 = SceneMap(SceneMapConfig(voxel_size=0.05))
    assert m2.integrate_depth(np.full((H, W), 2.0, np.float32), K, T, stride=4) == (H // 4) * (W // 4)
    # malformed input raises InputError and is counted; points far outside the key range are skipped
    with pytest.raises(InputError, match="matching depth"):
        m.integrate_depth(depth, K, T, image=np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(InputError, match="rigid"):
        m.integrate_depth(depth, K, np.full((4, 4), np.nan))
    assert m.integrate_points(np.array([[np.nan, 0, 0], [1e12, 0, 0], [1.0, 1.0, 1.0]])) == 1
    c = m.stats()["counts"]
    assert c["bad_input"] == 2 and c["nonfinite_points"] == 1 and c["out_of_key_range_points"] == 1


def test_memory_stays_within_bound_when_fed_ten_times_capacity_and_evicts_least_recent():
    cap = 1000
    m = SceneMap(SceneMapConfig(voxel_size=1.0, max_voxels=cap, evict_fraction=0.1))
    keep = np.array([[0.5, 0.5, 0.5]])
    rng = np.random.default_rng(0)
    for i in range(100):  # 100 batches of 100 new voxels = 10x capacity
        xyz = np.stack([np.full(100, 10.0 + i), np.arange(100) + 0.5, np.full(100, 0.5)], axis=1)
        m.integrate_points(np.concatenate([xyz, keep]), rng.integers(0, 255, (101, 3), dtype=np.uint8))
        assert len(m) <= cap
        assert m.nbytes <= cap * 36
    ijk = unpack_keys(m.arrays()["keys"])
    assert (0, 0, 0) in set(map(tuple, ijk.tolist()))  # updated every time: never evicted
    x = ijk[:, 0]
    assert x[x > 0].min() >= 10 + 100 - 10  # only the most recent batches remain
    assert m.stats()["counts"]["evicted_voxels"] == 100 * 100 + 1 - len(m)


def test_snapshot_is_consistent_while_updates_continue():
    m = SceneMap(SceneMapConfig(voxel_size=1.0))
    done = threading.Event()
    bad = []

    def writer():
        for i in range(200):
            xyz = np.stack([np.full(50, i + 0.5), np.arange(50) + 0.5, np.zeros(50)], axis=1)
            m.integrate_points(xyz, np.full((50, 3), i % 256, np.uint8))
        done.set()

    m.integrate_points(np.array([[-5.5, 0.5, 0.5]]))  # one voxel of our own, so a snapshot holds 1 + 50 k voxels
    th = threading.Thread(target=writer)
    th.start()
    snaps = 0
    while not done.is_set() or snaps == 0:
        s = m.snapshot()
        snaps += 1
        if (s.num_points - 1) % 50 or len(s.colors) != s.num_points:
            bad.append(s.num_points)
        before = s.points.copy()
        m.integrate_points(np.array([[-5.5, 0.5, 0.5]]))  # a later update does not touch a taken snapshot
        if not np.array_equal(before, s.points):
            bad.append("mutated")
    th.join(60)
    assert not bad and snaps > 0


def test_npz_round_trip_is_exact_and_continues_identically(tmp_path):
    T = camera_looking_down()
    depth, _ = ground_depth(T)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    m = SceneMap(SceneMapConfig(voxel_size=0.05, max_voxels=100_000))
    m.integrate_depth(depth, K, T, image=image, stamp=3.0)
    path = tmp_path / "map.npz"
    m.save(path)
    r = SceneMap.load(path)
    assert r.config == m.config and len(r) == len(m) > 0
    for name, a in m.arrays().items():
        b = r.arrays()[name]
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    s1, s2 = m.snapshot(), r.snapshot()
    assert np.array_equal(s1.points, s2.points) and np.array_equal(s1.colors, s2.colors) and s2.stamp == 3.0
    T2 = camera_looking_down(pitch_deg=40.0)
    d2, _ = ground_depth(T2)
    for mm in (m, r):
        mm.integrate_depth(d2, K, T2, image=image)
    for name, a in m.arrays().items():
        assert np.array_equal(a, r.arrays()[name]), name
    # a config may change bounds but not the voxel size
    with pytest.raises(DataError, match="voxel_size"):
        SceneMap.load(path, SceneMapConfig(voxel_size=0.1))
    assert SceneMap.load(path, SceneMapConfig(voxel_size=0.05, max_voxels=10)).stats()["voxels"] <= 10


def test_corrupt_or_missing_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="no map file"):
        SceneMap.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz' is not a scene map"):
        SceneMap.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, meta=np.array('{"format": "x", "version": 1}'), keys=np.zeros(1, np.int64), colors=np.zeros((1, 3)),
             hits=np.zeros(1), updated=np.zeros(1), tick=np.array(0), stamp=np.array(0.0))  # fmt: skip
    with pytest.raises(DataError, match="has format 'x'"):
        SceneMap.load(other)
    with pytest.raises(InputError, match=r"\.npz or \.ply"):
        SceneMap().save(tmp_path / "map.txt")
    bad_ply = tmp_path / "bad.ply"
    bad_ply.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement face 3\nend_header\n")
    with pytest.raises(DataError, match="before the vertices"):
        SceneMap.load(bad_ply)


def test_ply_export_is_read_by_open3d_and_reloads(tmp_path):
    rng = np.random.default_rng(2)
    m = SceneMap(SceneMapConfig(voxel_size=0.1))
    m.integrate_points(rng.uniform(-2, 2, (500, 3)), rng.integers(0, 256, (500, 3), dtype=np.uint8))
    path = tmp_path / "map.ply"
    m.save(path)
    scene = m.snapshot()
    o3d = pytest.importorskip("open3d")
    pcd = o3d.io.read_point_cloud(str(path))
    np.testing.assert_allclose(np.asarray(pcd.points), scene.points, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pcd.colors) * 255.0, scene.colors, atol=1e-3)
    r = SceneMap.load(path, SceneMapConfig(voxel_size=0.1))  # voxel centres re-voxelise to the same voxels
    assert np.array_equal(r.arrays()["keys"], m.arrays()["keys"])
    assert np.array_equal(r.snapshot().colors, scene.colors)
    # an ascii PLY written by open3d loads as well
    ascii_path = tmp_path / "ascii.ply"
    o3d.io.write_point_cloud(str(ascii_path), pcd, write_ascii=True)
    assert np.array_equal(
        SceneMap.load(ascii_path, SceneMapConfig(voxel_size=0.1)).arrays()["keys"], m.arrays()["keys"]
    )


def test_depth_inside_a_known_box_lands_on_its_faces():
    """A camera inside a 4 x 3 x 2.5 m box, looking into a corner: every voxel is within one voxel of a face."""
    lo, hi = np.array([-2.0, -1.5, 0.0]), np.array([2.0, 1.5, 2.5])
    T = camera_looking_down(height=1.2, pitch_deg=20.0)
    yaw = np.deg2rad(30.0)
    Rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    T[:3, :3] = Rz @ T[:3, :3]
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1)
    d = rays @ T[:3, :3].T
    with np.errstate(divide="ignore"):
        t = np.where(d > 0, (hi - T[:3, 3]) / d, (lo - T[:3, 3]) / d)
    depth = t.min(axis=-1).astype(np.float32)  # exact distance along the optical axis to the first face
    voxel = 0.05
    m = SceneMap(SceneMapConfig(voxel_size=voxel, max_range=10.0))
    assert m.integrate_depth(depth, K, T) == H * W
    p = m.snapshot().points.astype(np.float64)
    face_dist = np.minimum(np.abs(p - lo), np.abs(p - hi)).min(axis=1)
    assert np.all(face_dist <= voxel)
    assert np.all((p >= lo - voxel) & (p <= hi + voxel))
    # the corner the camera looks into: the floor, two walls are all seen
    assert (np.abs(p[:, 2]) <= voxel).any() and (np.abs(p[:, 0] - 2.0) <= voxel).any()
    assert (np.abs(p[:, 1] - 1.5) <= voxel).any()


def test_optional_feature_channels(tmp_path):
    m = SceneMap(SceneMapConfig(voxel_size=1.0, feature_dim=2))
    xyz = np.array([[0.5, 0.5, 0.5], [0.6, 0.5, 0.5], [3.5, 0.5, 0.5]])
    m.integrate_points(xyz, features=np.array([[1.0, 2.0], [3.0, 4.0], [np.nan, 0.0]]))
    scene, feats = m.snapshot_with_features()
    assert scene.num_points == 2 and feats.dtype == np.float32
    np.testing.assert_array_equal(feats, [[2.0, 3.0], [0.0, 0.0]])  # mean of two; NaN row = no features
    m.integrate_points(xyz[:1])  # a point without features leaves the mean alone
    m.integrate_points(xyz[:1], features=np.array([[5.0, 6.0]]))
    a = m.arrays()
    np.testing.assert_allclose(a["features"][0], [3.0, 4.0])  # (2 * (2, 3) + (5, 6)) / 3
    assert a["feature_hits"].tolist() == [3, 0] and a["hits"].tolist() == [4, 1]
    assert m.stats()["counts"]["nonfinite_features"] == 1
    assert m.nbytes == 2 * m.bytes_per_voxel == 2 * (36 + 8 + 8)
    with pytest.raises(InputError, match="feature_dim=2"):
        m.integrate_points(xyz, features=np.zeros((3, 5)))
    with pytest.raises(InputError, match="feature_dim=0"):
        SceneMap().integrate_points(xyz, features=np.zeros((3, 2)))
    depth = np.full((H, W), 2.0, np.float32)
    n = m.integrate_depth(depth, K, np.eye(4), features=np.ones((H, W, 2), np.float32), stride=8)
    assert n == (H // 8) * (W // 8)
    path = tmp_path / "f.npz"
    m.save(path)
    r = SceneMap.load(path)
    for name, arr in m.arrays().items():
        assert np.array_equal(arr, r.arrays()[name]), name
    with pytest.raises(DataError, match="feature_dim 2"):
        SceneMap.load(path, SceneMapConfig(voxel_size=1.0))
