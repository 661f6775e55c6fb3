"""Convert an RGB-D sequence folder (Redwood / Open3D / Augmented ICL-NUIM style) into an EPIC-style clip folder.

Input folder (found automatically; override with arguments):
    color/ | image/ | rgb/      colour frames (jpg/png), sorted by name; a numeric stem is the frame id
    depth/                      16-bit depth PNGs, `depth_scale` units per metre (1000 = millimetres), 0 = invalid
    rgbd.match                  optional "depth/NNNNN.png color/NNNNN.jpg" pairs (otherwise paired by sorted order)
    trajectory.log              Redwood .log camera-to-world poses (also looked for in test_scene/); 5-line blocks
                                "i j k" + 4 rows, block i = frame i, OpenCV camera axes (x right, y down, z forward)
    camera_*.json | intrinsic*.json   Open3D PinholeCameraIntrinsic (width, height, column-major intrinsic_matrix)

World frame of the written poses (`world=`):
    "z-up"          (default) REP-103 `map` at the first camera: x = its optical axis, y = its left, z = its up
                    (-y optical). Up is true up as far as the first camera is level.
    "first-camera"  the first camera's optical frame (T_world_cam0 = identity)
    "source"        the trajectory's own world frame
Colour and depth files are copied byte for byte (depth is rescaled only when depth_scale != 1000). The scene cloud is
fused from `cloud_frames` depth frames, voxel-averaged at `voxel` metres.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from stllm_core.data.clip_folder import (
    FORMAT,
    VERSION,
    check_K,
    check_pose,
    encode_depth_png,
    format_matrix,
    frame_name,
    load_depth_png,
    load_rgb,
    write_pointcloud_npy,
)
from stllm_core.errors import DataError

logger = logging.getLogger(__name__)

# rotation taking optical-frame vectors (x right, y down, z forward) to body-frame ones (x forward, y left, z up)
R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def read_trajectory_log(path: str | Path) -> dict[int, np.ndarray]:
    """Redwood/Open3D .log -> {frame index: 4x4 camera-to-world}. DataError names the file and block on problems."""
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    except FileNotFoundError:
        raise DataError(f"Trajectory {path} does not exist.") from None
    if len(lines) % 5:
        raise DataError(f"Trajectory {path} has {len(lines)} non-comment lines; expected blocks of 5 "
                        f"(an 'i j k' line and 4 matrix rows).")
    poses: dict[int, np.ndarray] = {}
    for b in range(len(lines) // 5):
        block = lines[5 * b: 5 * b + 5]
        try:
            idx = int(block[0].split()[0])
            T = np.array([[float(v) for v in row.split()] for row in block[1:]])
        except (ValueError, IndexError):
            raise DataError(f"Trajectory {path}: block {b} (line {5 * b + 1}) is not 'i j k' + 4 rows of numbers.") \
                from None
        if T.shape != (4, 4):
            raise DataError(f"Trajectory {path}: block {b} (frame {idx}) is not a 4x4 matrix.")
        poses[idx] = check_pose(T, f"of frame {idx} in {path}")
    if not poses:
        raise DataError(f"Trajectory {path} holds no poses.")
    return poses


def read_intrinsic_json(path: str | Path) -> tuple[np.ndarray, int, int]:
    """Open3D PinholeCameraIntrinsic JSON -> (K (3,3), width, height); the matrix is stored column-major."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        m = np.asarray(d["intrinsic_matrix"], dtype=np.float64)
        w, h = int(d["width"]), int(d["height"])
    except FileNotFoundError:
        raise DataError(f"Intrinsic file {path} does not exist.") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"Intrinsic file {path} is not an Open3D PinholeCameraIntrinsic JSON ({e}).") from None
    if m.size != 9:
        raise DataError(f"Intrinsic file {path}: intrinsic_matrix has {m.size} numbers; expected 9.")
    return check_K(m.reshape(3, 3).T, str(path)), w, h


def _find(src: Path, names: list[str], what: str, given: str | Path | None) -> Path:
    if given is not None:
        p = Path(given)
        if not p.exists():
            raise DataError(f"{what} {p} does not exist.")
        return p
    for n in names:
        hits = sorted(src.glob(n))
        if hits:
            return hits[0]
    raise DataError(f"No {what} found in {src} (looked for {', '.join(names)}).")


