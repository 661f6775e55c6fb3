"""REA records (the ST-LLM data set format) and their conversion to `Clip`s for training and evaluation.

A REA JSON file is a list of records::

    {"id": "...", "scene_id": "P01_01",
     "video": "<dir of frame_%010d.jpg>", "pointcloud": "<prefix>_vert.npy", "c2ws": "<dir of {idx}.txt>", "K": "K.txt",
     "conversations": [{"from": "human", "value": "<image>\\n<pointcloud>\\nWhere is ...?"},
                       {"from": "gpt", "value": "..."}],
     "metadata": {"dataset": "...", "question_type": "relative_direction", "query_start_frame": 120,
                  "query_stop_frame": 480, ...}}

Relative paths are resolved against the directory of the JSON file (or `root=`). `read_rea_json` validates every record
and either raises or skips bad ones, keeping a report of (id, reason) in `.skipped`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stllm_core.data.clip_folder import (
    DEFAULT_DEPTH_SCALE,
    DEFAULT_FPS,
    FRAME_RE,
    check_K,
    check_pose,
    frame_name,
    load_depth_png,
    load_rgb,
    read_matrix,
    read_pointcloud,
)
from stllm_core.errors import DataError
from stllm_core.types import Clip, Frame, Scene

logger = logging.getLogger(__name__)

QUESTION_TYPES = (
    "relative_direction",
    "relative_distance",
    "find_my_item",
    "furniture_affordance",
    "action_planning",
)
IMAGE_TOKEN = "<image>"
POINTCLOUD_TOKEN = "<pointcloud>"
_PLACEHOLDER_RE = re.compile(r"\s*(<image>|<pointcloud>)\s*")


def strip_placeholders(text: str) -> str:
    """'<image>\\n<pointcloud>\\nWhere is the mug?' -> 'Where is the mug?'"""
    return _PLACEHOLDER_RE.sub(" ", text).strip()


def make_conversations(question: str, answer: str) -> list[dict[str, str]]:
    """LLaVA-style turns with the REA placeholders in front of the question."""
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{POINTCLOUD_TOKEN}\n{question}"},
            {"from": "gpt", "value": answer}]


@dataclass
class ReaRecord:
    """One REA question/answer about a span of an egocentric video."""

    id: str
    scene_id: str
    video: str  # directory of frame_%010d.jpg/.png (relative to base_dir unless absolute)
    pointcloud: str  # <prefix>_vert.npy or .ply
    c2ws: str  # directory of {frame_id}.txt camera-to-world 4x4 poses
    K: str  # 3x3 intrinsics text file
    conversations: list[dict[str, str]]
    question_type: str
    query_start_frame: int
    query_stop_frame: int
    metadata: dict[str, Any] = field(default_factory=dict)  # everything else in `metadata` (dataset, fps, ...)
    base_dir: Path | None = None  # where relative paths are resolved; not serialized

    def __post_init__(self):
        if self.question_type not in QUESTION_TYPES:
            raise DataError(f"Record {self.id!r}: unknown question_type {self.question_type!r}; "
                            f"expected one of {', '.join(QUESTION_TYPES)}.")
        if not self.conversations or not any(t.get("from") == "human" for t in self.conversations):
            raise DataError(f"Record {self.id!r}: conversations are empty or have no human turn.")
        if self.query_stop_frame < self.query_start_frame:
            raise DataError(f"Record {self.id!r}: query_stop_frame {self.query_stop_frame} < "
                            f"query_start_frame {self.query_start_frame}.")

    # -- text ------------------------------------------------------------------------------------------------------
    @property
    def question(self) -> str:
        """The first human turn without the <image>/<pointcloud> placeholders."""
        return strip_placeholders(next(t["value"] for t in self.conversations if t.get("from") == "human"))

    @property
    def answer(self) -> str:
        """The first gpt turn ('' if the record has none, e.g. a test question)."""
        return next((t["value"].strip() for t in self.conversations if t.get("from") == "gpt"), "")

    # -- paths -----------------------------------------------------------------------------------------------------
    def resolve(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() or self.base_dir is None else self.base_dir / path

    @property
    def video_path(self) -> Path:
        return self.resolve(self.video)

    @property
    def pointcloud_path(self) -> Path:
        return self.resolve(self.pointcloud)

    @property
    def c2ws_path(self) -> Path:
        return self.resolve(self.c2ws)

    @property
    def K_path(self) -> Path:
        return self.resolve(self.K)

    def missing_files(self) -> list[str]:
        out = []
        for name, p in (("video", self.video_path), ("c2ws", self.c2ws_path)):
            if not p.is_dir():
                out.append(f"{name} directory {p}")
        for name, p in (("pointcloud", self.pointcloud_path), ("K", self.K_path)):
            if not p.is_file():
                out.append(f"{name} file {p}")
        return out

    # -- (de)serialization -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, base_dir: Path | None = None) -> ReaRecord:
        if not isinstance(d, dict):
            raise DataError(f"A REA record must be a JSON object; got {type(d).__name__}.")
        rid = d.get("id")
        if not isinstance(rid, (str, int)) or rid == "":
            raise DataError(f"A REA record has no `id` (keys: {sorted(d)}).")
        rid = str(rid)
        missing = [k for k in ("scene_id", "video", "pointcloud", "c2ws", "K", "conversations") if k not in d]
        if missing:
            raise DataError(f"Record {rid!r} lacks field(s) {', '.join(missing)}.")
        meta = d.get("metadata") or {}
        if not isinstance(meta, dict):
            raise DataError(f"Record {rid!r}: `metadata` must be an object.")
        meta = dict(meta)
        qtype = meta.pop("question_type", d.get("question_type"))
        if qtype is None:
            raise DataError(f"Record {rid!r} has no metadata.question_type.")
        try:
            start = int(meta.pop("query_start_frame", d.get("query_start_frame")))
            stop = int(meta.pop("query_stop_frame", d.get("query_stop_frame")))
        except (TypeError, ValueError):
            raise DataError(f"Record {rid!r}: query_start_frame/query_stop_frame missing or not integers.") from None
        conv = d["conversations"]
        if not isinstance(conv, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                 for t in conv):
            raise DataError(f"Record {rid!r}: `conversations` must be a list of {{'from', 'value'}} turns.")
        return cls(id=rid, scene_id=str(d["scene_id"]), video=str(d["video"]), pointcloud=str(d["pointcloud"]),
                   c2ws=str(d["c2ws"]), K=str(d["K"]), conversations=[dict(t) for t in conv], question_type=qtype,
                   query_start_frame=start, query_stop_frame=stop, metadata=meta, base_dir=base_dir)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "scene_id": self.scene_id, "video": self.video, "pointcloud": self.pointcloud,
            "c2ws": self.c2ws, "K": self.K, "conversations": self.conversations,
            "metadata": {"question_type": self.question_type, "query_start_frame": self.query_start_frame,
                         "query_stop_frame": self.query_stop_frame, **self.metadata},
        }


class ReaRecords(list):
    """A list of ReaRecord plus `.skipped`: [(record id or '#index', reason)] of the records left out."""

    def __init__(self, records: Iterable[ReaRecord] = (), skipped: Iterable[tuple[str, str]] = ()):
        super().__init__(records)
        self.skipped: list[tuple[str, str]] = list(skipped)


def read_rea_json(path: str | Path, on_error: str = "skip", check_files: bool = True,
                  root: str | Path | None = None) -> ReaRecords:
    """Read a REA JSON file (a list of records, or {"records": [...]}) into ReaRecord objects.

    on_error="skip" leaves out bad records (missing files, unknown question type, empty conversations, malformed
    fields) and lists them in `.skipped` with the reason (and logs a summary); "raise" raises DataError on the first.
    A file that is not valid JSON always raises DataError.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error is {on_error!r}; expected 'skip' or 'raise'.")
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"REA file {path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"REA file {path} is not valid JSON: {e}.") from None
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        data = data["records"]
    if not isinstance(data, list):
        raise DataError(f"REA file {path} must hold a JSON list of records; got {type(data).__name__}.")
    base = Path(root) if root is not None else path.parent
    out = ReaRecords()
    seen: set[str] = set()
    for k, d in enumerate(data):
        rid = str(d.get("id", f"#{k}")) if isinstance(d, dict) else f"#{k}"
        try:
            rec = ReaRecord.from_dict(d, base_dir=base)
            if rec.id in seen:
                raise DataError(f"Record {rec.id!r} appears twice in {path}.")
            if check_files:
                missing = rec.missing_files()
                if missing:
                    raise DataError(f"Record {rec.id!r}: missing {'; '.join(missing)}.")
        except DataError as e:
            if on_error == "raise":
                raise DataError(f"{path}: {e}") from None
            out.skipped.append((rid, str(e)))
            continue
        seen.add(rec.id)
        out.append(rec)
    if out.skipped:
        logger.warning("%s: skipped %d of %d records (first: %s: %s)", path, len(out.skipped), len(data),
                       *out.skipped[0])
    return out


