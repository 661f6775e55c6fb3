"""Egocentric episodes for REA-Sim: a person walks between furniture, looks around, picks items up and puts them
elsewhere. Produces per-frame camera poses (OpenCV optical, world-from-camera), per-frame item states and an action log
with frame ranges.

Conventions: the person's position is the camera centre's (x, y); the person faces the camera's horizontal viewing
direction (yaw = atan2 of the optical axis projected on the floor). During "pick up" and "put down" the person stands
still and keeps its yaw (only the head pitches down), so directions and distances are constant over those actions.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from stllm_core.data.reasim.scene import (
    GRID,
    ITEM_RECEPTACLES,
    Item,
    Kitchen,
    container_spot,
    preposition,
    surface_spot,
)

LEVEL_PITCH = math.radians(10.0)  # looking slightly down while walking
HAND_OFFSET = np.array([0.12, 0.16, 0.38])  # where a carried item is held, camera optical frame (m): lower right
MIN_FRAMES = {"walk": 2, "look around": 3, "pick up": 2, "put down": 2}


def connected_component(free: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean grid."""
    lab, n = ndimage.label(free, structure=np.ones((3, 3), bool))
    if n == 0:
        return free.copy()
    sizes = ndimage.sum(free, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def camera_pose(xy, eye_height: float, yaw: float, pitch: float) -> np.ndarray:
    """World-from-camera (OpenCV optical: x right, y down, z forward) for a camera at (x, y, eye_height) looking along
    yaw (radians, 0 = +x, counter-clockwise) and pitch (radians, positive = down).

    Example: yaw=0, pitch=0 -> optical z = +x (forward), optical x = -y (right), optical y = -z (down).
    """
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    f = np.array([cy * cp, sy * cp, -sp])
    r = np.array([sy, -cy, 0.0])
    d = np.cross(f, r)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2] = r, d, f
    T[:3, 3] = [xy[0], xy[1], eye_height]
    return T