def _pairs(src: Path, color_dir: Path, depth_dir: Path | None) -> list[tuple[int, Path, Path | None]]:
    """(frame id, colour path, depth path) in frame order."""
    exts = {".jpg", ".jpeg", ".png"}
    if depth_dir is not None and (src / "rgbd.match").exists():
        out = []
        for ln in (src / "rgbd.match").read_text().splitlines():
            if ln.strip():
                d, c = ln.split()[:2]
                out.append((src / c, src / d))
    else:
        colors = sorted(p for p in color_dir.iterdir() if p.suffix.lower() in exts)
        if depth_dir is None:
            out = [(c, None) for c in colors]
        else:
            depths = sorted(p for p in depth_dir.iterdir() if p.suffix.lower() == ".png")
            if len(depths) != len(colors):
                raise DataError(f"{color_dir} has {len(colors)} colour frames but {depth_dir} has {len(depths)} "
                                f"depth frames; add an rgbd.match file or pass with_depth=False.")
            out = list(zip(colors, depths))
    if not out:
        raise DataError(f"No colour frames in {color_dir}.")
    result = []
    for k, (c, d) in enumerate(out):
        m = re.fullmatch(r"\D*(\d+)", c.stem)
        result.append((int(m.group(1)) if m else k, c, d))
    ids = [r[0] for r in result]
    if len(set(ids)) != len(ids):
        raise DataError(f"Colour frames in {color_dir} do not have distinct numeric names.")
    return result


def fuse_cloud(frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]], K: np.ndarray, voxel: float,
               pixel_step: int = 2, max_depth: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """Back-project (rgb, depth metres, T_world_cam) frames and voxel-average -> (xyz float32, rgb uint8)."""
    pts, cols = [], []
    for rgb, depth, T in frames:
        d = depth[::pixel_step, ::pixel_step]
        v, u = np.nonzero(np.isfinite(d) & (d > 0) & (d < max_depth))
        z = d[v, u].astype(np.float64)
        u, v = u * pixel_step, v * pixel_step
        pc = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], 1)
        pts.append(pc @ T[:3, :3].T + T[:3, 3])
        cols.append(rgb[v, u].astype(np.float64))
    if not pts:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
    p, c = np.concatenate(pts), np.concatenate(cols)
    keys = np.floor(p / voxel).astype(np.int64)
    _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    xyz = np.zeros((counts.size, 3))
    rgb = np.zeros((counts.size, 3))
    np.add.at(xyz, inv, p)
    np.add.at(rgb, inv, c)
    return (xyz / counts[:, None]).astype(np.float32), np.rint(rgb / counts[:, None]).astype(np.uint8)


