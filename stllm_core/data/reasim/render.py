"""CPU rendering of REA-Sim kitchens with open3d's RaycastingScene: RGB (flat colours, Lambert shading, checkered
floor) and z-depth, plus the scene point cloud sampled from the same boxes.

Rays follow the pinhole model of K with pixel centres at integer coordinates (OpenCV): pixel (u, v) looks along
R @ K^-1 [u, v, 1] from the camera centre, so the ray parameter t of a hit is its z-depth in metres.
"""

from __future__ import annotations

import math

import numpy as np

from stllm_core.data.reasim.scene import DARK_TILE, FURNITURE_COLORS, Box, Kitchen
from stllm_core.data.reasim.trajectory import Episode

BACKGROUND = np.array([205, 210, 220], np.float32)
LIGHT = np.array([0.35, 0.55, 1.0]) / np.linalg.norm([0.35, 0.55, 1.0])
CHECKER = 0.5  # floor tile size, metres

# 12 triangles of a unit box: (face normal, two triangles over corner indices of lo/hi combinations)
_CORNERS = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float)  # index = 4x + 2y + z
_FACES = [  # normal, quad corners (counter-clockwise seen from outside)
    ((-1, 0, 0), (0, 1, 3, 2)), ((1, 0, 0), (4, 6, 7, 5)),
    ((0, -1, 0), (0, 4, 5, 1)), ((0, 1, 0), (2, 3, 7, 6)),
    ((0, 0, -1), (0, 2, 6, 4)), ((0, 0, 1), (1, 5, 7, 3)),
]


def intrinsics(width: int, height: int, hfov_deg: float = 80.0) -> np.ndarray:
    """Pinhole K for an image of width x height pixels with the given horizontal field of view (square pixels)."""
    f = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
    return np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]])


def boxes_to_triangles(boxes: list[Box]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> vertices (8B, 3) float32, triangles (12B, 3) uint32, per-triangle colours (12B, 3) float32,
    normals (12B, 3) float32 and the box index of each triangle (12B,)."""
    verts, tris, cols, norms, owner = [], [], [], [], []
    for bi, b in enumerate(boxes):
        verts.append(b.lo + _CORNERS * b.size)
        for n, (a, c1, c2, d) in _FACES:
            base = 8 * bi
            tris += [(base + a, base + c1, base + c2), (base + a, base + c2, base + d)]
            cols += [b.color, b.color]
            norms += [n, n]
            owner += [bi, bi]
    return (np.concatenate(verts).astype(np.float32), np.asarray(tris, np.uint32), np.asarray(cols, np.float32),
            np.asarray(norms, np.float32), np.asarray(owner))


def frame_boxes(kitchen: Kitchen, episode: Episode, i: int) -> list[Box]:
    """Everything visible in frame i: structure, furniture, items at their frame-i place (hidden when inside a
    container; in the right hand, in front of the camera, when carried)."""
    boxes = list(kitchen.structure) + list(kitchen.furniture)
    T = episode.poses[i]
    for kind, st in episode.states[i].items():
        it = kitchen.item(kind)
        if st.carried:
            c = T[:3, :3] @ episode.hand_offset + T[:3, 3]
            boxes.append(Box(kind, kind, c, it.size.copy(), it.color))
        elif not st.inside:
            boxes.append(Box(kind, kind, np.asarray(st.position, float), it.size.copy(), it.color))
    return boxes


_RAY_CACHE: dict = {}


def camera_rays(K: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H*W, 3) float32 ray directions in the camera frame, K^-1 [u, v, 1] (z = 1), row-major pixel order."""
    key = (np.asarray(K, np.float64).tobytes(), width, height)
    if key not in _RAY_CACHE:
        u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
        pix = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3)
        _RAY_CACHE.clear()
        _RAY_CACHE[key] = (pix @ np.linalg.inv(K).T).astype(np.float32)
    return _RAY_CACHE[key]


