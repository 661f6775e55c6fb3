"""REA records -> model inputs for fine-tuning and evaluation, through the robot's own STLLMProcessor.

The query span of each record is sampled uniformly to the model's `num_frames` (np.linspace over the frames between
query_start_frame and query_stop_frame, as the paper does) by `stllm_core.data.record_to_clip`; the question (REA
placeholders stripped) and the gpt answer go through `processor(question, clip, answer=...)`, the same prompt template
the robot uses, which also builds the answer-only labels.

Bad records never vanish silently: records rejected when the JSON is read (missing files, unknown question type, empty
conversations, malformed fields) and samples that fail to load later are counted and listed with their record id
(`DatasetReport`); `on_error="raise"` turns the first one into a DataError naming the record.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stllm_core.config import check, check_choice
from stllm_core.errors import DataError, InputError, STLLMError
from stllm_core.types import Clip, Frame, Scene

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")
ABLATIONS = ("none", "no-video", "no-points", "no-position", "blind")


@dataclass
class DataConfig:
    """Where the REA records are and how they are read.

    train / val: REA JSON files (official REA or REA-Sim `train.json` / `val.json`); relative paths inside resolve
        against the JSON's directory unless `root` is given.
    num_frames: frames sampled per query span; None = what the model wants (processor/model config).
    on_error: "skip" (count and list bad records, go on) or "raise" (stop at the first, naming it).
    cache_clips: decoded clips kept in memory (LRU, keyed by video + query span + frames; REA asks several questions
        about one span); 0 disables the cache.
    with_points: load the scene point cloud (False: empty scene, e.g. for a video-only ablation).
    limit: use only the first `limit` records (0 = all).
    ablation: inputs removed from every sample (none | no-video | no-points | no-position | blind, see `ablate`):
        "blind" trains the question-only baseline, the same model and recipe with nothing of the scene.
    """

    train: str = ""
    val: str = ""
    root: str | None = None
    num_frames: int | None = None
    on_error: str = "skip"
    cache_clips: int = 0
    with_points: bool = True
    limit: int = 0
    ablation: str = "none"

    def __post_init__(self):
        check_choice("data.on_error", self.on_error, ON_ERROR)
        check_choice("data.ablation", self.ablation, ABLATIONS)
        check(self.num_frames is None or (isinstance(self.num_frames, int) and self.num_frames >= 1),
              "data.num_frames", self.num_frames, "null or an int >= 1")
        check(isinstance(self.cache_clips, int) and self.cache_clips >= 0, "data.cache_clips", self.cache_clips,
              "an int >= 0")
        check(isinstance(self.limit, int) and self.limit >= 0, "data.limit", self.limit, "an int >= 0 (0 = all)")


@dataclass
class DatasetReport:
    """Counts of what was used and what was left out (with record ids and reasons)."""

    path: str
    num_records: int = 0
    skipped_on_read: list[tuple[str, str]] = field(default_factory=list)
    failed_on_load: dict[str, str] = field(default_factory=dict)  # record id -> reason (each counted once)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_on_read) + len(self.failed_on_load)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "num_records": self.num_records, "num_skipped": self.num_skipped,
                "skipped_on_read": [list(x) for x in self.skipped_on_read],
                "failed_on_load": [[k, v] for k, v in self.failed_on_load.items()]}

    def summary(self) -> str:
        s = f"{self.path}: {self.num_records} records usable, {self.num_skipped} skipped"
        first = self.skipped_on_read[:1] or list(self.failed_on_load.items())[:1]
        return s + (f" (first: {first[0][0]}: {first[0][1]})" if first else "")


@dataclass(frozen=True)
class SkippedSample:
    """Returned by READataset.__getitem__ in place of inputs when a record fails to load and on_error="skip"."""

    index: int
    record_id: str
    reason: str


def ablate(clip: Clip, mode: str) -> Clip:
    """Remove inputs for ablations (frame count, stamps and shapes stay):
    no-video = black frames (poses kept); no-points = empty scene; no-position = every camera centre moved to the
    first camera's (orientations kept: where the person stood is lost, where they looked is not);
    blind = black frames, no points and every pose the first one: what the question alone says."""
    check_choice("ablation", mode, ABLATIONS)
    frames, scene = clip.frames, clip.scene
    if mode in ("no-position", "blind"):
        t0 = np.asarray(frames[0].T_world_cam, np.float64)
        poses = []
        for f in frames:
            T = np.array(f.T_world_cam, np.float64)
            T[:3, 3] = t0[:3, 3]
            poses.append(t0 if mode == "blind" else T)
        frames = tuple(Frame(f.stamp, f.image, f.K, T, f.depth) for f, T in zip(frames, poses))
    if mode in ("no-video", "blind"):
        frames = tuple(Frame(f.stamp, np.zeros_like(f.image), f.K, f.T_world_cam, None) for f in frames)
    if mode in ("no-points", "blind"):
        scene = Scene.empty(scene.frame_id)
    return Clip(frames=frames, scene=scene)


class READataset:
    """A map-style dataset of REA records producing `ModelInputs` (with answer labels when `with_labels`).

    `processor` is the model's STLLMProcessor; `num_frames` defaults to processor.num_frames or
    processor.config.num_frames. Items are ModelInputs, or SkippedSample when loading fails and on_error="skip"
    (the collate function drops those and the trainer counts them).
    """

    def __init__(self, path: str | Path, processor: Any, config: DataConfig | None = None, *,
                 with_labels: bool = True, ablation: str | None = None):
        from stllm_core.data import read_rea_json

        self.config = config or DataConfig()
        ablation = self.config.ablation if ablation is None else ablation
        check_choice("ablation", ablation, ABLATIONS)
        self.processor = processor
        self.with_labels = with_labels
        self.ablation = ablation
        self.path = Path(path)
        self.records = read_rea_json(self.path, on_error=self.config.on_error, root=self.config.root)
        skipped = list(self.records.skipped)
        if self.config.limit:
            self.records = self.records[: self.config.limit]
        self.report = DatasetReport(str(self.path), len(self.records), skipped)
        if skipped:
            log.warning("%s", self.report.summary())
        self.num_frames = self.config.num_frames or _processor_num_frames(processor)
        self._cache: OrderedDict[tuple, Clip] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.records)

    def clip(self, index: int) -> Clip:
        """The (possibly cached) Clip of record `index`, ablated as configured."""
        from stllm_core.data import record_to_clip

        rec = self.records[index]
        key = (str(rec.video_path), rec.query_start_frame, rec.query_stop_frame, str(rec.pointcloud_path),
               self.num_frames, self.config.with_points)
        with self._lock:
            clip = self._cache.get(key)
            if clip is not None:
                self._cache.move_to_end(key)
        if clip is None:
            clip = record_to_clip(rec, num_frames=self.num_frames, with_points=self.config.with_points)
            if self.config.cache_clips:
                with self._lock:
                    self._cache[key] = clip
                    while len(self._cache) > self.config.cache_clips:
                        self._cache.popitem(last=False)
        return ablate(clip, self.ablation) if self.ablation != "none" else clip

    def __getitem__(self, index: int):
        rec = self.records[index]
        try:
            clip = self.clip(index)
            answer = rec.answer if self.with_labels else None
            if self.with_labels and not answer:
                raise DataError(f"Record {rec.id!r} has no gpt answer to train on.")
            return self.processor(rec.question, clip, answer=answer)
        except (STLLMError, OSError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}"
            if self.config.on_error == "raise":
                raise DataError(f"{self.path}: record {rec.id!r} (index {index}) failed to load: {reason}") from e
            if rec.id not in self.report.failed_on_load:
                log.warning("%s: skipping record %r: %s", self.path, rec.id, reason)
            self.report.failed_on_load[rec.id] = reason
            return SkippedSample(index, rec.id, reason)


def _processor_num_frames(processor: Any) -> int:
    for obj in (processor, getattr(processor, "config", None)):
        n = getattr(obj, "num_frames", None)
        if isinstance(n, int) and n > 0:
            return n
    raise InputError("Cannot tell how many frames the model wants: the processor has no num_frames; "
                     "set data.num_frames in the training config.")


def collate_or_skip(items: Sequence[Any], pad_token_id: int = 0) -> tuple[Any | None, list[SkippedSample]]:
    """Right-padded batch of the ModelInputs among `items` (None if all failed) and the SkippedSamples left out."""
    from stllm_core.model import collate

    good = [x for x in items if not isinstance(x, SkippedSample)]
    bad = [x for x in items if isinstance(x, SkippedSample)]
    return (collate(good, pad_token_id=pad_token_id) if good else None), bad


_SMOKE_QA = {
    "relative_direction": ("Is the fridge to my left or to my right?", ("The fridge is to your left.",
                                                                         "The fridge is to your right.")),
    "relative_distance": ("Did I move closer to the oven?", ("You moved closer to the oven.",
                                                             "You moved away from the oven.")),
    "find_my_item": ("Where did I leave the mug?", ("The mug is on the counter to your left.",
                                                    "The mug is behind you, next to the sink.")),
    "furniture_affordance": ("Which object will I use next: hob, microwave or sink?", ("The microwave.", "The sink.")),
    "action_planning": ("What should I do next to make tea?", ("Fill the kettle at the sink.",
                                                              "Put the kettle on the hob.")),
}


def write_smoke_rea(out_dir: str | Path, num_clips: int = 4, frames_per_clip: int = 6, seed: int = 0) -> Path:
    """A small REA-format data set of random clips (stllm_core.model.random_clip) with one question per type each:
    `<out_dir>/clip_XX/` EPIC-style folders + `<out_dir>/train.json`. For smoke tests of the training/eval plumbing
    where the REA-Sim generator is not wanted; the answers follow the clip index, so a model can fit them."""
    from stllm_core.data import make_conversations, write_clip_folder, write_rea_json
    from stllm_core.model import random_clip

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for c in range(num_clips):
        clip = random_clip(frames_per_clip, seed=seed + c)
        name = f"clip_{c:02d}"
        write_clip_folder(out / name, clip.frames, clip.scene, scene_id=f"S{c:02d}", overwrite=True)
        for qtype, (question, answers) in _SMOKE_QA.items():
            records.append({
                "id": f"{name}_{qtype}", "scene_id": f"S{c:02d}", "video": f"{name}/frames",
                "pointcloud": f"{name}/S{c:02d}_vert.npy", "c2ws": f"{name}/c2ws", "K": f"{name}/K.txt",
                "conversations": make_conversations(question, answers[c % 2]),
                "metadata": {"dataset": "smoke", "question_type": qtype, "query_start_frame": 0,
                             "query_stop_frame": frames_per_clip - 1},
            })
    return write_rea_json(out / "train.json", records)
