"""TransformBuffer: a tf2-like tree of static and time-stamped transforms, queried between any two frames at a time.

Each frame has at most one parent. An edge stores ``T_parent_child`` (maps child coordinates into the parent frame),
either static (valid at every time) or as a history of stamped samples. ``lookup(target, source, stamp)`` walks both
frames up to their closest common ancestor and returns ``T_target_source`` (4x4 float64, p_target = T @ p_source).

Rules (documented behaviour, tested):
- Between two samples a dynamic edge is interpolated: translation linearly, rotation by slerp (numpy, equal to
  scipy's Slerp; scipy's costs ~1 ms per call here).
- A stamp outside an edge's history is served by the nearest sample when it is within `tolerance` seconds of it;
  further out it raises ExtrapolationError naming the edge, the stamp and the available range. Nothing extrapolates.
- Samples older than `cache_sec` behind the newest sample of their edge are forgotten (the cache horizon).
- Samples may arrive out of order (inserted in place); a second sample at the same stamp replaces the first.
- A child that changes parent: the latest parent wins, the child's old history is dropped (it was relative to the
  old parent), the change is counted under ``parent_change`` and logged once per child.
- An edge that would close a cycle is refused (InputError). Invalid input (NaN, non-unit quaternion, empty frame id)
  raises InputError and is counted by cause; the buffer is unchanged.
- Thread-safe (one lock); lookups never see half-inserted samples.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from stllm_core.errors import InputError, STLLMError
from stllm_core.geometry.poses import (
    invert,
    make_transform,
    slerp_quaternion,
    unit_quat_to_matrix,
    validate_quaternion,
    validate_translation,
)

logger = logging.getLogger(__name__)


class TransformLookupError(STLLMError, LookupError):
    """A transform could not be computed (base class of the three lookup failures)."""


class UnknownFrameError(TransformLookupError):
    """A frame id that no transform has mentioned."""


class DisconnectedError(TransformLookupError):
    """Both frames are known but lie in different trees (no common ancestor)."""


class ExtrapolationError(TransformLookupError):
    """The requested stamp is outside an edge's history by more than the tolerance."""


@dataclass
class _Edge:
    parent: str
    static_T: np.ndarray | None = None  # (4, 4) when static
    stamps: list[float] = field(default_factory=list)  # sorted, seconds
    translations: list[np.ndarray] = field(default_factory=list)  # (3,)
    rotations: list[np.ndarray] = field(default_factory=list)  # (3, 3)
    quaternions: list[np.ndarray] = field(default_factory=list)  # (4,) unit x, y, z, w, same rotations

    @property
    def static(self) -> bool:
        return self.static_T is not None


