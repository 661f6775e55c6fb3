"""REA-Sim data set generation: kitchens -> episodes -> rendered EPIC-style clip folders + REA JSON splits.

Output layout::

    <out>/dataset.json               what was generated (seed, sizes, counts, which scenes are val)
    <out>/train.json, <out>/val.json REA records, paths relative to <out>; split by scene (no kitchen in both)
    <out>/clips/<scene_id>_c<k>/     one EPIC-style clip folder per episode (see clip_folder.py), plus
        qa.json                      the clip's REA records (paths relative to the clip folder)
        reasim.json                  ground truth: the kitchen (boxes, items), the action log, final item states

Everything is a pure function of the seed: the same arguments give byte-identical files, whatever `workers` is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from stllm_core.data.clip_folder import write_clip_folder
from stllm_core.data.rea import ReaRecord, make_conversations, write_rea_json
from stllm_core.errors import ConfigError, DataError
from stllm_core.types import Frame, Scene

logger = logging.getLogger(__name__)

VERSION = 2  # 2: per-clip end-of-clip map, reconstruction-like point densities, distinct colours


def scene_id_of(scene_index: int) -> str:
    return f"kitchen_{scene_index:04d}"


def build_kitchen(seed: int, scene_index: int):
    from stllm_core.data.reasim.scene import make_kitchen

    return make_kitchen(scene_id_of(scene_index), np.random.default_rng([seed, scene_index]))


def generate_clip(out_dir: str | Path, seed: int, scene_index: int, clip_index: int, frames: int = 32,
                  size: tuple[int, int] = (320, 240), questions_per_type: int = 4, write_depth: bool = True,
                  image_format: str = "jpg") -> dict[str, Any]:
    """Render one episode into <out_dir>/clips/<scene_id>_c<clip_index> and return its REA records (as dicts, paths
    relative to out_dir) plus counts."""
    from stllm_core.data.reasim.qa import generate_qa
    from stllm_core.data.reasim.render import frame_boxes, intrinsics, render, sample_points
    from stllm_core.data.reasim.scene import Box
    from stllm_core.data.reasim.trajectory import make_episode

    t0 = time.perf_counter()
    width, height = size
    kitchen = build_kitchen(seed, scene_index)
    sid = kitchen.scene_id
    clip_id = f"{sid}_c{clip_index:02d}"
    episode = make_episode(kitchen, np.random.default_rng([seed, scene_index, clip_index]), frames)
    K = intrinsics(width, height)
    out_frames = []
    for i in range(episode.num_frames):
        rgb, depth = render(frame_boxes(kitchen, episode, i), K, episode.poses[i], width, height)
        out_frames.append(Frame(stamp=float(episode.stamps[i]), image=rgb, K=K, T_world_cam=episode.poses[i],
                                depth=depth if write_depth else None))
    # The map the questions see: the kitchen as it is at the end of the clip (items where the episode left them; an
    # item put into a container is hidden, as in the frames), as a robot's map would hold it when the question comes.
    final = [Box(k, k, np.asarray(st.position, float), kitchen.item(k).size.copy(), kitchen.item(k).color)
             for k, st in episode.states[-1].items() if not (st.inside or st.carried)]
    xyz, rgb = sample_points(kitchen.structure + kitchen.furniture + final,
                             np.random.default_rng([seed, scene_index, clip_index, 1_000_003]))
    qas = generate_qa(kitchen, episode, np.random.default_rng([seed, scene_index, clip_index, 1]), questions_per_type)

    rel = Path("clips") / clip_id
    local, shared = [], []
    for k, qa in enumerate(qas):
        common = dict(id=f"{clip_id}_{qa.question_type}_{k:02d}", scene_id=sid,
                      conversations=make_conversations(qa.question, qa.answer), question_type=qa.question_type,
                      query_start_frame=0, query_stop_frame=episode.num_frames - 1,
                      metadata={"dataset": "reasim", "fps": episode.fps, "clip": clip_id, "answer_key": qa.key})
        local.append(ReaRecord(video="frames", pointcloud=f"{sid}_vert.npy", c2ws="c2ws", K="K.txt", **common))
        shared.append(ReaRecord(video=str(rel / "frames"), pointcloud=str(rel / f"{sid}_vert.npy"),
                                c2ws=str(rel / "c2ws"), K=str(rel / "K.txt"), **common).to_dict())
    root = Path(out_dir) / rel
    write_clip_folder(root, out_frames, Scene(points=xyz, colors=rgb), fps=episode.fps, qa_records=local,
                      scene_id=sid, image_format=image_format, write_depth=write_depth, overwrite=True,
                      extra_meta={"source": "reasim", "reasim_version": VERSION, "seed": seed, "clip_id": clip_id})
    truth = {"version": VERSION, "kitchen": kitchen.to_dict(), "episode": episode.to_dict(),
             "size": [width, height]}
    (root / "reasim.json").write_text(json.dumps(truth, indent=1))
    return {"clip_id": clip_id, "scene_id": sid, "records": shared, "frames": episode.num_frames,
            "seconds": time.perf_counter() - t0}


def _generate_clip_star(kwargs: dict[str, Any]) -> dict[str, Any]:
    return generate_clip(**kwargs)


def generate_reasim(out_dir: str | Path, scenes: int = 10, clips_per_scene: int = 10, frames: int = 32,
                    size: tuple[int, int] = (320, 240), questions_per_type: int = 4, seed: int = 0,
                    val_fraction: float = 0.2, write_depth: bool = True, image_format: str = "jpg",
                    workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """Generate a REA-Sim data set (see the module docstring for the layout). Returns a summary with counts and the
    wall time; the same arguments always give identical files.

    scenes: number of kitchens; clips_per_scene: episodes per kitchen; frames: frames per clip (>= 8);
    size: (width, height) pixels; questions_per_type: at most this many questions of each of the 5 REA types per clip;
    val_fraction: share of kitchens (not clips) that go to val.json (at least one when scenes >= 2 and > 0).
    """
    if scenes < 1 or clips_per_scene < 1:
        raise ConfigError(f"Got scenes={scenes}, clips_per_scene={clips_per_scene}; expected both >= 1.")
    if frames < 8:
        raise ConfigError(f"Got {frames!r} for `frames`; expected >= 8 (one pick-and-place needs 8 frames).")
    if len(size) != 2 or min(size) < 16:
        raise ConfigError(f"Got {size!r} for `size`; expected (width, height) >= 16 pixels.")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"Got {val_fraction!r} for `val_fraction`; expected in [0, 1).")
    if questions_per_type < 1:
        raise ConfigError(f"Got {questions_per_type!r} for `questions_per_type`; expected >= 1.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_val = 0 if scenes < 2 or val_fraction == 0 else max(1, int(round(scenes * val_fraction)))
    val_scenes = sorted(int(i) for i in np.random.default_rng([seed, 7]).permutation(scenes)[:n_val])
    jobs = [dict(out_dir=str(out), seed=seed, scene_index=s, clip_index=c, frames=frames, size=tuple(size),
                 questions_per_type=questions_per_type, write_depth=write_depth, image_format=image_format)
            for s in range(scenes) for c in range(clips_per_scene)]
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="clip", desc="REA-Sim")
    results = []
    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1:
        for j in jobs:
            results.append(generate_clip(**j))
            if bar:
                bar.update(1)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            for r in ex.map(_generate_clip_star, jobs):
                results.append(r)
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    seconds = time.perf_counter() - t0
    val_ids = {scene_id_of(s) for s in val_scenes}
    train = [rec for r in results if r["scene_id"] not in val_ids for rec in r["records"]]
    val = [rec for r in results if r["scene_id"] in val_ids for rec in r["records"]]
    write_rea_json(out / "train.json", train)
    write_rea_json(out / "val.json", val)
    counts: dict[str, int] = {}
    for rec in train + val:
        qt = rec["metadata"]["question_type"]
        counts[qt] = counts.get(qt, 0) + 1
    summary = {
        "format": "reasim", "version": VERSION, "seed": seed, "scenes": scenes, "clips_per_scene": clips_per_scene,
        "frames": frames, "size": list(size), "questions_per_type": questions_per_type, "write_depth": write_depth,
        "image_format": image_format, "val_scenes": sorted(val_ids), "clips": len(results),
        "records": {"train": len(train), "val": len(val)}, "question_types": dict(sorted(counts.items())),
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=1))
    if not train:
        raise DataError(f"REA-Sim generated no training records in {out}.")
    logger.info("REA-Sim: %d clips, %d+%d records in %.1f s (%d workers)", len(results), len(train), len(val),
                seconds, workers)
    return {**summary, "seconds": seconds, "workers": workers, "out_dir": str(out)}


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))
