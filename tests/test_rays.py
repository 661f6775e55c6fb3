"""Camera-ray geometry with worked examples, float Fourier features, and rigid-transform invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from stllm_core.errors import InputError
from stllm_core.geometry import rays
from stllm_core.model import build_tiny, random_clip
from stllm_core.model.rays import RayEncoder, fourier_features, fourier_frequencies
from stllm_core.types import Clip, Frame, Scene

K100 = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 50.0], [0.0, 0.0, 1.0]])


def rigid(rotvec, t) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    T[:3, 3] = t
    return T


def test_pixel_rays_worked_example():
    d = rays.pixel_ray_directions(K100, 200, 100)  # (H=100, W=200, 3)
    np.testing.assert_allclose(d[50, 50], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(d[50, 150], np.array([1, 0, 1]) / np.sqrt(2), atol=1e-12)
    np.testing.assert_allclose(d[0, 50], np.array([0, -0.5, 1]) / np.linalg.norm([0, -0.5, 1]), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-12)


def test_rotated_camera_ray_in_frame0():
    # camera 1 is camera 0 yawed by +90 deg about its y (down) axis: its optical axis points along frame-0 +x
    T0 = rigid([0.3, -0.2, 0.1], [1.0, 2.0, 0.5])
    T1 = T0 @ rigid([0, np.pi / 2, 0], [0.5, 0, 0])
    rel = rays.relative_poses(np.stack([T0, T1]))
    np.testing.assert_allclose(rel[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(rel[1], rigid([0, np.pi / 2, 0], [0.5, 0, 0]), atol=1e-12)
    # 3x3 image, 1-pixel patches, no pooling: the centre patch ray of camera 1 is +x in frame 0
    K = np.array([[1.0, 0, 1.0], [0, 1.0, 1.0], [0, 0, 1]])
    d = rays.patch_ray_directions(K, rel[1][:3, :3], image_size=3, patch_size=1, pooled=3)
    np.testing.assert_allclose(d[1, 1], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(d[1, 2], np.array([1, 0, -1]) / np.sqrt(2), atol=1e-12)  # right pixel: +x_cam -> -z_0


def test_patch_rays_are_pooled_means():
    K = np.array([[2.0, 0, 1.5], [0, 2.0, 1.5], [0, 0, 1]])  # 4x4 image centred on the optical axis
    d = rays.patch_ray_directions(K, np.eye(3), image_size=4, patch_size=2, pooled=2)
    px = rays.pixel_ray_directions(K, 4, 4)
    expect = px[:2, 2:].reshape(-1, 3).mean(0)  # top-right patch: rows 0-1, columns 2-3
    np.testing.assert_allclose(d[0, 1], expect / np.linalg.norm(expect), atol=1e-12)
    assert d[0, 1, 0] > 0 and d[0, 1, 1] < 0  # right and up (y down)
    np.testing.assert_allclose(d[0, 0, 0], -d[1, 1, 0], atol=1e-12)
    # a 27x27 patch grid pools to 14x14 with torch's adaptive bins
    grid = np.random.default_rng(0).normal(size=(27, 27, 3))
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(grid).permute(2, 0, 1)[None], 14)
    np.testing.assert_allclose(rays.adaptive_mean_pool(grid, 14), ref[0].permute(1, 2, 0).numpy(), atol=1e-12)


def test_rescale_intrinsics_is_consistent_with_resize():
    K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])
    Ks = rays.rescale_intrinsics(K, (640, 480), (320, 240))
    np.testing.assert_allclose(Ks, [[250, 0, 159.5], [0, 250, 119.5], [0, 0, 1]])
    # a point projects to u in the original image and to (u + 0.5) * s - 0.5 in the resized one
    p = np.array([0.3, -0.2, 2.0])
    u = K @ p / p[2]
    us = Ks @ p / p[2]
    np.testing.assert_allclose(us[:2], (u[:2] + 0.5) * 0.5 - 0.5, atol=1e-9)


def test_point_directions_worked_example():
    T0 = rigid([0, 0, 0], [1.0, 0, 0])
    p0 = rays.points_in_frame0(np.array([[1.0, 0, 2.0], [1.0, 0, 0], [4.0, 0, 0]]), T0)
    np.testing.assert_allclose(p0, [[0, 0, 2], [0, 0, 0], [3, 0, 0]], atol=1e-12)
    np.testing.assert_allclose(rays.point_ray_directions(p0), [[0, 0, 1], [0, 0, 0], [1, 0, 0]], atol=1e-12)


def test_invalid_poses_and_K_are_named():
    good = np.eye(4)
    with pytest.raises(InputError, match=r"T_world_cam\[1\] contains NaN"):
        rays.validate_poses(np.stack([good, np.full((4, 4), np.nan)]))
    scaled = good.copy()
    scaled[:3, :3] *= 1.1
    with pytest.raises(InputError, match=r"\[0\] is not a rigid transform.*det"):
        rays.validate_poses(scaled[None])
    bad_row = good.copy()
    bad_row[3, 0] = 1
    with pytest.raises(InputError, match="last row"):
        rays.validate_poses(bad_row[None])
    with pytest.raises(InputError, match=r"shape \(N, 4, 4\)"):
        rays.validate_poses(np.eye(3)[None])
    with pytest.raises(InputError, match="outside the 100x80 image"):
        rays.validate_intrinsics(np.array([[100.0, 0, 320], [0, 100, 240], [0, 0, 1]]), 100, 80)
    with pytest.raises(InputError, match="3x3"):
        rays.validate_intrinsics(np.eye(4), 100, 80)
    with pytest.raises(InputError, match="focal"):
        rays.validate_intrinsics(np.diag([0.0, 1.0, 1.0]), 100, 80)


def test_float_frequencies_do_not_overflow():
    np.testing.assert_allclose(fourier_frequencies(4, 8.0).numpy(), [1, 2, 4, 8])
    f = fourier_frequencies(127, 256.0)  # the official shape (765 features) with a sane maximum
    assert f.dtype == torch.float32 and f.shape == (127,)
    assert float(f[0]) == 1.0 and abs(float(f[-1]) - 256.0) < 1e-3
    assert torch.all(f[1:] > f[:-1]) and torch.all(f > 0)  # no zero or negative frequency (official int64 defect)
    d = torch.tensor([[0.0, 0.0, 1.0]])
    feats = fourier_features(d, fourier_frequencies(2, 2.0))
    expect = [0, 0, 1, 0, 0, 0, 0, np.sin(1), np.sin(2), 1, 1, 1, 1, np.cos(1), np.cos(2)]
    np.testing.assert_allclose(feats[0].numpy(), expect, atol=1e-6)
    enc = RayEncoder(127, 256.0, 768)
    enc.to(torch.bfloat16)  # casting the module must not round the frequencies
    assert enc.freqs.dtype == torch.float32 and torch.equal(enc.freqs, f)
    assert enc.in_dim == 765 and enc(d).dtype == torch.bfloat16 and torch.isfinite(enc(d).float()).all()


def _moved(clip: Clip, G: np.ndarray) -> Clip:
    frames = tuple(Frame(f.stamp, f.image, f.K, G @ f.T_world_cam) for f in clip.frames)
    pts = (clip.scene.points.astype(np.float64) @ G[:3, :3].T + G[:3, 3]).astype(np.float32)
    return Clip(frames, Scene(pts, clip.scene.colors))


def test_encodings_invariant_to_global_rigid_transform():
    model, processor = build_tiny(seed=0)
    # points near voxel centres (in frame 0), so float rounding cannot move a point across a voxel boundary; jittered,
    # so that no two kNN distances tie
    rng = np.random.default_rng(0)
    base = random_clip(4, seed=11)
    T0 = base.frames[0].T_world_cam
    cells = rng.integers(-15, 15, (200, 3)) + 0.5 + rng.uniform(-0.3, 0.3, (200, 3))
    lattice = cells * model.config.voxel_size + np.array([0, 0, 1.5])
    pts_world = (lattice @ T0[:3, :3].T + T0[:3, 3]).astype(np.float64)
    clip = Clip(base.frames, Scene(pts_world.astype(np.float32), rng.integers(0, 256, (200, 3), dtype=np.uint8)))
    G = rigid([0.4, -1.1, 0.7], [3.0, -2.0, 0.5])
    a = processor("Where is the mug?", clip)
    b = processor("Where is the mug?", _moved(clip, G))
    for name in ("patch_rays", "points", "point_rays", "point_mask"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=2e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model.get_prefix_embeds(b), model.get_prefix_embeds(a), rtol=0, atol=1e-4)
    # and the encodings do depend on the relative motion: moving only the second camera changes them
    frames = list(clip.frames)
    f1 = frames[1]
    frames[1] = Frame(f1.stamp, f1.image, f1.K, f1.T_world_cam @ rigid([0, 0.5, 0], [0] * 3))
    c = processor("Where is the mug?", Clip(tuple(frames), clip.scene))
    assert not torch.allclose(c.patch_rays[0, 1], a.patch_rays[0, 1], atol=1e-3)