class TransformBuffer:
    """Static and dynamic transforms with interpolated lookup between any two connected frames.

    Example (map -> odom static offset, odom -> base moving along x at 1 m/s):

    >>> buf = TransformBuffer(cache_sec=10.0)
    >>> buf.set_transform("map", "odom", 0.0, [1, 0, 0], [0, 0, 0, 1], static=True)
    >>> buf.set_transform("odom", "base", 0.0, [0, 0, 0], [0, 0, 0, 1])
    >>> buf.set_transform("odom", "base", 2.0, [2, 0, 0], [0, 0, 0, 1])
    >>> buf.lookup("map", "base", 1.0)[:3, 3].tolist()
    [2.0, 0.0, 0.0]
    """

    def __init__(self, cache_sec: float = 10.0):
        if not (isinstance(cache_sec, (int, float)) and math.isfinite(cache_sec) and cache_sec > 0):
            raise InputError(f"cache_sec must be a positive finite number of seconds; got {cache_sec!r}")
        self.cache_sec = float(cache_sec)
        self._edges: dict[str, _Edge] = {}
        self._lock = threading.RLock()
        self._counters: collections.Counter[str] = collections.Counter()
        self._warned: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------------------------------------ insert

    def set_transform(
        self,
        parent: str,
        child: str,
        stamp: float,
        translation,
        quaternion_xyzw,
        static: bool = False,
    ) -> None:
        """Insert ``T_parent_child`` at `stamp` (seconds); `translation` in metres, quaternion (x, y, z, w).

        Raises InputError (and counts the cause) for empty/equal frame ids, a non-finite stamp or translation, a NaN
        or non-normalised quaternion, or an edge that would close a cycle.
        """
        try:
            parent, child = self._check_ids(parent, child)
            if not (isinstance(stamp, (int, float, np.floating, np.integer)) and math.isfinite(float(stamp))):
                raise _Bad("bad_stamp", f"stamp of {parent} -> {child} must be finite seconds; got {stamp!r}")
            try:
                q = validate_quaternion(quaternion_xyzw, f"quaternion of {parent} -> {child}")
            except InputError as e:
                raise _Bad("bad_quaternion", str(e)) from None
            try:
                t = validate_translation(translation, f"translation of {parent} -> {child}")
            except InputError as e:
                raise _Bad("bad_translation", str(e)) from None
        except _Bad as e:
            with self._lock:
                self._counters[e.cause] += 1
            raise InputError(e.message) from None
        T = make_transform(t, q)
        with self._lock:
            self._insert(parent, child, float(stamp), T, q, static)

    def _check_ids(self, parent, child) -> tuple[str, str]:
        for name, value in (("parent", parent), ("child", child)):
            if not isinstance(value, str) or not value.strip("/"):
                raise _Bad("bad_frame_id", f"{name} frame id must be a non-empty string; got {value!r}")
        parent, child = parent.strip("/"), child.strip("/")
        if parent == child:
            raise _Bad("bad_frame_id", f"a frame cannot be its own parent: {child!r}")
        return parent, child

    def _insert(self, parent: str, child: str, stamp: float, T: np.ndarray, q: np.ndarray, static: bool) -> None:
        edge = self._edges.get(child)
        if edge is None or edge.parent != parent:
            # would `parent` become a descendant of `child`? walk up from parent
            frame, seen = parent, set()
            while frame in self._edges and frame not in seen:
                seen.add(frame)
                frame = self._edges[frame].parent
                if frame == child:
                    self._counters["cycle"] += 1
                    raise InputError(
                        f"transform {parent} -> {child} would create a cycle ({child!r} is above {parent!r})"
                    )
            if edge is not None:
                self._counters["parent_change"] += 1
                self._warn_once(
                    "parent_change",
                    child,
                    f"frame {child!r} changed parent from {edge.parent!r} to {parent!r}; the latest parent wins and "
                    f"the history relative to {edge.parent!r} is dropped",
                )
            edge = self._edges[child] = _Edge(parent)
        if static:
            if edge.stamps:
                self._counters["dynamic_to_static"] += 1
                self._warn_once("dynamic_to_static", child, f"dynamic transform {parent} -> {child} became static")
                edge.stamps, edge.translations, edge.rotations, edge.quaternions = [], [], [], []
            edge.static_T = T
            self._counters["static_set"] += 1
            return
        if edge.static:
            self._counters["static_to_dynamic"] += 1
            self._warn_once("static_to_dynamic", child, f"static transform {parent} -> {child} became dynamic")
            edge.static_T = None
        if edge.stamps and stamp < edge.stamps[-1] - self.cache_sec:
            self._counters["older_than_cache"] += 1  # would be pruned at once
            return
        i = bisect.bisect_left(edge.stamps, stamp)
        if i < len(edge.stamps) and edge.stamps[i] == stamp:
            edge.translations[i], edge.rotations[i], edge.quaternions[i] = T[:3, 3].copy(), T[:3, :3].copy(), q
            self._counters["duplicate_replaced"] += 1
        else:
            if i < len(edge.stamps):
                self._counters["out_of_order"] += 1
            edge.stamps.insert(i, stamp)
            edge.translations.insert(i, T[:3, 3].copy())
            edge.rotations.insert(i, T[:3, :3].copy())
            edge.quaternions.insert(i, q)
        self._counters["dynamic_set"] += 1
        # cache horizon: drop samples older than newest - cache_sec (the list is sorted, so a prefix)
        cut = bisect.bisect_left(edge.stamps, edge.stamps[-1] - self.cache_sec)
        if cut:
            del edge.stamps[:cut], edge.translations[:cut], edge.rotations[:cut], edge.quaternions[:cut]

    def _warn_once(self, cause: str, frame: str, message: str) -> None:
        if (cause, frame) not in self._warned:
            self._warned.add((cause, frame))
            logger.warning("%s (logged once per frame)", message)

    # ------------------------------------------------------------------------------------------------ lookup

    def lookup(self, target: str, source: str, stamp: float | None = None, tolerance: float = 0.1) -> np.ndarray:
        """``T_target_source`` (4x4 float64) at `stamp` seconds: maps points in `source` into `target`.

        `stamp=None` means the latest time every dynamic edge on the path has data for (as tf2's time 0).
        A stamp outside an edge's samples is served by the nearest sample when within `tolerance` seconds,
        else ExtrapolationError. Unknown frames raise UnknownFrameError; unconnected trees DisconnectedError.
        """
        target, source = str(target).strip("/"), str(source).strip("/")
        with self._lock:
            try:
                up_source = self._chain(source)
                up_target = self._chain(target)
            except UnknownFrameError:
                self._counters["lookup_unknown_frame"] += 1
                raise
            # closest common ancestor
            target_frames = [f for f, _ in up_target] + [self._root(target, up_target)]
            source_frames = [f for f, _ in up_source] + [self._root(source, up_source)]
            common = next((f for f in source_frames if f in set(target_frames)), None)
            if common is None:
                self._counters["lookup_disconnected"] += 1
                raise DisconnectedError(
                    f"cannot transform {source!r} into {target!r}: they are in different trees (roots "
                    f"{source_frames[-1]!r} and {target_frames[-1]!r}); known frames: {', '.join(self.frames())}"
                )
            edges = [e for f, e in up_source[: source_frames.index(common)]]
            edges += [e for f, e in up_target[: target_frames.index(common)]]
            if stamp is None:
                stamp = self._latest_common(edges)
            try:
                T_common_source = self._accumulate(source, up_source[: source_frames.index(common)], stamp, tolerance)
                T_common_target = self._accumulate(target, up_target[: target_frames.index(common)], stamp, tolerance)
            except ExtrapolationError:
                self._counters["lookup_extrapolation"] += 1
                raise
        return invert(T_common_target) @ T_common_source

    def can_transform(self, target: str, source: str, stamp: float | None = None, tolerance: float = 0.1) -> bool:
        """True when lookup(target, source, stamp, tolerance) would succeed (does not count failures)."""
        with self._lock:
            saved = self._counters.copy()
            try:
                self.lookup(target, source, stamp, tolerance)
                return True
            except TransformLookupError:
                return False
            finally:
                self._counters = saved

    def _chain(self, frame: str) -> list[tuple[str, _Edge]]:
        """[(frame, edge to its parent), (parent, edge to grandparent), ...] up to the root."""
        if frame not in self._edges and not any(e.parent == frame for e in self._edges.values()):
            raise UnknownFrameError(
                f"unknown frame {frame!r}; known frames: {', '.join(self.frames()) or '(none: no transform received)'}"
            )
        out = []
        while frame in self._edges:
            edge = self._edges[frame]
            out.append((frame, edge))
            frame = edge.parent
        return out

    @staticmethod
    def _root(start: str, chain: list[tuple[str, _Edge]]) -> str:
        return chain[-1][1].parent if chain else start

    @staticmethod
    def _latest_common(edges: list[_Edge]) -> float:
        latest = [e.stamps[-1] for e in edges if not e.static and e.stamps]
        return min(latest) if latest else 0.0

    def _accumulate(self, start: str, chain: list[tuple[str, _Edge]], stamp: float, tol: float) -> np.ndarray:
        """T_ancestor_start for the ancestor at the end of `chain`."""
        T = np.eye(4)
        for child, edge in chain:
            T = self._edge_at(child, edge, stamp, tol) @ T
        return T

    @staticmethod
    def _edge_at(child: str, edge: _Edge, stamp: float, tol: float) -> np.ndarray:
        if edge.static_T is not None:
            return edge.static_T
        stamps = edge.stamps
        if not stamps:
            raise ExtrapolationError(f"no samples of {edge.parent} -> {child} in the cache")
        T = np.eye(4)
        if stamp <= stamps[0] or stamp >= stamps[-1]:
            i = 0 if stamp <= stamps[0] else len(stamps) - 1
            gap = abs(stamp - stamps[i])
            if gap > tol:
                when = "before the first" if i == 0 else "after the last"
                raise ExtrapolationError(
                    f"lookup of {edge.parent} -> {child} at {stamp:.6f} s would extrapolate {gap:.6f} s {when} sample "
                    f"(samples cover {stamps[0]:.6f} .. {stamps[-1]:.6f} s; tolerance {tol:g} s)"
                )
            T[:3, :3], T[:3, 3] = edge.rotations[i], edge.translations[i]
            return T
        i = bisect.bisect_right(stamps, stamp)  # stamps[i-1] <= stamp < stamps[i]
        t0, t1 = stamps[i - 1], stamps[i]
        a = (stamp - t0) / (t1 - t0)
        T[:3, 3] = (1.0 - a) * edge.translations[i - 1] + a * edge.translations[i]
        T[:3, :3] = unit_quat_to_matrix(slerp_quaternion(edge.quaternions[i - 1], edge.quaternions[i], a))
        return T

    # ------------------------------------------------------------------------------------------ introspection

    def frames(self) -> list[str]:
        """Every frame id mentioned so far (children and parents), sorted."""
        with self._lock:
            return sorted(set(self._edges) | {e.parent for e in self._edges.values()})

    def parent(self, frame: str) -> str | None:
        """The parent of `frame`, or None for a root / unknown frame."""
        with self._lock:
            edge = self._edges.get(frame)
            return edge.parent if edge else None

    def is_static(self, frame: str) -> bool:
        with self._lock:
            edge = self._edges.get(frame)
            return bool(edge and edge.static)

    def time_range(self, frame: str) -> tuple[float, float] | None:
        """(oldest, newest) stamp of the dynamic edge above `frame`; None when static, a root, or unknown."""
        with self._lock:
            edge = self._edges.get(frame)
            if edge is None or edge.static or not edge.stamps:
                return None
            return edge.stamps[0], edge.stamps[-1]

    def counters(self) -> dict[str, int]:
        """Counts by cause: static_set, dynamic_set, duplicate_replaced, out_of_order, older_than_cache,
        parent_change, cycle, bad_quaternion, bad_translation, bad_stamp, bad_frame_id, lookup_* failures."""
        with self._lock:
            return dict(self._counters)

    def stats(self) -> dict:
        """Diagnostics: number of frames, static/dynamic edges, samples held, newest stamp, counters."""
        with self._lock:
            dynamic = [e for e in self._edges.values() if not e.static]
            newest = max((e.stamps[-1] for e in dynamic if e.stamps), default=None)
            return {
                "frames": len(self.frames()),
                "static_edges": len(self._edges) - len(dynamic),
                "dynamic_edges": len(dynamic),
                "samples": sum(len(e.stamps) for e in dynamic),
                "newest_stamp": newest,
                "counters": dict(self._counters),
            }

    def clear(self) -> None:
        """Forget every dynamic sample (keeps static transforms), e.g. after a clock jump back (bag loop)."""
        with self._lock:
            for child in [c for c, e in self._edges.items() if not e.static]:
                del self._edges[child]


class _Bad(Exception):
    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause, self.message = cause, message