def plan_path(kitchen: Kitchen, start, goal) -> np.ndarray:
    """Shortest 8-connected path over the free grid from start to goal (xy metres), shortcut by line of sight."""
    free = kitchen.free
    s = (int(start[0] // GRID), int(start[1] // GRID))
    g = (int(goal[0] // GRID), int(goal[1] // GRID))
    if s == g:
        return np.array([start[:2], goal[:2]], float)
    dist = {s: 0.0}
    prev: dict = {}
    heap = [(0.0, s)]
    steps = [(dx, dy, math.hypot(dx, dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    while heap:
        d, c = heapq.heappop(heap)
        if c == g:
            break
        if d > dist.get(c, math.inf):
            continue
        for dx, dy, w in steps:
            n = (c[0] + dx, c[1] + dy)
            if not (0 <= n[0] < free.shape[0] and 0 <= n[1] < free.shape[1]) or not free[n]:
                continue
            nd = d + w  # Dijkstra: the grid is small
            if nd < dist.get(n, math.inf):
                dist[n], prev[n] = nd, c
                heapq.heappush(heap, (nd, n))
    if g not in dist:
        raise RuntimeError(f"No walkable path from {start} to {goal} in {kitchen.scene_id}.")
    cells = [g]
    while cells[-1] != s:
        cells.append(prev[cells[-1]])
    pts = [np.asarray(start[:2], float)] + [(np.array(c) + 0.5) * GRID for c in reversed(cells[1:-1])] + \
          [np.asarray(goal[:2], float)]
    # line-of-sight shortcutting
    out = [pts[0]]
    i = 0
    while i < len(pts) - 1:
        j = len(pts) - 1
        while j > i + 1 and not _visible(kitchen, pts[i], pts[j]):
            j -= 1
        out.append(pts[j])
        i = j
    return np.array(out)


def _visible(kitchen: Kitchen, a, b) -> bool:
    n = max(2, int(np.linalg.norm(b - a) / 0.05))
    return all(kitchen.is_free(a + (b - a) * t) for t in np.linspace(0, 1, n)[1:-1])


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def _lerp_angle(a: float, b: float, t: float) -> float:
    return a + _wrap(b - a) * t


@dataclass
class Action:
    verb: str  # "walk" | "look around" | "pick up" | "put down"
    start_frame: int
    stop_frame: int  # inclusive
    text: str  # narration, e.g. "picking up the mug from the counter"
    item: str | None = None
    furniture: str | None = None  # furniture name, e.g. "counter_2"
    furniture_kind: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ItemState:
    position: np.ndarray
    support: str | None  # furniture name, None while carried
    inside: bool = False
    carried: bool = False


@dataclass
class Episode:
    poses: np.ndarray  # (N, 4, 4) world-from-camera, OpenCV optical
    stamps: np.ndarray  # (N,) seconds
    fps: float
    actions: list[Action]
    states: list[dict[str, ItemState]]  # per frame: item kind -> state
    eye_height: float
    hand_offset: np.ndarray = field(default_factory=lambda: HAND_OFFSET.copy())  # carried item, camera frame

    @property
    def num_frames(self) -> int:
        return len(self.stamps)

    def to_dict(self) -> dict:
        return {"fps": self.fps, "eye_height": self.eye_height, "actions": [a.to_dict() for a in self.actions],
                "final_items": {k: {"position": [round(float(v), 6) for v in s.position], "support": s.support,
                                    "inside": s.inside, "carried": s.carried} for k, s in self.states[-1].items()}}


@dataclass
class _Segment:
    verb: str
    duration: float  # nominal seconds
    pose: callable  # s in (0, 1] -> (xy, yaw, pitch)
    text: str
    item: str | None = None
    furniture: str | None = None
    furniture_kind: str | None = None
    event: tuple | None = None  # ("pick", item) or ("put", item, position, support, inside)
    frames: int = 0


def _walk(path: np.ndarray, yaw0: float, yaw_end: float, text: str, furniture=None, kind=None) -> _Segment:
    seg_len = np.linalg.norm(np.diff(path, axis=0), axis=1)
    total = float(seg_len.sum())
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    headings = [math.atan2(*(path[i + 1] - path[i])[::-1]) for i in range(len(path) - 1)]

    def pose(s):
        d = s * total
        i = int(np.clip(np.searchsorted(cum, d, side="right") - 1, 0, len(seg_len) - 1))
        t = 0.0 if seg_len[i] == 0 else (d - cum[i]) / seg_len[i]
        xy = path[i] + (path[i + 1] - path[i]) * min(max(t, 0.0), 1.0)
        h = headings[i] if total > 0.05 else yaw_end
        if s < 0.3:
            yaw = _lerp_angle(yaw0, h, s / 0.3)
        elif s > 0.7:
            yaw = _lerp_angle(h, yaw_end, (s - 0.7) / 0.3)
        else:
            yaw = h
        return xy, yaw, LEVEL_PITCH

    return _Segment("walk", 1.0 + total / 1.0, pose, text, furniture=furniture, furniture_kind=kind)


def _stand(xy, yaw, pitch_to: float, verb: str, text: str, item: str, furniture: str, kind: str,
           event: tuple) -> _Segment:
    def pose(s):
        return xy, yaw, LEVEL_PITCH + (pitch_to - LEVEL_PITCH) * min(1.0, 2.0 * s)

    return _Segment(verb, 2.0, pose, text, item=item, furniture=furniture, furniture_kind=kind, event=event)


def _look_around(xy, yaw0: float, amplitude: float) -> _Segment:
    def pose(s):
        return xy, yaw0 + amplitude * math.sin(2 * math.pi * s), LEVEL_PITCH

    return _Segment("look around", 3.0, pose, "looking around")


def _allocate(segments: list[_Segment], n: int) -> None:
    mins = np.array([MIN_FRAMES[s.verb] for s in segments])
    extra = n - int(mins.sum())
    dur = np.array([s.duration for s in segments])
    share = dur / dur.sum() * extra
    add = np.floor(share).astype(int)
    rest = extra - int(add.sum())
    for i in np.argsort(-(share - add), kind="stable")[:rest]:
        add[i] += 1
    for s, m, a in zip(segments, mins, add):
        s.frames = int(m + a)


def make_episode(kitchen: Kitchen, rng: np.random.Generator, num_frames: int) -> Episode:
    """A random episode of `num_frames` frames in `kitchen` (kitchen.items give the initial item states)."""
    n_tasks = int(np.clip((num_frames - 3) // 8, 1, 4))
    look = num_frames >= 8 * n_tasks + 3
    eye = float(np.round(rng.uniform(1.5, 1.7), 3))
    free_cells = np.argwhere(kitchen.free)
    start = (free_cells[int(rng.integers(len(free_cells)))] + 0.5) * GRID
    yaw = float(rng.uniform(-math.pi, math.pi))
    state = {it.kind: ItemState(it.position.copy(), it.support, it.inside) for it in kitchen.items}
    segments: list[_Segment] = []
    if look:
        segments.append(_look_around(start, yaw, math.radians(float(rng.uniform(50, 80)))))
    pos = np.asarray(start, float)
    movable = [k for k in state if not state[k].inside]
    order = [movable[i] for i in rng.permutation(len(movable))]
    tasks = 0
    for item in order:
        if tasks == n_tasks:
            break
        it = kitchen.item(item)
        src = kitchen.get(state[item].support)
        targets = [b for b in kitchen.furniture if b.kind in ITEM_RECEPTACLES[item] and b.name != src.name]
        if not targets:
            continue
        dst = targets[int(rng.integers(len(targets)))]
        others = [Item(k, kitchen.item(k).size, kitchen.item(k).color, st.position, st.support or "", st.inside)
                  for k, st in state.items() if k != item]  # where the other items are at this point of the plan
        inside = dst.kind in ("fridge", "microwave", "cabinet")
        spot = container_spot(dst, it.size) if inside else surface_spot(kitchen, dst, it.size, rng, others)
        if spot is None:
            continue
        ipos = state[item].position
        p_pick = kitchen.approach_point(src, ipos[:2])
        p_put = kitchen.approach_point(dst, spot[:2])
        yaw_pick = math.atan2(ipos[1] - p_pick[1], ipos[0] - p_pick[0])
        yaw_put = math.atan2(spot[1] - p_put[1], spot[0] - p_put[0])
        pitch_pick = math.atan2(eye - ipos[2], float(np.linalg.norm(ipos[:2] - p_pick)))
        pitch_put = math.atan2(eye - spot[2], float(np.linalg.norm(spot[:2] - p_put)))
        src_text = f"{'from' if not state[item].inside else 'out of'} the {src.kind}"
        segments.append(_walk(plan_path(kitchen, pos, p_pick), yaw, yaw_pick, f"walking to the {src.kind}",
                              src.name, src.kind))
        segments.append(_stand(p_pick, yaw_pick, pitch_pick, "pick up", f"picking up the {item} {src_text}", item,
                               src.name, src.kind, ("pick", item)))
        segments.append(_walk(plan_path(kitchen, p_pick, p_put), yaw_pick, yaw_put, f"walking to the {dst.kind}",
                              dst.name, dst.kind))
        segments.append(_stand(p_put, yaw_put, pitch_put, "put down",
                               f"putting the {item} {preposition(dst.kind)} the {dst.kind}", item, dst.name, dst.kind,
                               ("put", item, spot, dst.name, inside)))
        state[item] = ItemState(spot, dst.name, inside)  # planning state (rendered states are rebuilt below)
        pos, yaw = p_put, yaw_put
        tasks += 1
    if tasks == 0:
        raise RuntimeError(f"No item can be moved in {kitchen.scene_id}.")
    _allocate(segments, num_frames)
    poses, states, actions = [], [], []
    cur = {it.kind: ItemState(it.position.copy(), it.support, it.inside) for it in kitchen.items}
    frame = 0
    for seg in segments:
        actions.append(Action(seg.verb, frame, frame + seg.frames - 1, seg.text, seg.item, seg.furniture,
                              seg.furniture_kind))
        for j in range(seg.frames):
            s = (j + 1) / seg.frames
            xy, yw, pt = seg.pose(s)
            if seg.event is not None and j == 1:
                if seg.event[0] == "pick":
                    st = cur[seg.event[1]]
                    cur[seg.event[1]] = ItemState(st.position, None, False, carried=True)
                else:
                    _, item, spot, sup, inside = seg.event
                    cur[item] = ItemState(np.asarray(spot, float), sup, inside)
            poses.append(camera_pose(xy, eye, yw, pt))
            states.append({k: ItemState(v.position.copy(), v.support, v.inside, v.carried) for k, v in cur.items()})
            frame += 1
    fps = float(np.round(num_frames / sum(s.duration for s in segments), 4))
    stamps = np.arange(num_frames) / fps
    return Episode(np.stack(poses), stamps, fps, actions, states, eye)
