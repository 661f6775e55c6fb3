"""Camera rays for ST-LLM's positional encoding (numpy, float64, no torch).

Conventions: camera poses are world-from-camera 4x4 matrices `T_world_cam` of the OpenCV optical frame
(x right, y down, z forward), as in stllm_core.types. Pixel centres sit at integer coordinates (OpenCV): pixel (u, v)
is column u, row v, and its ray in the camera frame is K^-1 [u, v, 1]^T, normalised to unit length.

The encoding is relative to the FIRST sampled frame ("frame 0"): every pose is re-expressed as T_cam0_cami =
T_world_cam0^-1 @ T_world_cami, patch rays are rotated into frame 0, and point directions are measured from the
camera-0 centre in frame 0. Moving every pose and every point by one rigid transform therefore changes nothing.

Worked example (K with fx = fy = 100, cx = cy = 50, identity pose):
    pixel (50, 50)  -> ray (0, 0, 1)                    (the optical axis)
    pixel (150, 50) -> ray (1, 0, 1) / sqrt(2)          (45 degrees to the right)
    a camera i yawed 90 degrees to the right of camera 0 (R_0i = Rot_y(+90 deg)) sees its optical axis along
    frame-0 +x: its centre pixel's ray becomes (1, 0, 0) in frame 0.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from stllm_core.errors import InputError

RIGID_TOLERANCE = 1e-3  # max |R^T R - I| entry and |det R - 1| accepted for a rotation


def validate_poses(T: np.ndarray, what: str = "T_world_cam") -> np.ndarray:
    """Check (N, 4, 4) rigid transforms: finite, last row [0, 0, 0, 1], orthonormal rotation with det +1.

    Returns the poses as float64. Raises InputError naming the first offending pose index and the problem.
    """
    T = np.asarray(T, dtype=np.float64)
    if T.ndim != 3 or T.shape[1:] != (4, 4):
        raise InputError(f"{what}: expected poses of shape (N, 4, 4), got {T.shape}.")
    for i, Ti in enumerate(T):
        if not np.all(np.isfinite(Ti)):
            raise InputError(f"{what}[{i}] contains NaN or Inf: {Ti.tolist()}.")
        if np.max(np.abs(Ti[3] - (0.0, 0.0, 0.0, 1.0))) > 1e-6:
            raise InputError(f"{what}[{i}] is not a rigid transform: last row is {Ti[3].tolist()}, not [0, 0, 0, 1].")
        R = Ti[:3, :3]
        ortho = float(np.max(np.abs(R.T @ R - np.eye(3))))
        det = float(np.linalg.det(R))
        if ortho > RIGID_TOLERANCE or abs(det - 1.0) > RIGID_TOLERANCE:
            raise InputError(
                f"{what}[{i}] is not a rigid transform: its rotation has max |R^T R - I| = {ortho:.3g} and "
                f"det = {det:.4f} (tolerance {RIGID_TOLERANCE}); scaled, sheared or mirrored poses are refused."
            )
    return T


def invert_rigid(T: np.ndarray) -> np.ndarray:
    """Inverse of rigid transform(s) (..., 4, 4): [R t] -> [R^T, -R^T t]."""
    T = np.asarray(T, dtype=np.float64)
    R = T[..., :3, :3]
    t = T[..., :3, 3]
    Rt = np.swapaxes(R, -1, -2)
    out = np.zeros_like(T)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", Rt, t)
    out[..., 3, 3] = 1.0
    return out


def relative_poses(T_world_cam: np.ndarray) -> np.ndarray:
    """Poses re-expressed relative to frame 0: T_cam0_cami = T_world_cam0^-1 @ T_world_cami, shape (N, 4, 4).

    The first result is the identity. Invariant to any global rigid transform G applied to all poses (G T_i).
    """
    T = validate_poses(T_world_cam)
    return invert_rigid(T[0])[None] @ T


def validate_intrinsics(K: np.ndarray, width: int | None, height: int | None, what: str = "K") -> np.ndarray:
    """Check a (3, 3) pinhole K for an image of width x height pixels; returns it as float64.

    Refuses non-finite values, fx/fy <= 0, a last row other than [0, 0, 1], and (when the image size is given) a
    principal point outside the image (the usual sign that K belongs to another resolution than the image).
    """
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise InputError(f"{what}: expected a 3x3 intrinsics matrix, got shape {K.shape}.")
    if not np.all(np.isfinite(K)):
        raise InputError(f"{what} contains NaN or Inf: {K.tolist()}.")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise InputError(f"{what} has non-positive focal lengths fx={K[0, 0]}, fy={K[1, 1]}; expected both > 0.")
    if np.max(np.abs(K[2] - (0.0, 0.0, 1.0))) > 1e-9 or abs(K[1, 0]) > 1e-9:
        raise InputError(f"{what} is not a pinhole intrinsics matrix (rows 2/3 are {K[1:].tolist()}).")
    cx, cy = K[0, 2], K[1, 2]
    if width is not None and height is not None and not (-0.5 <= cx <= width - 0.5 and -0.5 <= cy <= height - 0.5):
        raise InputError(
            f"{what} has principal point ({cx:.1f}, {cy:.1f}) outside the {width}x{height} image: K and image "
            "size do not match (was K given for another resolution?)."
        )
    return K


def rescale_intrinsics(K: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """K for an image resized from src_size=(width, height) to dst_size=(width, height).

    With pixel centres at integer coordinates, a resize maps u -> (u + 0.5) * s - 0.5, so
    fx' = fx * sx, cx' = (cx + 0.5) * sx - 0.5 (same for y). Example: 640x480 -> 320x240 with cx = 319.5 gives 159.5.
    """
    K = np.asarray(K, dtype=np.float64).copy()
    sx = dst_size[0] / src_size[0]
    sy = dst_size[1] / src_size[1]
    K[0, 0] *= sx
    K[0, 1] *= sx
    K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K[1, 1] *= sy
    K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return K


def pixel_ray_directions(K: np.ndarray, width: int, height: int) -> np.ndarray:
    """Unit ray directions (height, width, 3) in the camera optical frame for every pixel centre."""
    K = np.asarray(K, dtype=np.float64)
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)  # (H, W, 3)
    d = pix @ np.linalg.inv(K).T
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def _adaptive_bins(n: int, out: int) -> list[tuple[int, int]]:
    """torch.nn.functional.adaptive_avg_pool's bins: [floor(i n / out), ceil((i + 1) n / out))."""
    return [(math.floor(i * n / out), math.ceil((i + 1) * n / out)) for i in range(out)]


