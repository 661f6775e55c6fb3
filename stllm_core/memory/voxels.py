"""Voxel indexing shared by the frame buffer's coverage selection and the scene map; depth back-projection.

A voxel of size `s` metres holds the points with ``floor(p / s) == (i, j, k)``; its centre is ``(ijk + 0.5) * s``.
The three indices are packed into one int64 key with 21 bits each (offset by 2^20), so indices in [-2^20, 2^20)
are representable: +-62.9 km at 0.06 m voxels. `voxel_keys` drops points outside that range and says how many.
Keys sort in (i, j, k) lexicographic order.
"""

from __future__ import annotations

import math

import numpy as np

KEY_BITS = 21
KEY_OFFSET = 1 << (KEY_BITS - 1)  # voxel indices in [-2^20, 2^20) are representable
KEY_MASK = (1 << KEY_BITS) - 1


def depth_to_world_points(
    depth: np.ndarray,
    K: np.ndarray,
    T_world_cam: np.ndarray,
    stride: int = 1,
    min_range: float = 0.0,
    max_range: float = math.inf,
    return_pixels: bool = False,
):
    """Back-project every `stride`-th pixel of a depth image (metres along the optical z axis) into the world frame.

    Pixel (u, v) with depth z is the optical-frame point ((u - cx) z / fx, (v - cy) z / fy, z), then
    p_world = T_world_cam @ p_cam. Pixels with NaN/Inf/<= 0 depth or z outside [min_range, max_range] are skipped.
    Returns (N, 3) float64 world points; with `return_pixels`, also the (N,) row and column indices of the points
    in the *subsampled* image ``depth[::stride, ::stride]``.
    Example: K = [[100, 0, 50], [0, 100, 40], [0, 0, 1]], identity pose, z = 2 at pixel (u=150, v=40)
    -> (2.0, 0.0, 2.0).
    """
    d = np.asarray(depth, dtype=np.float32)[::stride, ::stride]
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(d) & (d > 0) & (d >= min_range) & (d <= max_range)
    v, u = np.nonzero(keep)
    z = d[v, u].astype(np.float64)
    x = (u * (stride / K[0, 0]) - K[0, 2] / K[0, 0]) * z
    y = (v * (stride / K[1, 1]) - K[1, 2] / K[1, 1]) * z
    T = np.asarray(T_world_cam, dtype=np.float64)
    world = np.empty((len(z), 3))
    for r in range(3):  # p_world = R p_cam + t, row by row (faster than an (N, 3) @ (3, 3) matmul)
        world[:, r] = T[r, 0] * x + T[r, 1] * y + T[r, 2] * z + T[r, 3]
    return (world, v, u) if return_pixels else world


def pack_keys(ijk: np.ndarray) -> np.ndarray:
    """(N, 3) int64 voxel indices in [-2^20, 2^20) -> (N,) int64 keys (i + o) << 42 | (j + o) << 21 | (k + o)."""
    ijk = np.asarray(ijk, dtype=np.int64).reshape(-1, 3) + KEY_OFFSET
    return (ijk[:, 0] << (2 * KEY_BITS)) | (ijk[:, 1] << KEY_BITS) | ijk[:, 2]


def unpack_keys(keys: np.ndarray) -> np.ndarray:
    """Inverse of pack_keys: (N,) int64 -> (N, 3) int64 voxel indices."""
    keys = np.asarray(keys, dtype=np.int64)
    out = np.stack([(keys >> (2 * KEY_BITS)) & KEY_MASK, (keys >> KEY_BITS) & KEY_MASK, keys & KEY_MASK], axis=1)
    return out - KEY_OFFSET


def voxel_keys(xyz: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) points in metres -> (packed int64 keys (M,), bool mask (N,) of the points kept).

    Points that are non-finite or whose voxel index is outside [-2^20, 2^20) are not kept.
    Example: voxel 0.1, point (0.25, -0.05, 0) -> indices (2, -1, 0).
    """
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    ok = np.ones(len(xyz), dtype=bool)
    cols = []
    with np.errstate(invalid="ignore", over="ignore"):
        for c in range(3):  # column by column: faster than (N, 3) reductions along axis 1
            f = np.floor(xyz[:, c] / voxel_size)
            ok &= (f >= -KEY_OFFSET) & (f < KEY_OFFSET)  # NaN and +-Inf compare False: dropped
            cols.append(f)
    i, j, k = ((f[ok].astype(np.int64) + KEY_OFFSET) for f in cols)
    return (i << (2 * KEY_BITS)) | (j << KEY_BITS) | k, ok


def key_centers(keys: np.ndarray, voxel_size: float) -> np.ndarray:
    """Centres (N, 3) float64 metres of the voxels with packed `keys`."""
    return (unpack_keys(keys).astype(np.float64) + 0.5) * voxel_size