def convert_rgbd_sequence(src: str | Path, dst: str | Path, *, trajectory: str | Path | None = None,
                          intrinsic: str | Path | None = None, depth_scale: float = 1000.0, fps: float = 30.0,
                          stride: int = 1, max_frames: int | None = None, with_depth: bool = True,
                          voxel: float = 0.02, cloud_frames: int = 20, world: str = "z-up", scene_id: str = "",
                          overwrite: bool = False, progress: bool = False) -> Path:
    """Write the RGB-D sequence in `src` as an EPIC-style clip folder `dst` (see the module docstring). Returns dst."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"RGB-D sequence folder {src} does not exist.")
    if world not in ("z-up", "first-camera", "source"):
        raise DataError(f"world is {world!r}; expected 'z-up', 'first-camera' or 'source'.")
    if stride < 1 or (max_frames is not None and max_frames < 1) or fps <= 0 or voxel <= 0 or depth_scale <= 0:
        raise DataError(f"Bad conversion settings: stride={stride}, max_frames={max_frames}, fps={fps}, "
                        f"voxel={voxel}, depth_scale={depth_scale} (all must be positive).")
    color_dir = _find(src, ["color", "image", "rgb"], "colour folder", None)
    depth_dir = (src / "depth") if with_depth and (src / "depth").is_dir() else None
    if with_depth and depth_dir is None:
        logger.warning("%s has no depth/ folder; writing a clip without depth", src)
    traj_path = _find(src, ["trajectory.log", "test_scene/trajectory.log", "*.log"], "trajectory (.log)", trajectory)
    K_path = _find(src, ["camera_intrinsic.json", "intrinsic*.json", "camera_*.json"], "intrinsic JSON", intrinsic)
    K, width, height = read_intrinsic_json(K_path)
    traj = read_trajectory_log(traj_path)
    pairs = _pairs(src, color_dir, depth_dir)[::stride]
    if max_frames is not None:
        pairs = pairs[:max_frames]
    missing = [fid for fid, _, _ in pairs if fid not in traj]
    if missing:
        raise DataError(f"Trajectory {traj_path} has no pose for frame(s) {missing[:10]} (it covers "
                        f"{min(traj)}..{max(traj)}).")
    T0 = traj[pairs[0][0]]
    if world == "source":
        T_new_old = np.eye(4)
    else:
        T_new_old = np.linalg.inv(T0)
        if world == "z-up":
            B = np.eye(4)
            B[:3, :3] = R_BODY_OPTICAL
            T_new_old = B @ T_new_old

    if dst.exists():
        if not overwrite and any(dst.iterdir()):
            raise DataError(f"Clip folder {dst} already exists and is not empty (pass overwrite=True).")
        shutil.rmtree(dst, ignore_errors=True)
    (dst / "frames").mkdir(parents=True)
    (dst / "c2ws").mkdir()
    if depth_dir is not None:
        (dst / "depth").mkdir()
    it = pairs
    if progress:
        from tqdm import tqdm

        it = tqdm(pairs, unit="frame", desc="rgbd2clip")
    cloud_pick = set(np.rint(np.linspace(0, len(pairs) - 1, min(cloud_frames, len(pairs)))).astype(int).tolist()) \
        if depth_dir is not None and cloud_frames > 0 else set()
    cloud_in = []
    ids = []
    for k, (fid, cpath, dpath) in enumerate(it):
        ext = "png" if cpath.suffix.lower() == ".png" else "jpg"
        shutil.copyfile(cpath, dst / "frames" / frame_name(fid, ext))
        T = check_pose(T_new_old @ traj[fid], f"of frame {fid} (from {traj_path})")
        (dst / "c2ws" / f"{fid}.txt").write_text(format_matrix(T))
        if dpath is not None:
            out = dst / "depth" / frame_name(fid, "png")
            depth = None
            if depth_scale == 1000.0:
                shutil.copyfile(dpath, out)
            else:
                depth = load_depth_png(dpath, depth_scale)
                encode_depth_png(out, depth, 1000.0)
            if k in cloud_pick:
                rgb = load_rgb(cpath)
                depth = load_depth_png(dpath, depth_scale) if depth is None else depth
                if rgb.shape[:2] != (height, width) or depth.shape != (height, width):
                    raise DataError(f"Frame {cpath} / {dpath} are {rgb.shape[1]}x{rgb.shape[0]} / "
                                    f"{depth.shape[1]}x{depth.shape[0]}; the intrinsics say {width}x{height}.")
                cloud_in.append((rgb, depth, T))
        ids.append(fid)
    (dst / "K.txt").write_text(format_matrix(K))
    sid = scene_id or src.name
    meta = {"format": FORMAT, "version": VERSION, "scene_id": sid, "fps": float(fps), "width": width,
            "height": height, "frame_ids": ids, "stamps": [fid / float(fps) for fid in ids], "depth_scale": 1000.0,
            "camera": "OpenCV optical (x right, y down, z forward)", "world_frame": "map" if world == "z-up" else world,
            "source": str(src), "trajectory": str(traj_path), "world": world}
    if cloud_in:
        xyz, rgb = fuse_cloud(cloud_in, K, voxel)
        name = f"{sid}_vert.npy"
        write_pointcloud_npy(dst / name, xyz, rgb)
        meta["pointcloud"] = name
    (dst / "meta.json").write_text(json.dumps(meta, indent=1))
    logger.info("Wrote %d frames of %s to %s", len(ids), src, dst)
    return dst
