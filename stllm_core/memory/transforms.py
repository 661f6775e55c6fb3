"""TransformBuffer: a tf2-like tree of static and time-stamped transforms, queried between any two frames at a time.

Each child frame has one transform cache, as in tf2's BufferCore: either static (one sample, valid at every time; a
new one replaces it, as tf2's StaticCache) or a history of stamped samples (tf2's TimeCache). A sample stores
``T_parent_child`` (maps child coordinates into the parent frame) AND its parent frame id, so the tree can change over
time. ``lookup(target, source, stamp)`` walks both frames up to their closest common ancestor, taking at each frame the
parent valid at `stamp`, and returns ``T_target_source`` (4x4 float64, p_target = T @ p_source).

Rules (documented behaviour, tested; they follow tf2::BufferCore / tf2::TimeCache):
- Between two samples with the same parent a dynamic transform is interpolated: translation linearly, rotation by
  slerp (numpy, equal to scipy's Slerp; scipy's costs ~1 ms per call here). Between two samples with different
  parents nothing is interpolated: the earlier sample (its parent and its transform) is used, as tf2 does.
- A stamp outside a cache's history is served by the nearest sample when it is within `tolerance` seconds of it;
  further out it raises ExtrapolationError naming the transform, the stamp and the available range. Nothing
  extrapolates.
- Stamp 0 (0.0 s, what rclpy ``Time()`` and an unset ``builtin_interfaces/Time`` convert to) and None both mean
  "latest": the latest time every dynamic transform on the path (found through the latest parents) has data for, as
  tf2's time 0 (getLatestCommonTime). A sample stamped 0 is stored at 0.0 like any other (a lookup reaches it as
  "latest" or within the tolerance of a later stamp).
- Samples older than `cache_sec` behind the newest sample of their cache are forgotten (the cache horizon); a sample
  that old on arrival is ignored and counted (``older_than_cache``, tf2's TF_OLD_DATA).
- Samples may arrive out of order (inserted in place, counted as ``out_of_order``); a second sample at the same stamp
  replaces the first (parent included).
- A frame that changes parent keeps its history: each sample keeps its own parent, so a lookup at a stamp before the
  change still goes through the old parent. A sample whose parent differs from that of the sample before it is
  counted under ``parent_change`` and logged once per frame. `parent(frame)` is the latest parent,
  `parent(frame, stamp)` the one valid at `stamp`.
- A transform whose parent lies below the child in the current tree (latest parents) is refused as a cycle
  (InputError). A loop through older parents (possible after re-parenting) makes the lookups that meet it raise
  TransformLookupError. Invalid input (NaN, non-unit quaternion per poses.validate_quaternion, empty frame id) raises
  InputError and is counted by cause; the buffer is unchanged.
- Switching a frame between static and dynamic drops its old samples (tf2 allocates a new cache), counted.
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
class _Cache:
    """The transforms above one child frame: one static sample, or stamped samples each with its parent."""

    static_parent: str | None = None
    static_T: np.ndarray | None = None  # (4, 4) when static
    stamps: list[float] = field(default_factory=list)  # sorted, seconds
    parents: list[str] = field(default_factory=list)  # parent frame of each sample (tf2 TransformStorage.frame_id_)
    translations: list[np.ndarray] = field(default_factory=list)  # (3,)
    rotations: list[np.ndarray] = field(default_factory=list)  # (3, 3)
    quaternions: list[np.ndarray] = field(default_factory=list)  # (4,) unit x, y, z, w, same rotations

    @property
    def static(self) -> bool:
        return self.static_T is not None

    @property
    def parent(self) -> str:
        """The latest parent (of the static sample, or of the newest stamped one)."""
        return self.static_parent if self.static_T is not None else self.parents[-1]

    def parent_at(self, stamp: float) -> str:
        """The parent valid at `stamp`: that of the last sample at or before it (tf2 TimeCache::getParent); the
        first sample's before the history, the newest one's after it."""
        if self.static_T is not None:
            return self.static_parent
        return self.parents[max(bisect.bisect_right(self.stamps, stamp) - 1, 0)]


class TransformBuffer:
    """Static and dynamic transforms with interpolated lookup between any two connected frames.

    Example (map -> odom static offset, odom -> base moving along x at 1 m/s):

    >>> buf = TransformBuffer(cache_sec=10.0)
    >>> buf.set_transform("map", "odom", 0.0, [1, 0, 0], [0, 0, 0, 1], static=True)
    >>> buf.set_transform("odom", "base", 0.0, [0, 0, 0], [0, 0, 0, 1])
    >>> buf.set_transform("odom", "base", 2.0, [2, 0, 0], [0, 0, 0, 1])
    >>> buf.lookup("map", "base", 1.0)[:3, 3].tolist()
    [2.0, 0.0, 0.0]
    >>> buf.lookup("map", "base", 0)[:3, 3].tolist()  # stamp 0 (or None) = latest: t = 2
    [3.0, 0.0, 0.0]
    """

    def __init__(self, cache_sec: float = 10.0):
        if not (isinstance(cache_sec, (int, float)) and math.isfinite(cache_sec) and cache_sec > 0):
            raise InputError(f"cache_sec must be a positive finite number of seconds; got {cache_sec!r}")
        self.cache_sec = float(cache_sec)
        self._caches: dict[str, _Cache] = {}  # child frame -> its transforms
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
        or non-normalised quaternion (poses.validate_quaternion: tf2's |q|^2 rule), or an edge that would close a
        cycle. A dynamic sample older than the cache horizon is ignored and counted (``older_than_cache``).
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
        cache = self._caches.get(child)
        if not static and cache is not None and not cache.static and stamp < cache.stamps[-1] - self.cache_sec:
            self._counters["older_than_cache"] += 1  # would be pruned at once (tf2: TF_OLD_DATA)
            return
        old_parent = cache.parent if cache is not None else None
        if parent != old_parent:
            self._check_cycle(parent, child)
        if cache is not None and cache.static != static:  # a new kind of cache, as tf2's allocateFrame
            cause = "dynamic_to_static" if static else "static_to_dynamic"
            self._counters[cause] += 1
            was, now = ("dynamic", "static") if static else ("static", "dynamic")
            self._warn_once(cause, child, f"{was} transform {old_parent} -> {child} became {now} ({parent} -> {child})")
            cache = None
        if cache is None:
            cache = self._caches[child] = _Cache()
        if static:  # one sample, the latest wins (tf2 StaticCache)
            cache.static_parent, cache.static_T = parent, T
            self._counters["static_set"] += 1
            if old_parent is not None and old_parent != parent:
                self._parent_changed(child, old_parent, parent, stamp)
            return
        i = bisect.bisect_left(cache.stamps, stamp)
        replace = i < len(cache.stamps) and cache.stamps[i] == stamp
        # the parent this frame had around `stamp` before this sample: the sample before it, else the one after
        after = i + 1 if replace else i
        if i > 0:
            before = cache.parents[i - 1]
        else:
            before = cache.parents[after] if after < len(cache.parents) else old_parent
        if replace:
            cache.parents[i] = parent
            cache.translations[i], cache.rotations[i], cache.quaternions[i] = T[:3, 3].copy(), T[:3, :3].copy(), q
            self._counters["duplicate_replaced"] += 1
        else:
            if i < len(cache.stamps):
                self._counters["out_of_order"] += 1
            cache.stamps.insert(i, stamp)
            cache.parents.insert(i, parent)
            cache.translations.insert(i, T[:3, 3].copy())
            cache.rotations.insert(i, T[:3, :3].copy())
            cache.quaternions.insert(i, q)
        self._counters["dynamic_set"] += 1
        if before is not None and before != parent:
            self._parent_changed(child, before, parent, stamp)
        # cache horizon: drop samples older than newest - cache_sec (the list is sorted, so a prefix)
        cut = bisect.bisect_left(cache.stamps, cache.stamps[-1] - self.cache_sec)
        if cut:
            del cache.stamps[:cut], cache.parents[:cut], cache.translations[:cut]
            del cache.rotations[:cut], cache.quaternions[:cut]

    def _check_cycle(self, parent: str, child: str) -> None:
        """Refuse `parent` -> `child` when `parent` is below `child` in the current tree (latest parents)."""
        frame, seen = parent, set()
        while frame in self._caches and frame not in seen:
            seen.add(frame)
            frame = self._caches[frame].parent
            if frame == child:
                self._counters["cycle"] += 1
                raise InputError(f"transform {parent} -> {child} would create a cycle ({child!r} is above {parent!r})")

    def _parent_changed(self, child: str, old: str, new: str, stamp: float) -> None:
        self._counters["parent_change"] += 1
        self._warn_once(
            "parent_change",
            child,
            f"frame {child!r} changed parent from {old!r} to {new!r} at {stamp:.6f} s; lookups use the parent valid at "
            f"their stamp (samples with different parents are not interpolated)",
        )

    def _warn_once(self, cause: str, frame: str, message: str) -> None:
        if (cause, frame) not in self._warned:
            self._warned.add((cause, frame))
            logger.warning("%s (logged once per frame)", message)

    # ------------------------------------------------------------------------------------------------ lookup

    def lookup(self, target: str, source: str, stamp: float | None = None, tolerance: float = 0.1) -> np.ndarray:
        """``T_target_source`` (4x4 float64) at `stamp` seconds: maps points in `source` into `target`.

        `stamp` None or 0 (0.0 s: rclpy ``Time()``, an unset header stamp) means "latest", as tf2's time 0: the
        latest time every dynamic transform on the path (through the latest parents) has data for. Each frame on
        the way up uses the parent valid at that stamp. A stamp outside a cache's samples is served by the nearest
        sample when within `tolerance` seconds, else ExtrapolationError. Unknown frames raise UnknownFrameError;
        unconnected trees DisconnectedError; a loop through older parents TransformLookupError.
        """
        target, source = str(target).strip("/"), str(source).strip("/")
        with self._lock:
            if stamp is None or stamp == 0:
                stamp = self._latest_common_time(target, source)
            source_up, target_up = self._path(target, source, float(stamp))
            try:
                T_common_source = self._accumulate(source_up, float(stamp), tolerance)
                T_common_target = self._accumulate(target_up, float(stamp), tolerance)
            except ExtrapolationError:
                self._counters["lookup_extrapolation"] += 1
                raise
        return invert(T_common_target) @ T_common_source

    def can_transform(self, target: str, source: str, stamp: float | None = None, tolerance: float = 0.1) -> bool:
        """True when lookup(target, source, stamp, tolerance) would succeed (stamp None or 0 = latest; does not count
        failures)."""
        with self._lock:
            saved = self._counters.copy()
            try:
                self.lookup(target, source, stamp, tolerance)
                return True
            except TransformLookupError:
                return False
            finally:
                self._counters = saved

    def latest_common_time(self, target: str, source: str) -> float:
        """The stamp a "latest" lookup (stamp None or 0) of `source` in `target` uses: the oldest of the newest samples
        of the dynamic transforms on the path through the latest parents (0.0 when the path is static)."""
        with self._lock:
            return self._latest_common_time(str(target).strip("/"), str(source).strip("/"))

    def _latest_common_time(self, target: str, source: str) -> float:
        source_up, target_up = self._path(target, source, None)
        latest = [c.stamps[-1] for _, c, _ in source_up + target_up if not c.static]
        return min(latest) if latest else 0.0

    def _path(self, target: str, source: str, stamp: float | None):
        """The chains from `source` and from `target` up to (not including) their closest common ancestor at
        `stamp` (None: through the latest parents); counts and raises the lookup failures other than extrapolation."""
        try:
            up_source = self._chain(source, stamp)
            up_target = self._chain(target, stamp)
        except UnknownFrameError:
            self._counters["lookup_unknown_frame"] += 1
            raise
        except TransformLookupError:
            self._counters["lookup_loop"] += 1
            raise
        target_frames = [target] + [p for _, _, p in up_target]
        source_frames = [source] + [p for _, _, p in up_source]
        in_target = set(target_frames)
        common = next((f for f in source_frames if f in in_target), None)
        if common is None:
            self._counters["lookup_disconnected"] += 1
            when = "" if stamp is None else f" at {stamp:.6f} s"
            raise DisconnectedError(
                f"cannot transform {source!r} into {target!r}{when}: they are in different trees (roots "
                f"{source_frames[-1]!r} and {target_frames[-1]!r}); known frames: {', '.join(self._frames())}"
            )
        return up_source[: source_frames.index(common)], up_target[: target_frames.index(common)]

    def _chain(self, frame: str, stamp: float | None) -> list[tuple[str, _Cache, str]]:
        """[(frame, its cache, its parent at `stamp`), (parent, ...), ...] up to the root; None = latest parents."""
        if not self._known(frame):
            raise UnknownFrameError(
                f"unknown frame {frame!r}; known frames: {', '.join(self._frames()) or '(none: no transform received)'}"
            )
        out, seen = [], [frame]
        while frame in self._caches:
            cache = self._caches[frame]
            parent = cache.parent if stamp is None else cache.parent_at(stamp)
            out.append((frame, cache, parent))
            if parent in seen:
                when = "the latest parents" if stamp is None else f"{stamp:.6f} s"
                raise TransformLookupError(
                    f"the transform tree has a loop at {when} (through older parents after re-parenting): "
                    f"{' -> '.join(seen + [parent])}"
                )
            seen.append(parent)
            frame = parent
        return out

    def _accumulate(self, chain: list[tuple[str, _Cache, str]], stamp: float, tol: float) -> np.ndarray:
        """T_ancestor_start for the ancestor at the end of `chain`."""
        T = np.eye(4)
        for child, cache, _ in chain:
            T = self._sample_at(child, cache, stamp, tol) @ T
        return T

    @staticmethod
    def _sample_at(child: str, cache: _Cache, stamp: float, tol: float) -> np.ndarray:
        """T_parent_child at `stamp` (parent = cache.parent_at(stamp))."""
        if cache.static_T is not None:
            return cache.static_T
        stamps = cache.stamps
        T = np.eye(4)
        if stamp <= stamps[0] or stamp >= stamps[-1]:
            i = 0 if stamp <= stamps[0] else len(stamps) - 1
            gap = abs(stamp - stamps[i])
            if gap > tol:
                when = "before the first" if i == 0 else "after the last"
                raise ExtrapolationError(
                    f"lookup of {cache.parents[i]} -> {child} at {stamp:.6f} s would extrapolate {gap:.6f} s {when} "
                    f"sample (samples cover {stamps[0]:.6f} .. {stamps[-1]:.6f} s; tolerance {tol:g} s)"
                )
            T[:3, :3], T[:3, 3] = cache.rotations[i], cache.translations[i]
            return T
        i = bisect.bisect_right(stamps, stamp)  # stamps[i-1] <= stamp < stamps[i]
        if cache.parents[i - 1] != cache.parents[i]:  # re-parented in between: the earlier sample, as tf2
            T[:3, :3], T[:3, 3] = cache.rotations[i - 1], cache.translations[i - 1]
            return T
        t0, t1 = stamps[i - 1], stamps[i]
        a = (stamp - t0) / (t1 - t0)
        T[:3, 3] = (1.0 - a) * cache.translations[i - 1] + a * cache.translations[i]
        T[:3, :3] = unit_quat_to_matrix(slerp_quaternion(cache.quaternions[i - 1], cache.quaternions[i], a))
        return T

    # ------------------------------------------------------------------------------------------ introspection

    def frames(self) -> list[str]:
        """Every frame id held (children and the parents of their samples), sorted."""
        with self._lock:
            return self._frames()

    def _known(self, frame: str) -> bool:
        caches = self._caches.values()
        return (
            frame in self._caches
            or any(c.parent == frame for c in caches)  # the usual case first: a latest parent (e.g. the root)
            or any(frame in c.parents for c in caches if not c.static)
        )

    def _frames(self) -> list[str]:
        names = set(self._caches)
        for cache in self._caches.values():
            names.update([cache.static_parent] if cache.static else cache.parents)
        return sorted(names)

    def parent(self, frame: str, stamp: float | None = None) -> str | None:
        """The parent of `frame` at `stamp` (None or 0: the latest parent), or None for a root / unknown frame."""
        with self._lock:
            cache = self._caches.get(frame)
            if cache is None:
                return None
            return cache.parent if stamp is None or stamp == 0 else cache.parent_at(float(stamp))

    def is_static(self, frame: str) -> bool:
        with self._lock:
            cache = self._caches.get(frame)
            return bool(cache and cache.static)

    def time_range(self, frame: str) -> tuple[float, float] | None:
        """(oldest, newest) stamp of the dynamic transforms above `frame`; None when static, a root, or unknown."""
        with self._lock:
            cache = self._caches.get(frame)
            if cache is None or cache.static:
                return None
            return cache.stamps[0], cache.stamps[-1]

    def counters(self) -> dict[str, int]:
        """Counts by cause: static_set, dynamic_set, duplicate_replaced, out_of_order, older_than_cache,
        parent_change, static_to_dynamic, dynamic_to_static, cycle, bad_quaternion, bad_translation, bad_stamp,
        bad_frame_id, lookup_* failures (unknown_frame, disconnected, extrapolation, loop)."""
        with self._lock:
            return dict(self._counters)

    def stats(self) -> dict:
        """Diagnostics: number of frames, static/dynamic edges, samples held, newest stamp, counters."""
        with self._lock:
            dynamic = [c for c in self._caches.values() if not c.static]
            newest = max((c.stamps[-1] for c in dynamic), default=None)
            return {
                "frames": len(self._frames()),
                "static_edges": len(self._caches) - len(dynamic),
                "dynamic_edges": len(dynamic),
                "samples": sum(len(c.stamps) for c in dynamic),
                "newest_stamp": newest,
                "counters": dict(self._counters),
            }

    def clear(self) -> None:
        """Forget every dynamic sample (keeps static transforms), e.g. after a clock jump back (bag loop)."""
        with self._lock:
            for child in [c for c, cache in self._caches.items() if not cache.static]:
                del self._caches[child]


class _Bad(Exception):
    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause, self.message = cause, message
