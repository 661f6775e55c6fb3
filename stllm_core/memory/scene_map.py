"""SceneMap: a bounded voxel map of the environment in the world frame, with mean RGB and a hit count per voxel.

Storage: numpy arrays sorted by packed voxel key (see voxels.py): ``keys`` (N,) int64, ``colors`` (N, 3) float32 mean
RGB, ``hits`` (N,) int64 points seen, ``updated`` (N,) int64 the update tick (one tick per integrate call) that last
touched the voxel. 36 bytes per voxel: 500 000 voxels = 18 MB. With ``feature_dim = F > 0`` each voxel also keeps
``features`` (N, F) float32 (running mean of the features given with points or depth pixels) and ``feature_hits``.

Colour (and features): a running mean whose weight is capped at `max_color_weight` points, so a voxel whose surface
changes colour follows the change instead of averaging it away forever.

Memory bound and eviction rule: after an update that leaves more than `max_voxels` voxels, the least recently updated
voxels are evicted (oldest tick first; among equal ticks the fewest hits, then the lowest key) until
``max_voxels * (1 - evict_fraction)`` remain. Eviction in batches keeps the per-frame cost low; the map never holds
more than `max_voxels` voxels after a call returns.

Thread safety: every update and snapshot holds one lock; `snapshot()` copies the arrays under the lock, so a snapshot
is a consistent map state while updates continue.

Persistence: ``save("map.npz")`` / ``SceneMap.load("map.npz")`` round-trip exactly (keys, colours, hits, ticks,
config). ``save("map.ply")`` exports voxel centres + RGB as binary PLY (RViz / open3d / MeshLab), and
``SceneMap.load("map.ply")`` re-integrates such a file (one hit per point).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import threading
from dataclasses import asdict, dataclass

import numpy as np

from stllm_core.config import check, from_dict
from stllm_core.errors import DataError, InputError
from stllm_core.geometry.poses import check_rigid
from stllm_core.memory.voxels import depth_to_world_points, key_centers, voxel_keys
from stllm_core.types import Scene

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class SceneMapConfig:
    voxel_size: float = 0.06  # metres
    max_voxels: int = 500_000  # memory bound (36 bytes per voxel)
    evict_fraction: float = 0.1  # when over max_voxels, evict down to max_voxels * (1 - evict_fraction)
    min_range: float = 0.1  # depth closer than this (m) is ignored
    max_range: float = 5.0  # depth further than this (m) is ignored
    depth_stride: int = 1  # integrate every n-th depth pixel in rows and columns (1: callers pre-subsample)
    max_color_weight: int = 64  # colour running-mean weight cap (points)
    default_color: tuple[int, int, int] = (128, 128, 128)  # RGB of points that come without colour
    frame_id: str = "map"  # the world frame of the map
    feature_dim: int = 0  # optional per-voxel feature channels (float32 running mean); 0 = none

    def __post_init__(self):
        check(_finite_pos(self.voxel_size), "voxel_size", self.voxel_size, "a positive size in metres")
        check(_int_ge(self.max_voxels, 1), "max_voxels", self.max_voxels, "an int >= 1")
        check(
            isinstance(self.evict_fraction, (int, float)) and 0.0 <= self.evict_fraction < 1.0,
            "evict_fraction",
            self.evict_fraction,
            "a fraction in [0, 1)",
        )
        check(
            isinstance(self.min_range, (int, float)) and math.isfinite(self.min_range) and self.min_range >= 0,
            "min_range",
            self.min_range,
            "metres >= 0",
        )
        check(
            isinstance(self.max_range, (int, float)) and self.max_range > self.min_range,
            "max_range",
            self.max_range,
            f"metres > min_range ({self.min_range})",
        )
        check(_int_ge(self.depth_stride, 1), "depth_stride", self.depth_stride, "an int >= 1")
        check(_int_ge(self.max_color_weight, 1), "max_color_weight", self.max_color_weight, "an int >= 1")
        self.default_color = tuple(self.default_color)
        check(
            len(self.default_color) == 3 and all(_int_ge(c, 0) and c <= 255 for c in self.default_color),
            "default_color",
            self.default_color,
            "3 ints in 0..255",
        )
        check(isinstance(self.frame_id, str) and bool(self.frame_id), "frame_id", self.frame_id, "a frame id")
        check(_int_ge(self.feature_dim, 0), "feature_dim", self.feature_dim, "an int >= 0")


def _finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _int_ge(x, lo: int) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= lo


class SceneMap:
    """Voxel map in the world frame; see the module docstring for storage, eviction, snapshots and files.

    Example: a 0.06 m map that saw one red point at (1.0, 0.0, 0.5) m holds one voxel, indices (16, 0, 8), whose
    centre (0.99, 0.03, 0.51) is what ``snapshot().points`` returns.
    """

    def __init__(self, config: SceneMapConfig | None = None):
        self.config = config or SceneMapConfig()
        self._lock = threading.Lock()
        self._a = self._empty()  # per-voxel arrays, all in key order
        self._tick = 0
        self._stamp = 0.0
        self._counts: collections.Counter[str] = collections.Counter()

    def _empty(self) -> dict[str, np.ndarray]:
        a = {
            "keys": np.zeros(0, np.int64),
            "colors": np.zeros((0, 3), np.float32),
            "hits": np.zeros(0, np.int64),
            "updated": np.zeros(0, np.int64),
        }
        if self.config.feature_dim:
            a["features"] = np.zeros((0, self.config.feature_dim), np.float32)
            a["feature_hits"] = np.zeros(0, np.int64)
        return a

    # ------------------------------------------------------------------------------------------------ updates

    def integrate_depth(
        self,
        depth,
        K,
        T_world_cam,
        image=None,
        stamp: float | None = None,
        stride: int | None = None,
        features=None,
    ) -> int:
        """Add a depth image: (H, W) float32 metres along the optical axis (NaN/Inf/0 = none, counted and ignored),
        K (3, 3) pixels, T_world_cam (4, 4) world-from-camera (optical frame), optional (H, W, 3) uint8 RGB and
        (H, W, feature_dim) float features of the same pixels. Pixels outside [min_range, max_range] are ignored;
        every `stride`-th pixel (default config.depth_stride) is used. Returns the number of points integrated."""
        stride = self.config.depth_stride if stride is None else int(stride)
        try:
            depth = np.asarray(depth)
            if depth.ndim != 2 or depth.size == 0:
                raise InputError(f"depth must be an (H, W) image in metres; got shape {depth.shape}")
            K = np.asarray(K, dtype=np.float64)
            if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
                raise InputError(f"K must be a finite 3x3 with fx, fy > 0; got {K.tolist()}")
            T = check_rigid(T_world_cam, "T_world_cam")
            if image is not None:
                image = np.asarray(image)
                if image.shape != (*depth.shape, 3) or image.dtype != np.uint8:
                    raise InputError(
                        f"image must be (H, W, 3) uint8 matching depth {depth.shape}; got {image.shape} {image.dtype}"
                    )
            if features is not None:
                features = np.asarray(features)
                if features.shape != (*depth.shape, self.config.feature_dim) or not self.config.feature_dim:
                    raise InputError(
                        f"features must be (H, W, feature_dim={self.config.feature_dim}) matching depth "
                        f"{depth.shape}; got {features.shape}"
                    )
            if stride < 1:
                raise InputError(f"stride must be >= 1; got {stride}")
        except InputError:
            with self._lock:
                self._counts["bad_input"] += 1
            raise
        sub = np.asarray(depth, dtype=np.float32)[::stride, ::stride]
        n_invalid = int(sub.size - np.count_nonzero(np.isfinite(sub) & (sub > 0)))
        cfg = self.config
        xyz, v, u = depth_to_world_points(depth, K, T, stride, cfg.min_range, cfg.max_range, return_pixels=True)
        n_out = int(sub.size - n_invalid - len(xyz))
        rgb = image[::stride, ::stride][v, u] if image is not None else None
        feats = features[::stride, ::stride][v, u] if features is not None else None
        with self._lock:
            self._counts["depth_frames"] += 1
            self._counts["depth_invalid_pixels"] += n_invalid
            self._counts["depth_out_of_range_pixels"] += n_out
        return self.integrate_points(xyz, rgb, stamp=stamp, features=feats)

    def integrate_points(self, xyz, rgb=None, stamp: float | None = None, features=None) -> int:
        """Add (N, 3) world-frame points in metres with optional (N, 3) uint8 RGB (default_color otherwise) and
        optional (N, feature_dim) features. Non-finite points are counted (``nonfinite_points``) and skipped; rows of
        non-finite features count as points without features (``nonfinite_features``). Returns the points integrated."""
        xyz = np.asarray(xyz)
        try:
            if xyz.ndim != 2 or xyz.shape[1] != 3:
                raise InputError(f"points must be (N, 3) xyz in metres; got shape {xyz.shape}")
            if rgb is None:
                rgb = np.broadcast_to(np.asarray(self.config.default_color, np.uint8), xyz.shape)
            rgb = np.asarray(rgb)
            if rgb.shape != xyz.shape:
                raise InputError(f"colors must be (N, 3) RGB matching points {xyz.shape}; got {rgb.shape}")
            if features is not None:
                features = np.asarray(features, dtype=np.float64)
                if not self.config.feature_dim or features.shape != (len(xyz), self.config.feature_dim):
                    raise InputError(
                        f"features must be (N={len(xyz)}, feature_dim={self.config.feature_dim}); got {features.shape}"
                    )
        except InputError:
            with self._lock:
                self._counts["bad_input"] += 1
            raise
        finite = np.isfinite(xyz[:, 0]) & np.isfinite(xyz[:, 1]) & np.isfinite(xyz[:, 2])
        keys, ok = voxel_keys(xyz, self.config.voxel_size)
        rgb = rgb[ok].astype(np.float64)
        n_bad = int(np.count_nonzero(~finite))
        n_far = int(np.count_nonzero(finite & ~ok))
        sums = None
        if len(keys):
            uk, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            sums = {"keys": uk, "counts": counts, "colors": _group_sum(inverse, rgb, len(uk))}
            if self.config.feature_dim:
                f = features[ok] if features is not None else np.zeros((len(keys), self.config.feature_dim))
                has = np.isfinite(f).all(axis=1) & (features is not None)
                f[~has] = 0.0
                sums["features"] = _group_sum(inverse, f, len(uk))
                sums["feature_counts"] = np.bincount(inverse, weights=has, minlength=len(uk)).astype(np.int64)
                n_nonfinite_features = int(np.count_nonzero(~has)) if features is not None else 0
        with self._lock:
            self._tick += 1
            self._counts["integrations"] += 1
            self._counts["points_integrated"] += len(keys)
            if n_bad:
                self._counts["nonfinite_points"] += n_bad
            if n_far:
                self._counts["out_of_key_range_points"] += n_far
            if sums is not None and self.config.feature_dim and n_nonfinite_features:
                self._counts["nonfinite_features"] += n_nonfinite_features
            if stamp is not None and math.isfinite(stamp):
                self._stamp = max(self._stamp, float(stamp))
            if sums is not None:
                self._merge(sums)
                if len(self._a["keys"]) > self.config.max_voxels:
                    self._evict()
        return len(keys)

    def _merge(self, s: dict[str, np.ndarray]) -> None:
        a, uk, counts = self._a, s["keys"], s["counts"]
        pos = np.searchsorted(a["keys"], uk)
        found = np.zeros(len(uk), dtype=bool)
        inside = pos < len(a["keys"])
        found[inside] = a["keys"][pos[inside]] == uk[inside]
        cap = self.config.max_color_weight
        # existing voxels: capped-weight running means
        idx = pos[found]
        w = np.minimum(a["hits"][idx], cap).astype(np.float64)[:, None]
        n = counts[found].astype(np.float64)[:, None]
        a["colors"][idx] = ((a["colors"][idx] * w + s["colors"][found]) / (w + n)).astype(np.float32)
        a["hits"][idx] += counts[found]
        a["updated"][idx] = self._tick
        if "features" in a:
            w = np.minimum(a["feature_hits"][idx], cap).astype(np.float64)[:, None]
            n = s["feature_counts"][found].astype(np.float64)[:, None]
            upd = (n > 0)[:, 0]
            mean = (a["features"][idx] * w + s["features"][found]) / np.maximum(w + n, 1.0)
            a["features"][idx[upd]] = mean[upd].astype(np.float32)
            a["feature_hits"][idx] += s["feature_counts"][found]
        # new voxels, inserted in key order
        new = ~found
        if new.any():
            at, m = pos[new], int(new.sum())
            a["keys"] = np.insert(a["keys"], at, uk[new])
            a["colors"] = np.insert(a["colors"], at, (s["colors"][new] / counts[new][:, None]).astype(np.float32), 0)
            a["hits"] = np.insert(a["hits"], at, counts[new])
            a["updated"] = np.insert(a["updated"], at, np.full(m, self._tick, np.int64))
            if "features" in a:
                fc = s["feature_counts"][new]
                f = s["features"][new] / np.maximum(fc, 1)[:, None]
                a["features"] = np.insert(a["features"], at, f.astype(np.float32), 0)
                a["feature_hits"] = np.insert(a["feature_hits"], at, fc)

    def _evict(self) -> None:
        cfg, a = self.config, self._a
        keep_n = int(cfg.max_voxels * (1.0 - cfg.evict_fraction))
        n_evict = len(a["keys"]) - keep_n
        order = np.lexsort((a["keys"], a["hits"], a["updated"]))  # oldest tick, fewest hits, lowest key first
        keep = np.ones(len(a["keys"]), dtype=bool)
        keep[order[:n_evict]] = False
        self._a = {name: arr[keep] for name, arr in a.items()}
        self._counts["evicted_voxels"] += n_evict

    def clear(self) -> None:
        with self._lock:
            self._counts["cleared_voxels"] += len(self._a["keys"])
            self._a = self._empty()

    # ------------------------------------------------------------------------------------------------ queries

    def snapshot(self) -> Scene:
        """A consistent copy of the map as a Scene: voxel centres (N, 3) float32 metres in `frame_id`, mean RGB (N, 3)
        uint8, stamp = newest stamp integrated (0.0 when none was given). Later updates do not change it."""
        return self.snapshot_with_features()[0]

    def snapshot_with_features(self) -> tuple[Scene, np.ndarray]:
        """The snapshot plus the (N, feature_dim) float32 mean features of the same voxels ((N, 0) without features;
        zeros for voxels that never received features)."""
        with self._lock:
            keys, colors, stamp = self._a["keys"].copy(), self._a["colors"].copy(), self._stamp
            feats = self._a["features"].copy() if "features" in self._a else np.zeros((len(keys), 0), np.float32)
        points = key_centers(keys, self.config.voxel_size).astype(np.float32)
        rgb = np.clip(np.rint(colors), 0, 255).astype(np.uint8)
        return Scene(points=points, colors=rgb, frame_id=self.config.frame_id, stamp=stamp), feats

    def arrays(self) -> dict[str, np.ndarray]:
        """Copies of the raw per-voxel arrays (keys, colors, hits, updated[, features, feature_hits]), consistent."""
        with self._lock:
            return {name: arr.copy() for name, arr in self._a.items()}

    def __len__(self) -> int:
        with self._lock:
            return len(self._a["keys"])

    @property
    def nbytes(self) -> int:
        with self._lock:
            return int(sum(arr.nbytes for arr in self._a.values()))

    @property
    def bytes_per_voxel(self) -> int:
        """36 bytes, plus 4 per feature channel and 8 for the feature count when feature_dim > 0."""
        return 36 + (4 * self.config.feature_dim + 8 if self.config.feature_dim else 0)

    def stats(self) -> dict:
        """Size against the bound, and counters by cause (plain Python types)."""
        with self._lock:
            n = len(self._a["keys"])
            return {
                "voxels": n,
                "max_voxels": self.config.max_voxels,
                "fill": n / self.config.max_voxels,
                "bytes": int(sum(arr.nbytes for arr in self._a.values())),
                "max_bytes": self.config.max_voxels * self.bytes_per_voxel,
                "voxel_size": self.config.voxel_size,
                "stamp": self._stamp,
                "counts": dict(self._counts),
            }

    # -------------------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> None:
        """Write the map: ``.npz`` (exact, reloadable state) or ``.ply`` (binary PLY of voxel centres + RGB).
        Written to a temporary file and renamed, so a crash never leaves a half-written map."""
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".npz", ".ply"):
            raise InputError(f"map file must end in .npz or .ply; got {path!r}")
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                if ext == ".npz":
                    with self._lock:
                        arrays = dict(self._a)
                        arrays["tick"] = np.array(self._tick, np.int64)
                        arrays["stamp"] = np.array(self._stamp, np.float64)
                        meta = {"format": "stllm-scene-map", "version": FORMAT_VERSION, "config": asdict(self.config)}
                        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
                else:
                    scene = self.snapshot()
                    _write_ply(f, scene.points, scene.colors)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        logger.info("scene map saved to %s (%d voxels)", path, len(self))

    @classmethod
    def load(cls, path: str | os.PathLike, config: SceneMapConfig | None = None) -> SceneMap:
        """Read a map written by `save`. ``.npz`` restores the exact state with its saved config (a `config` given
        here may change bounds and ranges but not the voxel size or feature_dim). ``.ply`` re-integrates its points
        into a new map with `config`. Raises DataError naming the file and what is wrong."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"no map file at {path!r}")
        if path.lower().endswith(".ply"):
            xyz, rgb = _read_ply(path)
            m = cls(config)
            m.integrate_points(xyz, rgb)
            return m
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != "stllm-scene-map" or meta.get("version") != FORMAT_VERSION:
                    raise DataError(
                        f"{path!r} has format {meta.get('format')!r} v{meta.get('version')!r}; expected "
                        f"'stllm-scene-map' v{FORMAT_VERSION}"
                    )
                saved = from_dict(SceneMapConfig, meta["config"], where=path)
                m = cls(saved)
                names = list(m._a)
                arrays = {k: z[k] for k in [*names, "tick", "stamp"]}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise DataError(f"{path!r} is not a scene map .npz file: {type(e).__name__}: {e}") from None
        if config is not None and (config.voxel_size, config.feature_dim) != (saved.voxel_size, saved.feature_dim):
            raise DataError(
                f"{path!r} has voxel_size {saved.voxel_size}, feature_dim {saved.feature_dim} but the config asks for "
                f"{config.voxel_size}, {config.feature_dim}"
            )
        n = len(arrays["keys"])
        for name in names:
            want, got = m._a[name], arrays[name]
            if got.dtype != want.dtype or got.shape != (n, *want.shape[1:]):
                raise DataError(
                    f"{path!r}: array {name!r} is {got.shape} {got.dtype}; expected {(n, *want.shape[1:])} {want.dtype}"
                )
        if not bool(np.all(np.diff(arrays["keys"]) > 0)):
            raise DataError(f"{path!r}: voxel keys are not strictly increasing (corrupt map)")
        if config is not None:
            m.config = config
        m._a = {name: arrays[name] for name in names}
        m._tick, m._stamp = int(arrays["tick"]), float(arrays["stamp"])
        if len(m._a["keys"]) > m.config.max_voxels:
            m._evict()
        return m