def adaptive_mean_pool(x: np.ndarray, out: int) -> np.ndarray:
    """Mean of a (H, W, C) grid over adaptive bins to (out, out, C), like torch's adaptive_avg_pool2d."""
    H, W = x.shape[:2]
    rows = [x[a:b].mean(axis=0) for a, b in _adaptive_bins(H, out)]
    x = np.stack(rows)  # (out, W, C)
    cols = [x[:, a:b].mean(axis=1) for a, b in _adaptive_bins(W, out)]
    return np.stack(cols, axis=1)


def patch_ray_directions(
    K: np.ndarray, R_ref_cam: np.ndarray, image_size: int, patch_size: int, pooled: int
) -> np.ndarray:
    """Unit ray directions (pooled, pooled, 3) for the pooled patch grid of one frame, in the reference frame.

    K is the intrinsics of the (image_size x image_size) model input. The vision tower sees a grid of
    g = image_size // patch_size patches (the last image_size % patch_size pixel rows/columns are dropped, as a
    strided convolution does); pixel rays are rotated by R_ref_cam, averaged over each patch, then averaged over the
    same adaptive bins that pool the patch features to pooled x pooled, and normalised to unit length.
    """
    # Rotation is linear, so pooling then rotating equals rotating then pooling: the camera-frame grid is cached per K.
    K = np.asarray(K, dtype=np.float64)
    d = _camera_patch_rays(K.tobytes(), image_size, patch_size, pooled)  # (pooled, pooled, 3)
    d = d @ np.asarray(R_ref_cam, dtype=np.float64).T
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=64)
def _camera_patch_rays(K_bytes: bytes, image_size: int, patch_size: int, pooled: int) -> np.ndarray:
    K = np.frombuffer(K_bytes, dtype=np.float64).reshape(3, 3)
    g = image_size // patch_size
    used = g * patch_size
    d = pixel_ray_directions(K, used, used)  # (used, used, 3)
    d = d.reshape(g, patch_size, g, patch_size, 3).mean(axis=(1, 3))  # (g, g, 3)
    d = adaptive_mean_pool(d, pooled)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    d.setflags(write=False)
    return d


def points_in_frame0(points_world: np.ndarray, T_world_cam0: np.ndarray) -> np.ndarray:
    """Points (N, 3) expressed in the camera-0 optical frame: p0 = R0^T (p - t0)."""
    T0 = np.asarray(T_world_cam0, dtype=np.float64)
    return (np.asarray(points_world, dtype=np.float64) - T0[:3, 3]) @ T0[:3, :3]


def point_ray_directions(points_cam0: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Unit directions (N, 3) from the camera-0 centre to points given in frame 0 (direction only, no range).

    A point at the camera centre (|p| < eps) gets the zero vector. Example: p0 = (0, 0, 2) -> (0, 0, 1).
    """
    p = np.asarray(points_cam0, dtype=np.float64)
    n = np.linalg.norm(p, axis=-1, keepdims=True)
    return np.where(n > eps, p / np.maximum(n, eps), 0.0)