def write_rea_json(path: str | Path, records: Sequence[ReaRecord | dict[str, Any]]) -> Path:
    path = Path(path)
    rows = [r.to_dict() if isinstance(r, ReaRecord) else r for r in records]
    path.write_text(json.dumps(rows, indent=1))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# record -> Clip


@functools.lru_cache(maxsize=64)
def _list_frames(video_dir: str, mtime: float) -> tuple[tuple[int, str], ...]:
    out = []
    for p in Path(video_dir).iterdir():
        m = FRAME_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p.name))
    return tuple(sorted(out))


@functools.lru_cache(maxsize=64)
def _list_poses(c2ws_dir: str, mtime: float) -> frozenset[int]:
    return frozenset(int(p.stem) for p in Path(c2ws_dir).glob("*.txt") if p.stem.isdigit())


@functools.lru_cache(maxsize=8)
def _cached_points(path: str, mtime: float) -> tuple[np.ndarray, np.ndarray]:
    return read_pointcloud(Path(path))


def _clip_meta(video_dir: Path) -> dict[str, Any]:
    meta_path = video_dir.parent / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            return meta if isinstance(meta, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{meta_path} is not valid JSON.") from None
    return {}


def sample_uniform(ids: Sequence[int], num: int) -> list[int]:
    """`num` ids spread uniformly over `ids` (np.linspace, both ends included); all of them if there are fewer."""
    if num <= 0 or len(ids) <= num:
        return list(ids)
    pos = np.rint(np.linspace(0, len(ids) - 1, num)).astype(int)
    return [ids[p] for p in pos]


def record_frame_ids(record: ReaRecord, num_frames: int = 32) -> list[int]:
    """The frame ids of `record`'s query span [query_start_frame, query_stop_frame] that have an image and a pose,
    sampled uniformly to num_frames."""
    vdir = record.video_path
    if not vdir.is_dir():
        raise DataError(f"Record {record.id!r}: video directory {vdir} does not exist.")
    cdir = record.c2ws_path
    if not cdir.is_dir():
        raise DataError(f"Record {record.id!r}: c2ws directory {cdir} does not exist.")
    posed = _list_poses(str(cdir), cdir.stat().st_mtime)
    span = [i for i, _ in _list_frames(str(vdir), vdir.stat().st_mtime)
            if record.query_start_frame <= i <= record.query_stop_frame]
    avail = [i for i in span if i in posed]  # reconstructions may pose only some frames
    if not avail:
        raise DataError(f"Record {record.id!r}: no frames with a pose in {cdir} among the {len(span)} frames of "
                        f"{vdir} between query_start_frame {record.query_start_frame} and query_stop_frame "
                        f"{record.query_stop_frame}.")
    return sample_uniform(avail, num_frames)


def record_to_clip(record: ReaRecord, num_frames: int = 32, with_depth: bool = False,
                   with_points: bool = True) -> Clip:
    """Load the Clip a record asks about: its query span sampled uniformly to `num_frames`, poses, K, scene cloud.

    Stamps come from the clip's meta.json (next to the video directory) when present, else frame_id / fps with fps
    from record.metadata["fps"] (default 30). Depth is read from <video>/../depth if `with_depth` and present.
    """
    vdir = record.video_path
    ids = record_frame_ids(record, num_frames)
    names = dict(_list_frames(str(vdir), vdir.stat().st_mtime))
    meta = _clip_meta(vdir)
    fps = float(meta.get("fps", record.metadata.get("fps", DEFAULT_FPS)))
    stamp_of = dict(zip(meta.get("frame_ids", []), meta.get("stamps", [])))
    K = check_K(read_matrix(record.K_path, (3, 3)), str(record.K_path))
    depth_dir = vdir.parent / "depth"
    depth_scale = float(meta.get("depth_scale", DEFAULT_DEPTH_SCALE))
    frames = []
    for i in ids:
        pose_path = record.c2ws_path / f"{i}.txt"
        T = check_pose(read_matrix(pose_path, (4, 4)), str(pose_path))
        depth = None
        if with_depth and depth_dir.is_dir():
            depth = load_depth_png(depth_dir / frame_name(i, "png"), depth_scale)
        frames.append(Frame(stamp=float(stamp_of.get(i, i / fps)), image=load_rgb(vdir / names[i]), K=K.copy(),
                            T_world_cam=T, depth=depth))
    if with_points:
        pc = record.pointcloud_path
        if not pc.exists():
            raise DataError(f"Record {record.id!r}: point cloud {pc} does not exist.")
        xyz, rgb = _cached_points(str(pc), pc.stat().st_mtime)
        scene = Scene(points=xyz, colors=rgb, frame_id="map", stamp=frames[-1].stamp)
    else:
        scene = Scene.empty()
    return Clip(frames=tuple(frames), scene=scene)
