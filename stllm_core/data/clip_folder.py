"""EPIC-style clip folders: the one on-disk layout for recorded or generated egocentric clips.

Layout (mirrors the REA release; every path is relative to the clip folder)::

    <clip>/
      meta.json                 {"format": "stllm-clip", "version": 1, "scene_id", "fps", "width", "height",
                                 "frame_ids": [...], "stamps": [...], "depth_scale": 1000.0,
                                 "pointcloud": "<name>_vert.npy", ...}   (optional; defaults below)
      frames/frame_%010d.jpg    RGB frames (or .png), one per frame id
      c2ws/{id}.txt             4x4 camera-to-world pose of frame `id` (whitespace separated, row-major),
                                camera = OpenCV optical frame (x right, y down, z forward), metres
      K.txt                     3x3 intrinsics of the frames (pixels)
      depth/frame_%010d.png     optional: 16-bit z-depth, millimetres by default (meta "depth_scale" units per metre),
                                0 = invalid
      <name>_vert.npy           optional: scene cloud (N, 6) = xyz (metres, world frame) + RGB 0-255 (or <name>.ply)
      qa.json                   optional: REA records about this clip (paths relative to the clip folder)

Without meta.json the frame ids come from the files in frames/, fps defaults to 30 and stamps are id/fps.
`ClipFolder.read` checks the whole folder (except pixel data) and raises DataError naming the missing or malformed
file: a missing frame or pose for an id, NaN or non-rigid poses, a K that is not 3x3 with positive focal lengths, a
point cloud of the wrong shape. Pixel files are decoded lazily by `load_frame`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stllm_core.errors import DataError, InputError
from stllm_core.geometry.rays import validate_intrinsics
from stllm_core.types import Clip, Frame, Scene

logger = logging.getLogger(__name__)

FORMAT = "stllm-clip"
VERSION = 1
FRAME_RE = re.compile(r"^frame_(\d{10})\.(jpg|jpeg|png)$", re.IGNORECASE)
DEFAULT_FPS = 30.0
DEFAULT_DEPTH_SCALE = 1000.0  # depth PNG units per metre (millimetres)
RIGID_TOL = 1e-4


def frame_name(frame_id: int, ext: str = "jpg") -> str:
    """File name of frame `frame_id`: frame_id=7 -> 'frame_0000000007.jpg'."""
    return f"frame_{int(frame_id):010d}.{ext}"


# ----------------------------------------------------------------------------------------------------------------------
# Small validated readers (each error names the file)


def read_matrix(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a whitespace-separated text matrix of `shape` (float64). DataError names the file on any problem."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise DataError(f"Missing file {path}.") from None
    except OSError as e:
        raise DataError(f"Cannot read {path}: {e}.") from None
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise DataError(f"{path} is not a whitespace-separated matrix of numbers.") from None
    if len(values) != shape[0] * shape[1]:
        raise DataError(f"{path} has {len(values)} numbers; expected a {shape[0]}x{shape[1]} matrix.")
    m = np.asarray(values, dtype=np.float64).reshape(shape)
    if not np.all(np.isfinite(m)):
        raise DataError(f"{path} contains NaN or infinite values.")
    return m


def check_pose(T: np.ndarray, where: str, tol: float = RIGID_TOL) -> np.ndarray:
    """Check that T is a finite rigid 4x4 transform (orthonormal R, det +1, last row 0 0 0 1); return it as float64."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise DataError(f"Pose {where} has shape {T.shape}; expected (4, 4).")
    if not np.all(np.isfinite(T)):
        raise DataError(f"Pose {where} contains NaN or infinite values.")
    if not np.allclose(T[3], [0, 0, 0, 1], atol=tol):
        raise DataError(f"Pose {where} has last row {T[3].tolist()}; expected [0, 0, 0, 1].")
    R = T[:3, :3]
    err = float(np.abs(R.T @ R - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if err > tol or abs(det - 1.0) > tol:
        raise DataError(
            f"Pose {where} is not rigid: |R^T R - I|max = {err:.3g}, det(R) = {det:.6g} (tolerance {tol:g})."
        )
    return T


def check_K(K: np.ndarray, where: str) -> np.ndarray:
    """A (3, 3) pinhole K from a file or frame (the model's own check, as a DataError naming where it came from)."""
    try:
        return validate_intrinsics(K, None, None, what=f"Intrinsics {where}")
    except InputError as e:
        raise DataError(str(e)) from e


def read_pointcloud(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a scene cloud: `*.npy` (N, >=6: xyz + RGB 0-255) or `*.ply` -> (xyz float32 (N,3), rgb uint8 (N,3))."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Missing point cloud {path}.")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"Point cloud {path} is not a readable .npy array: {e}.") from None
        if arr.ndim != 2 or arr.shape[1] < 6:
            raise DataError(f"Point cloud {path} has shape {arr.shape}; expected (N, 6) = xyz + RGB 0-255.")
        arr = arr.astype(np.float64, copy=False)
        if not np.all(np.isfinite(arr[:, :6])):
            raise DataError(f"Point cloud {path} contains NaN or infinite values.")
        rgb = arr[:, 3:6]
        if rgb.size and (rgb.min() < 0 or rgb.max() > 255):
            raise DataError(f"Point cloud {path} has colours in [{rgb.min()}, {rgb.max()}]; expected 0-255.")
        return arr[:, :3].astype(np.float32), np.rint(rgb).astype(np.uint8)
    if path.suffix.lower() == ".ply":
        import open3d as o3d  # lazy: heavy import

        pcd = o3d.io.read_point_cloud(str(path))
        xyz = np.asarray(pcd.points, dtype=np.float32)
        if xyz.shape[0] == 0:
            raise DataError(f"Point cloud {path} has no points (or is not a readable PLY).")
        if pcd.has_colors():
            rgb = np.clip(np.rint(np.asarray(pcd.colors) * 255.0), 0, 255).astype(np.uint8)
        else:
            rgb = np.full((xyz.shape[0], 3), 128, np.uint8)
        return xyz, rgb
    raise DataError(f"Point cloud {path} has an unsupported extension; expected .npy or .ply.")


def write_pointcloud_npy(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """Write an (N, 6) float32 array: xyz metres + RGB 0-255 (the REA `*_vert.npy` layout)."""
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    rgb = np.asarray(rgb).reshape(-1, 3)
    if xyz.shape[0] != rgb.shape[0]:
        raise DataError(f"Point cloud {path}: {xyz.shape[0]} points but {rgb.shape[0]} colours.")
    np.save(path, np.concatenate([xyz, rgb.astype(np.float32)], axis=1), allow_pickle=False)


def load_rgb(path: Path) -> np.ndarray:
    """Decode an RGB image file -> (H, W, 3) uint8."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"Missing image {path}.") from None
    except OSError as e:
        raise DataError(f"Image {path} cannot be decoded: {e}.") from None


def load_depth_png(path: Path, scale: float) -> np.ndarray:
    """Decode a 16-bit depth PNG -> (H, W) float32 metres, NaN where the stored value is 0."""
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DataError(f"Depth image {path} is missing or cannot be decoded.")
    if raw.ndim != 2 or raw.dtype != np.uint16:
        raise DataError(f"Depth image {path} is {raw.dtype} with shape {raw.shape}; expected single-channel 16-bit.")
    depth = raw.astype(np.float32) / np.float32(scale)
    depth[raw == 0] = np.nan
    return depth


def encode_depth_png(path: Path, depth_m: np.ndarray, scale: float = DEFAULT_DEPTH_SCALE) -> None:
    """Write metres -> 16-bit PNG (units of 1/scale m); NaN, <=0 and out-of-range values become 0 (invalid)."""
    import cv2

    d = np.asarray(depth_m, dtype=np.float64) * scale
    bad = ~np.isfinite(d) | (d <= 0) | (d > 65535)
    raw = np.rint(np.where(bad, 0, d)).astype(np.uint16)
    if not cv2.imwrite(str(path), raw):
        raise DataError(f"Cannot write depth image {path}.")


# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ClipFolder:
    """A validated EPIC-style clip folder (see the module docstring for the layout).

    Index `i` in the methods is the position in time order (0..N-1); `frame_ids[i]` is the number in the file names.
    """

    path: Path
    frame_ids: list[int]
    frames: list[Path]  # RGB frame files, time order
    poses: np.ndarray  # (N, 4, 4) float64 world-from-camera (OpenCV optical)
    K: np.ndarray  # (3, 3) float64
    stamps: np.ndarray  # (N,) float64 seconds
    fps: float
    width: int | None = None
    height: int | None = None
    scene_id: str = ""
    depth_paths: list[Path] | None = None
    depth_scale: float = DEFAULT_DEPTH_SCALE
    pointcloud_path: Path | None = None
    qa_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    _points: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.frame_ids)

    # -- reading ---------------------------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | Path, load_points: bool = True) -> ClipFolder:
        """Validate and read a clip folder. Raises DataError naming the first problem found."""
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"Clip folder {root} does not exist or is not a directory.")
        meta: dict[str, Any] = {}
        meta_path = root / "meta.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{meta_path} is not valid JSON: {e}.") from None
            if not isinstance(meta, dict):
                raise DataError(f"{meta_path} must hold a JSON object; got {type(meta).__name__}.")

        frames_dir = root / "frames"
        if not frames_dir.is_dir():
            raise DataError(f"Clip folder {root} has no frames/ directory.")
        found: dict[int, Path] = {}
        for p in frames_dir.iterdir():
            m = FRAME_RE.match(p.name)
            if m:
                fid = int(m.group(1))
                if fid in found:
                    raise DataError(f"Frame id {fid} appears twice in {frames_dir}: {found[fid].name} and {p.name}.")
                found[fid] = p
        if "frame_ids" in meta:
            ids = meta["frame_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids) or not ids:
                raise DataError(f"{meta_path}: `frame_ids` must be a non-empty list of non-negative integers.")
            if sorted(set(ids)) != ids:
                raise DataError(f"{meta_path}: `frame_ids` must be strictly increasing.")
            missing = [i for i in ids if i not in found]
            if missing:
                raise DataError(
                    f"Clip folder {root} is missing frame(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                    f"(expected {frames_dir / frame_name(missing[0])} or .png)."
                )
        else:
            ids = sorted(found)
            if not ids:
                raise DataError(f"{frames_dir} holds no frame_%010d.jpg/.png files.")
        frames = [found[i] for i in ids]

        poses = np.stack([check_pose(read_matrix(root / "c2ws" / f"{i}.txt", (4, 4)), str(root / "c2ws" / f"{i}.txt"))
                          for i in ids])
        K = check_K(read_matrix(root / "K.txt", (3, 3)), str(root / "K.txt"))

        fps = meta.get("fps", DEFAULT_FPS)
        if not isinstance(fps, (int, float)) or not np.isfinite(fps) or fps <= 0:
            raise DataError(f"{meta_path}: `fps` is {fps!r}; expected a positive number.")
        if "stamps" in meta:
            stamps = np.asarray(meta["stamps"], dtype=np.float64)
            if stamps.shape != (len(ids),) or not np.all(np.isfinite(stamps)):
                raise DataError(f"{meta_path}: `stamps` must be {len(ids)} finite numbers (one per frame id).")
            if np.any(np.diff(stamps) <= 0):
                raise DataError(f"{meta_path}: `stamps` must be strictly increasing.")
        else:
            stamps = np.asarray(ids, dtype=np.float64) / float(fps)

        depth_paths = None
        depth_dir = root / "depth"
        if depth_dir.is_dir():
            depth_paths = [depth_dir / frame_name(i, "png") for i in ids]
            missing = [i for i, p in zip(ids, depth_paths) if not p.exists()]
            if missing:
                raise DataError(f"Clip folder {root} has depth/ but lacks depth frame(s) {missing[:10]} "
                                f"(expected {depth_paths[ids.index(missing[0])]}).")
        depth_scale = float(meta.get("depth_scale", DEFAULT_DEPTH_SCALE))
        if not depth_scale > 0:
            raise DataError(f"{meta_path}: `depth_scale` is {depth_scale!r}; expected > 0.")

        pc = meta.get("pointcloud")
        if pc is not None:
            pointcloud_path = root / pc
            if not pointcloud_path.exists():
                raise DataError(f"{meta_path} names point cloud {pc!r} but {pointcloud_path} does not exist.")
        else:
            cands = sorted(root.glob("*_vert.npy")) or sorted(root.glob("*.ply"))
            if len(cands) > 1:
                raise DataError(f"Clip folder {root} has several point clouds {[c.name for c in cands]}; "
                                f"name one in meta.json `pointcloud`.")
            pointcloud_path = cands[0] if cands else None

        qa_path = root / "qa.json" if (root / "qa.json").exists() else None
        width, height = meta.get("width"), meta.get("height")
        clip = cls(path=root, frame_ids=list(ids), frames=frames, poses=poses, K=K, stamps=stamps, fps=float(fps),
                   width=width, height=height, scene_id=str(meta.get("scene_id", root.name)), depth_paths=depth_paths,
                   depth_scale=depth_scale, pointcloud_path=pointcloud_path, qa_path=qa_path, meta=meta)
        if load_points and pointcloud_path is not None:
            clip._points = read_pointcloud(pointcloud_path)
        return clip

    # -- accessors -------------------------------------------------------------------------------------------------
    @property
    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(xyz float32 (N,3) metres in the world frame, rgb uint8 (N,3)); empty arrays if the clip has no cloud."""
        if self._points is None:
            if self.pointcloud_path is None:
                self._points = (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8))
            else:
                self._points = read_pointcloud(self.pointcloud_path)
        return self._points

    def scene(self) -> Scene:
        xyz, rgb = self.points
        return Scene(points=xyz, colors=rgb, frame_id="map", stamp=float(self.stamps[-1]))

    def load_image(self, i: int) -> np.ndarray:
        img = load_rgb(self.frames[i])
        if self.width is not None and self.height is not None and img.shape[:2] != (self.height, self.width):
            raise DataError(f"Frame {self.frames[i]} is {img.shape[1]}x{img.shape[0]}; meta.json says "
                            f"{self.width}x{self.height}.")
        return img

    def load_depth(self, i: int) -> np.ndarray | None:
        """(H, W) float32 metres (NaN = invalid) or None if the clip has no depth."""
        if self.depth_paths is None:
            return None
        return load_depth_png(self.depth_paths[i], self.depth_scale)

    def load_frame(self, i: int, with_depth: bool = False) -> Frame:
        """Frame at time-order index i (image decoded now)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"Frame index {i} out of range for a clip of {len(self)} frames.")
        return Frame(stamp=float(self.stamps[i]), image=self.load_image(i), K=self.K.copy(),
                     T_world_cam=self.poses[i].copy(), depth=self.load_depth(i) if with_depth else None)

    def index_of(self, frame_id: int) -> int:
        try:
            return self.frame_ids.index(int(frame_id))
        except ValueError:
            raise DataError(f"Frame id {frame_id} is not in clip {self.path}.") from None

    def clip(self, indices: Sequence[int] | None = None, with_depth: bool = False) -> Clip:
        """A `Clip` of the given time-order indices (all frames by default) with the scene cloud."""
        idx = range(len(self)) if indices is None else indices
        return Clip(frames=tuple(self.load_frame(i, with_depth) for i in idx), scene=self.scene())

    def read_qa(self):
        """The REA records of qa.json (paths resolved against this folder); [] if there is none."""
        from stllm_core.data.rea import read_rea_json

        return read_rea_json(self.qa_path, on_error="raise") if self.qa_path else []


# ----------------------------------------------------------------------------------------------------------------------


def format_matrix(m: np.ndarray) -> str:
    """Rows of a matrix as text with full float64 round-trip precision."""
    return "\n".join(" ".join(repr(float(v)) for v in row) for row in np.asarray(m, dtype=np.float64)) + "\n"


def write_clip_folder(
    path: str | Path,
    frames: Sequence[Frame],
    scene: Scene | None = None,
    fps: float | None = None,
    qa_records: Sequence[Any] | None = None,
    *,
    scene_id: str = "",
    frame_ids: Sequence[int] | None = None,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    write_depth: bool | None = None,
    depth_scale: float = DEFAULT_DEPTH_SCALE,
    pointcloud_name: str | None = None,
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write frames (+ optional depth), poses, K, scene cloud, meta.json and qa.json as an EPIC-style clip folder.

    All frames must share one K and image size. Stamps come from the frames; `fps` defaults to the mean frame rate.
    `frame_ids` default to 0..N-1. `qa_records` are ReaRecord objects or REA dicts whose paths are relative to `path`.
    `write_depth` defaults to "every frame has depth". Returns the folder path.
    """
    from PIL import Image

    root = Path(path)
    if not frames:
        raise DataError(f"write_clip_folder({root}): no frames given.")
    if image_format not in ("jpg", "png"):
        raise DataError(f"write_clip_folder: image_format {image_format!r}; expected 'jpg' or 'png'.")
    if root.exists():
        if not overwrite and any(root.iterdir()):
            raise DataError(f"Clip folder {root} already exists and is not empty (pass overwrite=True).")
        if overwrite:
            shutil.rmtree(root)
    ids = list(range(len(frames))) if frame_ids is None else [int(i) for i in frame_ids]
    if len(ids) != len(frames) or sorted(set(ids)) != ids or (ids and ids[0] < 0):
        raise DataError(f"write_clip_folder: frame_ids must be {len(frames)} strictly increasing ids >= 0.")
    K = check_K(frames[0].K, "of frame 0")
    h, w = frames[0].image.shape[:2]
    stamps = np.asarray([f.stamp for f in frames], dtype=np.float64)
    if len(frames) > 1 and np.any(np.diff(stamps) <= 0):
        raise DataError("write_clip_folder: frame stamps must be strictly increasing.")
    if fps is None:
        fps = float((len(frames) - 1) / (stamps[-1] - stamps[0])) if len(frames) > 1 else DEFAULT_FPS
    if write_depth is None:
        write_depth = all(f.depth is not None for f in frames)

    (root / "frames").mkdir(parents=True)
    (root / "c2ws").mkdir()
    if write_depth:
        (root / "depth").mkdir()
    for k, (fid, f) in enumerate(zip(ids, frames)):
        if not np.allclose(f.K, K):
            raise DataError(f"write_clip_folder: frame {k} has a different K than frame 0.")
        if f.image.shape != (h, w, 3) or f.image.dtype != np.uint8:
            raise DataError(f"write_clip_folder: frame {k} image is {f.image.dtype} {f.image.shape}; "
                            f"expected uint8 {(h, w, 3)}.")
        check_pose(f.T_world_cam, f"of frame {k}")
        im = Image.fromarray(f.image)
        out = root / "frames" / frame_name(fid, image_format)
        if image_format == "jpg":
            im.save(out, quality=jpeg_quality)
        else:
            im.save(out, compress_level=1)
        (root / "c2ws" / f"{fid}.txt").write_text(format_matrix(f.T_world_cam))
        if write_depth:
            if f.depth is None:
                raise DataError(f"write_clip_folder: write_depth=True but frame {k} has no depth.")
            encode_depth_png(root / "depth" / frame_name(fid, "png"), f.depth, depth_scale)
    (root / "K.txt").write_text(format_matrix(K))

    meta: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "scene_id": scene_id or root.name, "fps": float(fps),
        "width": int(w), "height": int(h), "frame_ids": ids, "stamps": [float(s) for s in stamps],
        "depth_scale": float(depth_scale), "camera": "OpenCV optical (x right, y down, z forward)",
        "world_frame": scene.frame_id if scene is not None else "map",
    }
    if scene is not None and scene.num_points > 0:
        name = pointcloud_name or f"{scene_id or root.name}_vert.npy"
        write_pointcloud_npy(root / name, scene.points, scene.colors)
        meta["pointcloud"] = name
    meta.update(extra_meta or {})
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    if qa_records:
        from stllm_core.data.rea import write_rea_json

        write_rea_json(root / "qa.json", qa_records)
    return root
