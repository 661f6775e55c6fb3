"""Benchmark of stllm_core.memory on this machine: per-frame ingest at 640x480, map update per depth frame, frame
selection, TF lookups, and the memory held by the frame buffer and the map against their bounds.

A camera walks a loop inside a synthetic 8 m x 6 m x 3 m room; depth is the exact ray/box distance. Run once:

    python benchmarks/bench_memory.py            # about a minute on 2 busy cores
    python benchmarks/bench_memory.py --frames 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from stllm_core.geometry.poses import R_BODY_OPTICAL, split_transform
from stllm_core.memory import FrameBuffer, FrameBufferConfig, SceneMap, SceneMapConfig, TransformBuffer

W, H = 640, 480
K = np.array([[525.0, 0.0, 319.5], [0.0, 525.0, 239.5], [0.0, 0.0, 1.0]])
ROOM_LO, ROOM_HI = np.array([-4.0, -3.0, 0.0]), np.array([4.0, 3.0, 3.0])


def camera_pose(t: float) -> np.ndarray:
    """World-from-optical pose at time t: walking a 2 m circle at 1.2 m height, looking ahead, 0.2 rad/s."""
    a = 0.2 * t
    T = np.eye(4)
    T[:3, 3] = [2.0 * np.cos(a), 2.0 * np.sin(a), 1.2]
    R_world_body = Rotation.from_euler("z", a + np.pi / 2).as_matrix()
    T[:3, :3] = R_world_body @ R_BODY_OPTICAL
    return T


_v, _u = np.mgrid[0:H, 0:W].astype(np.float64)
_RAYS = np.stack([(_u - K[0, 2]) / K[0, 0], (_v - K[1, 2]) / K[1, 1], np.ones_like(_u)], axis=-1)  # optical z = 1


def room_depth(T: np.ndarray) -> np.ndarray:
    """Exact depth (optical z, metres, float32) of the room's walls, floor and ceiling seen from pose T."""
    d = _RAYS @ T[:3, :3].T
    o = T[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_hi = (ROOM_HI - o) / d
        t_lo = (ROOM_LO - o) / d
    t = np.where(d > 0, t_hi, t_lo)
    t[~np.isfinite(t)] = np.inf
    return t.min(axis=-1).astype(np.float32)  # ray parameter with optical z = 1 -> depth


def room_image(depth: np.ndarray) -> np.ndarray:
    g = (np.clip(depth / 6.0, 0, 1) * 255).astype(np.uint8)
    return np.stack([g, 255 - g, np.full_like(g, 128)], axis=-1)


def stats_ms(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1e3
    return {"mean_ms": float(a.mean()), "p50_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95))}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(frames: int, fps: float, map_voxels: int) -> dict:
    out: dict = {"machine": f"{platform.machine()}, {platform.processor() or '?'}, python {platform.python_version()}"}
    stamps = np.arange(frames) / fps
    poses = [camera_pose(t) for t in stamps]
    depths, images = [], []
    for T in tqdm(poses, desc="synthesising frames", leave=False):
        d = room_depth(T)
        depths.append(d)
        images.append(room_image(d))

    # TF: map -> odom (static) -> base (dynamic, at fps) -> cam (static optical)
    tf = TransformBuffer(cache_sec=10.0)
    tf.set_transform("map", "odom", 0.0, [0, 0, 0], [0, 0, 0, 1], static=True)
    tf.set_transform("base", "cam", 0.0, [0, 0, 0], [0, 0, 0, 1], static=True)
    set_s, look_s = [], []
    for t, T in zip(stamps, poses):
        tr, q = split_transform(T)
        t0 = time.perf_counter()
        tf.set_transform("odom", "base", float(t), tr, q)
        set_s.append(time.perf_counter() - t0)
    for t in stamps[1:-1] + 0.5 / fps:
        t0 = time.perf_counter()
        tf.lookup("map", "cam", float(t))
        look_s.append(time.perf_counter() - t0)
    out["tf_set_transform"] = stats_ms(set_s)
    out["tf_lookup_3_edges_interpolated"] = stats_ms(look_s)

    # frame buffer ingest: TF lookup at the image stamp + add (copies image and depth)
    cfg = FrameBufferConfig(max_frames=10_000, max_age_sec=1e9, max_bytes=128 << 20)
    buf = FrameBuffer(cfg)
    ingest_s = []
    for t, img, d in tqdm(list(zip(stamps, images, depths)), desc="frame buffer ingest", leave=False):
        t0 = time.perf_counter()
        T = tf.lookup("map", "cam", float(t))
        buf.add(float(t), img, K, T, depth=d)
        ingest_s.append(time.perf_counter() - t0)
    s = buf.stats()
    out["frame_ingest_640x480_rgb_depth"] = stats_ms(ingest_s)
    out["frame_buffer"] = {
        "frames_fed": frames,
        "frames_held": s["frames"],
        "bytes": s["bytes"],
        "max_bytes": s["max_bytes"],
        "evicted_bytes": s["dropped"].get("evicted_bytes", 0),
    }
    for strategy in ("uniform", "coverage"):
        sel = []
        for _ in range(3):
            buf._coverage_cache.clear()  # measure the cold cost (the cache makes repeats cheaper)
            t0 = time.perf_counter()
            picked = buf.select(1e9, 32, strategy=strategy)
            sel.append(time.perf_counter() - t0)
        out[f"select_32_of_{s['frames']}_{strategy}"] = stats_ms(sel) | {"picked": len(picked)}

    # scene map: depth frames at strides 1, 2, 4 (0.06 m voxels, 0.1..5 m)
    for stride in (4, 2, 1):
        m = SceneMap(SceneMapConfig(max_voxels=map_voxels, max_range=5.0))
        upd = []
        for img, d, T in tqdm(list(zip(images, depths, poses)), desc=f"map stride {stride}", leave=False):
            t0 = time.perf_counter()
            m.integrate_depth(d, K, T, image=img, stride=stride)
            upd.append(time.perf_counter() - t0)
        ms = m.stats()
        snap = []
        for _ in range(5):
            t0 = time.perf_counter()
            m.snapshot()
            snap.append(time.perf_counter() - t0)
        out[f"map_update_stride{stride}"] = stats_ms(upd) | {
            "points_per_frame": int(ms["counts"]["points_integrated"] / frames),
            "voxels": ms["voxels"],
            "bytes": ms["bytes"],
            "max_voxels": ms["max_voxels"],
            "bound_bytes": ms["max_bytes"],
            "evicted": ms["counts"].get("evicted_voxels", 0),
            "snapshot": stats_ms(snap),
        }

    # map bound under 10x its capacity: a small map fed the whole walk at stride 2
    small = max(1000, out["map_update_stride2"]["voxels"] // 10)
    m = SceneMap(SceneMapConfig(max_voxels=small, max_range=5.0))
    upd, peak = [], 0
    for img, d, T in zip(images, depths, poses):
        t0 = time.perf_counter()
        m.integrate_depth(d, K, T, image=img, stride=2)
        upd.append(time.perf_counter() - t0)
        peak = max(peak, len(m))
    out["map_bounded_10x"] = stats_ms(upd) | {"max_voxels": small, "peak_voxels": peak, "final_bytes": m.nbytes}
    out["max_rss_mb"] = rss_mb()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=150, help="frames of the walk (default 150 = 5 s at 30 Hz)")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--map-voxels", type=int, default=500_000, help="max_voxels of the full-size maps")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    out = run(args.frames, args.fps, args.map_voxels)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
