"""Procedural kitchens for REA-Sim: a room of axis-aligned coloured boxes (furniture) and small items on surfaces.

World frame `map` (REP-103): x and y span the floor, z up, metres. The room covers x in [0, width], y in [0, depth];
wall units stand along the back (y = depth), left (x = 0) and right (x = width) walls, a table with chairs stands in the
middle. Every object is an axis-aligned box, so every geometric answer (direction, distance) is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

WALL_HEIGHT = 2.6
WALL_THICKNESS = 0.1
PERSON_RADIUS = 0.3  # metres kept free around the walking person
GRID = 0.1  # metres per walkability cell

# Distinct base colours per kind (RGB 0-255): the model can learn "tall white box = fridge". Every furniture colour
# (jittered by up to +-JITTER per channel) stays nearer its own base colour than any other kind's, item's, wall's or
# floor's colour (tests/test_reasim.py), so a point's colour names its object.
FURNITURE_COLORS = {
    "fridge": (232, 232, 238), "sink": (110, 150, 200), "hob": (35, 35, 40), "oven": (205, 95, 40),
    "microwave": (165, 35, 45), "dishwasher": (60, 170, 160), "counter": (205, 182, 140), "cabinet": (100, 60, 35),
    "table": (150, 100, 55), "chair": (55, 115, 65),
}
# per-kitchen choices for walls and floor (the floor's second tile colour is DARK_TILE times the first)
WALL_COLORS = ((214, 208, 192), (198, 204, 212), (204, 214, 198), (226, 204, 180))
FLOOR_COLORS = ((168, 158, 146), (150, 150, 156), (178, 152, 120), (120, 132, 140))
DARK_TILE = 0.8
# kind: (size x, y, z in metres, colour)
ITEMS = {
    "mug": ((0.09, 0.09, 0.10), (225, 40, 40)), "plate": ((0.24, 0.24, 0.025), (245, 225, 150)),
    "bowl": ((0.16, 0.16, 0.07), (40, 90, 225)), "knife": ((0.25, 0.03, 0.02), (175, 180, 200)),
    "pan": ((0.28, 0.28, 0.05), (140, 95, 165)), "kettle": ((0.18, 0.15, 0.22), (235, 205, 25)),
    "cup": ((0.08, 0.08, 0.09), (250, 140, 30)), "bottle": ((0.08, 0.08, 0.28), (30, 165, 90)),
    "jar": ((0.10, 0.10, 0.14), (170, 60, 200)), "sponge": ((0.10, 0.07, 0.04), (160, 220, 40)),
}
# Where an item may be put: furniture kinds with a top surface ("on") or an inside ("in").
SURFACE_KINDS = ("counter", "table", "sink", "hob")
CONTAINER_KINDS = ("fridge", "microwave", "cabinet")
ITEM_RECEPTACLES = {
    "mug": ("counter", "table", "sink", "microwave", "cabinet"),
    "plate": ("counter", "table", "sink", "fridge", "microwave", "cabinet"),
    "bowl": ("counter", "table", "sink", "fridge", "microwave", "cabinet"),
    "knife": ("counter", "table", "sink"),
    "pan": ("counter", "sink", "hob"),
    "kettle": ("counter", "table", "hob"),
    "cup": ("counter", "table", "sink", "microwave", "cabinet"),
    "bottle": ("counter", "table", "fridge"),
    "jar": ("counter", "table", "fridge", "cabinet"),
    "sponge": ("counter", "sink"),
}


def preposition(kind: str) -> str:
    """"in" for containers (fridge, microwave, cabinet) and the sink, "on" for other surfaces."""
    return "in" if kind in CONTAINER_KINDS or kind == "sink" else "on"


@dataclass
class Box:
    """An axis-aligned box: a piece of furniture, a wall, the floor, or an item."""

    name: str  # unique in the scene, e.g. "counter_2", "fridge"
    kind: str
    center: np.ndarray  # (3,) metres, map frame
    size: np.ndarray  # (3,) full extents along x, y, z
    color: tuple[int, int, int]
    front: tuple[float, float] | None = None  # unit xy normal of the side facing the room (wall units)

    @property
    def lo(self) -> np.ndarray:
        return self.center - self.size / 2

    @property
    def hi(self) -> np.ndarray:
        return self.center + self.size / 2

    @property
    def top(self) -> float:
        return float(self.center[2] + self.size[2] / 2)

    def footprint_distance(self, xy: np.ndarray) -> float:
        """Horizontal distance (m) from point xy to the box footprint (0 inside)."""
        d = np.maximum(np.abs(np.asarray(xy, float) - self.center[:2]) - self.size[:2] / 2, 0.0)
        return float(np.hypot(*d))

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "center": [round(float(v), 6) for v in self.center],
                "size": [round(float(v), 6) for v in self.size], "color": list(self.color),
                "front": None if self.front is None else [float(v) for v in self.front]}


@dataclass
class Item:
    """A small movable item; `support` is the furniture it is on or in."""

    kind: str  # also its name: one item per kind and scene
    size: np.ndarray
    color: tuple[int, int, int]
    position: np.ndarray  # (3,) centre, metres
    support: str  # furniture name
    inside: bool = False  # True when in a container (then it is not rendered)

    def box(self) -> Box:
        return Box(self.kind, self.kind, self.position.copy(), self.size.copy(), self.color)


@dataclass
class Kitchen:
    scene_id: str
    width: float  # x extent, metres
    depth: float  # y extent, metres
    furniture: list[Box]
    items: list[Item]
    structure: list[Box] = field(default_factory=list)  # floor and walls
    free: np.ndarray | None = None  # (nx, ny) bool walkability grid, cell (i, j) centre = ((i+.5)*GRID, (j+.5)*GRID)

    def get(self, name: str) -> Box:
        for b in self.furniture:
            if b.name == name:
                return b
        raise KeyError(f"No furniture named {name!r} in {self.scene_id}; have {[b.name for b in self.furniture]}.")

    def item(self, kind: str) -> Item:
        for it in self.items:
            if it.kind == kind:
                return it
        raise KeyError(f"No item {kind!r} in {self.scene_id}.")

    def kinds_count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.furniture:
            out[b.kind] = out.get(b.kind, 0) + 1
        return out

    def unique_kinds(self) -> list[str]:
        """Furniture kinds present exactly once ("the fridge" names one object)."""
        return [k for k, n in self.kinds_count().items() if n == 1]

    # -- walkability ------------------------------------------------------------------------------------------------
    def build_free_grid(self) -> None:
        nx, ny = int(round(self.width / GRID)), int(round(self.depth / GRID))
        xs = (np.arange(nx) + 0.5) * GRID
        ys = (np.arange(ny) + 0.5) * GRID
        X, Y = np.meshgrid(xs, ys, indexing="ij")
        free = (X > PERSON_RADIUS) & (X < self.width - PERSON_RADIUS) & (Y > PERSON_RADIUS) & \
               (Y < self.depth - PERSON_RADIUS)
        for b in self.furniture:
            if b.lo[2] > 1.2:  # wall cabinets hang above the counters, which already block the floor
                continue
            dx = np.maximum(np.abs(X - b.center[0]) - b.size[0] / 2, 0)
            dy = np.maximum(np.abs(Y - b.center[1]) - b.size[1] / 2, 0)
            free &= np.hypot(dx, dy) > PERSON_RADIUS
        self.free = free

    def is_free(self, xy) -> bool:
        i, j = int(xy[0] // GRID), int(xy[1] // GRID)
        return self.free is not None and 0 <= i < self.free.shape[0] and 0 <= j < self.free.shape[1] and \
            bool(self.free[i, j])

    def approach_point(self, box: Box, target_xy, stand_off: float = 0.45) -> np.ndarray:
        """A free standing point near `box` (at least stand_off m from its footprint, further if that is blocked, e.g.
        for a microwave on a counter), nearest to target_xy."""
        for off in (stand_off, stand_off + 0.15, stand_off + 0.3, stand_off + 0.45):
            hx, hy = box.size[0] / 2 + off, box.size[1] / 2 + off
            t = np.linspace(0, 1, 24, endpoint=False)
            cx, cy = box.center[0], box.center[1]
            cands = np.concatenate([
                np.stack([cx - hx + 2 * hx * t, np.full_like(t, cy - hy)], 1),
                np.stack([np.full_like(t, cx + hx), cy - hy + 2 * hy * t], 1),
                np.stack([cx + hx - 2 * hx * t, np.full_like(t, cy + hy)], 1),
                np.stack([np.full_like(t, cx - hx), cy + hy - 2 * hy * t], 1),
            ])
            cands = cands[[self.is_free(p) for p in cands]]
            if len(cands):
                return cands[np.argmin(np.linalg.norm(cands - np.asarray(target_xy)[None, :2], axis=1))]
        raise RuntimeError(f"No free standing point next to {box.name} in {self.scene_id}.")

    def to_dict(self) -> dict:
        return {"scene_id": self.scene_id, "width": self.width, "depth": self.depth,
                "structure": [b.to_dict() for b in self.structure],
                "furniture": [b.to_dict() for b in self.furniture],
                "items": [{"kind": it.kind, "position": [round(float(v), 6) for v in it.position],
                           "size": [float(v) for v in it.size], "support": it.support, "inside": it.inside,
                           "color": list(it.color)} for it in self.items]}


# ----------------------------------------------------------------------------------------------------------------------


JITTER = 12


def _jitter(color, rng, amount=JITTER) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _wall_unit(kind, wall, s, width, depth_m, height, z0, W, D, rng, name) -> Box:
    """A unit whose back touches `wall` ('back' | 'left' | 'right'); s = distance of its centre along the wall."""
    col = _jitter(FURNITURE_COLORS[kind], rng)
    zc = z0 + height / 2
    if wall == "back":
        return Box(name, kind, np.array([s, D - depth_m / 2, zc]), np.array([width, depth_m, height]), col, (0.0, -1.0))
    if wall == "left":
        return Box(name, kind, np.array([depth_m / 2, s, zc]), np.array([depth_m, width, height]), col, (1.0, 0.0))
    return Box(name, kind, np.array([W - depth_m / 2, s, zc]), np.array([depth_m, width, height]), col, (-1.0, 0.0))


def make_kitchen(scene_id: str, rng: np.random.Generator, num_items: int = 7) -> Kitchen:
    """A random kitchen: wall units (fridge, sink, hob, oven, counters, maybe a dishwasher), a microwave on a counter,
    wall cabinets, a table with chairs, and `num_items` small items on surfaces."""
    for _attempt in range(50):
        k = _try_kitchen(scene_id, rng, num_items)
        if k is not None:
            return k
    raise RuntimeError(f"Could not lay out kitchen {scene_id} in 50 attempts.")


def _try_kitchen(scene_id: str, rng: np.random.Generator, num_items: int) -> Kitchen | None:
    W = float(np.round(rng.uniform(4.6, 6.4), 2))
    D = float(np.round(rng.uniform(4.0, 5.4), 2))
    units = [("fridge", 0.75, 0.7, 1.85), ("sink", 0.8, 0.6, 0.9), ("hob", 0.6, 0.6, 0.9), ("oven", 0.6, 0.6, 0.9)]
    units += [("counter", float(rng.choice([0.6, 0.8, 1.0])), 0.6, 0.9) for _ in range(int(rng.integers(2, 4)))]
    if rng.random() < 0.5:
        units.append(("dishwasher", 0.6, 0.6, 0.85))
    order = rng.permutation(len(units))
    units = [units[i] for i in order]
    walls = [("back", 0.05, W - 0.05), ("left", 0.8, D - 0.75), ("right", 0.8, D - 0.75)]
    walls = [walls[0]] + [walls[i] for i in rng.permutation([1, 2])]
    furniture: list[Box] = []
    counts: dict[str, int] = {}
    ui = 0
    for wall, a, b in walls:
        s = a + float(rng.uniform(0.0, 0.4))
        while ui < len(units) and s + units[ui][1] <= b:
            kind, w, dep, h = units[ui]
            counts[kind] = counts.get(kind, 0) + 1
            name = f"{kind}_{counts[kind]}" if kind == "counter" else kind
            furniture.append(_wall_unit(kind, wall, s + w / 2, w, dep, h, 0.0, W, D, rng, name))
            s += w + float(rng.uniform(0.0, 0.15))
            ui += 1
    if ui < len(units):
        return _reject(scene_id, f"{len(units) - ui} wall units did not fit")
    # microwave on a counter; wall cabinets above one or two counters
    counters = [b for b in furniture if b.kind == "counter"]
    mw_on = counters[int(rng.integers(len(counters)))]
    along = 0 if mw_on.front[0] == 0 else 1  # axis along the wall
    c = mw_on.center.copy()
    size = np.array([0.5, 0.35, 0.3]) if along == 0 else np.array([0.35, 0.5, 0.3])
    c[along] += float(rng.uniform(-1, 1)) * max(0.0, (mw_on.size[along] - size[along]) / 2)
    c[1 - along] = mw_on.center[1 - along] - 0.1 * mw_on.front[1 - along]  # pushed back toward the wall
    c[2] = mw_on.top + size[2] / 2
    furniture.append(Box("microwave", "microwave", c, size, _jitter(FURNITURE_COLORS["microwave"], rng), mw_on.front))
    cab_on = [b for b in counters if b is not mw_on][:2]
    for n, cb in enumerate(cab_on, start=1):
        ax = 1 if cb.front[0] == 0 else 0  # the unit's depth axis (away from its wall)
        sz = cb.size.copy()
        sz[ax], sz[2] = 0.35, 0.7
        cc = cb.center.copy()
        cc[ax] = cb.center[ax] - cb.front[ax] * (cb.size[ax] - 0.35) / 2  # against the wall
        cc[2] = 1.5 + sz[2] / 2
        name = "cabinet" if len(cab_on) == 1 else f"cabinet_{n}"
        furniture.append(Box(name, "cabinet", cc, sz, _jitter(FURNITURE_COLORS["cabinet"], rng), cb.front))
    # table + chairs in the middle
    tw, td = (1.2, 0.8) if rng.random() < 0.5 else (0.8, 1.2)
    tc = np.array([W / 2 + rng.uniform(-0.4, 0.4), D / 2 - 0.2 + rng.uniform(-0.25, 0.25), 0.375])
    table = Box("table", "table", tc, np.array([tw, td, 0.75]), _jitter(FURNITURE_COLORS["table"], rng))
    furniture.append(table)
    sides = [(1, 0), (-1, 0), (0, 1), (0, -1)]
    n_chairs = int(rng.integers(2, 5))
    for ci, si in enumerate(rng.permutation(4)[:n_chairs]):
        sx, sy = sides[si]
        p = tc.copy()
        p[0] += sx * (tw / 2 + 0.3)
        p[1] += sy * (td / 2 + 0.3)
        p[2] = 0.45
        furniture.append(Box(f"chair_{ci + 1}", "chair", p, np.array([0.45, 0.45, 0.9]),
                             _jitter(FURNITURE_COLORS["chair"], rng)))
    wall_c = WALL_COLORS[int(rng.integers(len(WALL_COLORS)))]
    floor_c = FLOOR_COLORS[int(rng.integers(len(FLOOR_COLORS)))]
    kitchen = Kitchen(scene_id, W, D, furniture, [], _structure(W, D, wall_c, floor_c))
    kitchen.build_free_grid()
    if kitchen.free.mean() < 0.25:
        return _reject(scene_id, f"free floor fraction {kitchen.free.mean():.2f} < 0.25")
    # every wall unit and the table must be reachable from one connected free region
    from stllm_core.data.reasim.trajectory import connected_component

    comp = connected_component(kitchen.free)
    for b in furniture:
        if b.kind in ("chair",):
            continue
        try:
            p = kitchen.approach_point(b, b.center[:2])
        except RuntimeError:
            return _reject(scene_id, f"no standing point next to {b.name}")
        if not comp[int(p[0] // GRID), int(p[1] // GRID)]:
            return _reject(scene_id, f"{b.name} is not reachable")
    kitchen.free &= comp
    if not _place_items(kitchen, rng, num_items):
        return _reject(scene_id, "items did not fit on the surfaces")
    return kitchen


def _reject(scene_id: str, why: str) -> None:
    logger.debug("kitchen %s layout rejected: %s", scene_id, why)
    return None


def _structure(W: float, D: float, wc: tuple[int, int, int], fc: tuple[int, int, int]) -> list[Box]:
    t, H = WALL_THICKNESS, WALL_HEIGHT
    return [
        Box("floor", "floor", np.array([W / 2, D / 2, -0.05]), np.array([W + 2 * t, D + 2 * t, 0.1]),
            fc),
        Box("wall_back", "wall", np.array([W / 2, D + t / 2, H / 2]), np.array([W + 2 * t, t, H]), wc, (0.0, -1.0)),
        Box("wall_front", "wall", np.array([W / 2, -t / 2, H / 2]), np.array([W + 2 * t, t, H]), wc, (0.0, 1.0)),
        Box("wall_left", "wall", np.array([-t / 2, D / 2, H / 2]), np.array([t, D, H]), wc, (1.0, 0.0)),
        Box("wall_right", "wall", np.array([W + t / 2, D / 2, H / 2]), np.array([t, D, H]), wc, (-1.0, 0.0)),
    ]


def surface_spot(kitchen: Kitchen, box: Box, size: np.ndarray, rng: np.random.Generator,
                 avoid: list[Item]) -> np.ndarray | None:
    """A free centre position for an item of `size` on top of `box` (not overlapping `avoid` items or a microwave)."""
    blockers = [it.box() for it in avoid if not it.inside] + [b for b in kitchen.furniture if b.kind == "microwave"]
    for _ in range(30):
        half = np.maximum(box.size[:2] / 2 - size[:2] / 2 - 0.05, 0.0)
        xy = box.center[:2] + rng.uniform(-1, 1, 2) * half
        ok = True
        for o in blockers:
            if abs(o.lo[2] - box.top) > 0.02 and o.kind == "microwave":
                continue
            if np.all(np.abs(xy - o.center[:2]) < (o.size[:2] + size[:2]) / 2 + 0.04):
                ok = False
                break
        if ok:
            return np.array([xy[0], xy[1], box.top + size[2] / 2])
    return None


def container_spot(box: Box, size: np.ndarray) -> np.ndarray:
    """Where an item put `in` a container is (its centre; the item is hidden there)."""
    return box.center.copy()


def _place_items(kitchen: Kitchen, rng: np.random.Generator, num_items: int) -> bool:
    kinds = list(ITEMS)
    chosen = [kinds[i] for i in rng.permutation(len(kinds))[:num_items]]
    for kind in chosen:
        size = np.array(ITEMS[kind][0])
        opts = [b for b in kitchen.furniture if b.kind in ("counter", "table") or
                (b.kind in ("sink", "hob") and b.kind in ITEM_RECEPTACLES[kind])]
        placed = False
        for bi in rng.permutation(len(opts)):
            pos = surface_spot(kitchen, opts[bi], size, rng, kitchen.items)
            if pos is not None:
                kitchen.items.append(Item(kind, size, ITEMS[kind][1], pos, opts[bi].name))
                placed = True
                break
        if not placed:
            return False
    return True