def render(boxes: list[Box], K: np.ndarray, T_world_cam: np.ndarray, width: int, height: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the boxes -> (rgb (H, W, 3) uint8, depth (H, W) float32 metres, 0 where nothing was hit)."""
    import open3d as o3d

    verts, tris, cols, norms, owner = boxes_to_triangles(boxes)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(verts), o3d.core.Tensor(tris))
    d_world = camera_rays(K, width, height) @ T_world_cam[:3, :3].T.astype(np.float32)
    rays = np.empty((d_world.shape[0], 6), np.float32)
    rays[:, :3] = T_world_cam[:3, 3]
    rays[:, 3:] = d_world
    hit = scene.cast_rays(o3d.core.Tensor(rays))
    t = hit["t_hit"].numpy()
    ok = np.isfinite(t)
    pid = np.where(ok, hit["primitive_ids"].numpy(), 0).astype(np.int64)
    # per-triangle shaded colour (Lambert + ambient), one extra row for "no hit"
    shade = 0.5 + 0.5 * np.clip(norms @ LIGHT.astype(np.float32), 0.0, 1.0)
    tri_rgb = np.vstack([cols * shade[:, None], BACKGROUND[None]])
    pid[~ok] = len(cols)
    rgb = tri_rgb[pid]
    # checkered floor: tile parity of the hit point
    is_floor = np.append(np.array([boxes[o].kind == "floor" for o in owner]), False)
    on_floor = np.flatnonzero(is_floor[pid])
    if on_floor.size:
        p = rays[on_floor, :3] + rays[on_floor, 3:] * t[on_floor, None]
        parity = (np.floor(p[:, 0] / CHECKER) + np.floor(p[:, 1] / CHECKER)) % 2 == 1
        dark = on_floor[parity]
        rgb[dark] *= DARK_TILE
    depth = np.where(ok, t, 0.0).astype(np.float32)
    return (np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(height, width, 3),
            depth.reshape(height, width))


# Points per m^2 of surface, as a reconstruction (EPIC-FIELDS, COLMAP) gives them: sparse on large plain walls and
# floors, denser on furniture (densest on the tops where items stand), dense on small items, so that a capped cloud
# (max_points) still holds every item and shows what each item stands on.
DENSITY = {"structure": 10.0, "furniture": 25.0, "furniture_top": 80.0, "item": 250.0}


def point_density(box: Box, normal) -> float:
    if box.kind in ("floor", "wall"):
        return DENSITY["structure"]
    if box.kind in FURNITURE_COLORS:
        return DENSITY["furniture_top"] if normal[2] == 1 else DENSITY["furniture"]
    return DENSITY["item"]


def sample_points(boxes: list[Box], rng: np.random.Generator, min_per_box: int = 24
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Points sampled uniformly on the box faces a person can see (point_density(box, face) per m^2, at least
    `min_per_box` per box): walls only on their room side, the floor only on top, no bottom faces (they rest on
    something, or hang above eye level). -> (xyz float32 (N, 3), rgb uint8 (N, 3)); floor points carry the checker
    colour."""
    xyz, rgb = [], []
    for b in boxes:
        faces = []
        for n, _ in _FACES:
            n = np.array(n, float)
            if b.kind == "wall" and not np.allclose(n[:2], b.front):
                continue
            if n[2] == -1 or (b.kind == "floor" and n[2] != 1):
                continue
            faces.append(n)
        weights = []  # expected points per face
        for n in faces:
            ax = [k for k in range(3) if n[k] == 0]
            weights.append(b.size[ax[0]] * b.size[ax[1]] * point_density(b, n))
        total = float(sum(weights))
        if total == 0 or not faces:
            continue
        count = max(min_per_box, int(round(total)))
        which = rng.choice(len(faces), size=count, p=np.array(weights) / total)
        uvw = rng.uniform(0, 1, (count, 3))
        for k, n in enumerate(faces):
            m = which == k
            a = np.argmax(np.abs(n))
            uvw[m, a] = 1.0 if n[a] > 0 else 0.0
        pts = b.lo + uvw * b.size
        c = np.tile(np.asarray(b.color, np.float32), (count, 1))
        if b.kind == "floor":
            parity = (np.floor(pts[:, 0] / CHECKER) + np.floor(pts[:, 1] / CHECKER)) % 2 == 1
            c[parity] *= DARK_TILE
        xyz.append(pts)
        rgb.append(c)
    return np.concatenate(xyz).astype(np.float32), np.concatenate(rgb).astype(np.uint8)