def _group_sum(inverse: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per-group column sums: out[g] = sum of values[i] with inverse[i] == g; (N, C) -> (n, C) float64."""
    return np.stack([np.bincount(inverse, weights=values[:, c], minlength=n) for c in range(values.shape[1])], axis=1)


# ------------------------------------------------------------------------------------------------ PLY helpers

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2", "ushort": "u2",
    "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4",
    "double": "f8", "float64": "f8",
}  # fmt: skip


def _write_ply(f, points: np.ndarray, colors: np.ndarray) -> None:
    """Binary little-endian PLY: vertex x, y, z float32 and red, green, blue uchar."""
    n = len(points)
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment stllm scene map (voxel centres, metres)\n"
        f"element vertex {n}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    rec = np.empty(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    rec["x"], rec["y"], rec["z"] = points[:, 0], points[:, 1], points[:, 2]
    rec["r"], rec["g"], rec["b"] = colors[:, 0], colors[:, 1], colors[:, 2]
    f.write(header.encode("ascii"))
    f.write(rec.tobytes())


def _read_ply(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Vertices (x, y, z and optional red/green/blue) of an ascii or binary little-endian PLY with only scalar
    vertex properties before any other element. Raises DataError naming the file and the problem."""
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise DataError(f"{path!r} is not a PLY file (no 'ply' magic)")
        fmt, n, props, in_vertex = None, None, [], False
        while True:
            line = f.readline()
            if not line:
                raise DataError(f"{path!r}: PLY header has no end_header")
            words = line.decode("ascii", "replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                in_vertex = words[1] == "vertex"
                if in_vertex:
                    n = int(words[2])
                elif n is None:
                    raise DataError(f"{path!r}: element {words[1]!r} comes before the vertices (unsupported)")
            elif words[0] == "property" and in_vertex:
                if words[1] == "list" or words[1] not in _PLY_TYPES:
                    raise DataError(f"{path!r}: unsupported vertex property {' '.join(words[1:])!r}")
                props.append((words[2], _PLY_TYPES[words[1]]))
        names = [p for p, _ in props]
        if n is None or not {"x", "y", "z"} <= set(names):
            raise DataError(f"{path!r}: PLY has no vertex element with x, y, z (properties: {names})")
        if fmt == "binary_little_endian":
            dtype = np.dtype([(p, "<" + t) for p, t in props])
            data = np.frombuffer(f.read(n * dtype.itemsize), dtype=dtype)
        elif fmt == "ascii":
            rows = np.loadtxt(f, max_rows=n, ndmin=2)
            data = {p: rows[:, i] for i, p in enumerate(names)}
        else:
            raise DataError(f"{path!r}: PLY format {fmt!r} is not supported (ascii or binary_little_endian)")
    if len(data["x"]) != n:
        raise DataError(f"{path!r}: PLY is truncated ({len(data['x'])} of {n} vertices)")
    xyz = np.stack([data["x"], data["y"], data["z"]], axis=1).astype(np.float64)
    rgb = None
    if {"red", "green", "blue"} <= set(names):
        rgb = np.stack([data["red"], data["green"], data["blue"]], axis=1).astype(np.uint8)
    return xyz, rgb
