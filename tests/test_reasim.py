"""REA-Sim: determinism, and every QA answer re-checked with this file's own geometry (not the generator's code)."""

import filecmp
import json
import math
from pathlib import Path

import numpy as np
import pytest

from stllm_core.data import ClipFolder, generate_reasim, read_rea_json, record_to_clip, score_answer
from stllm_core.data.clip_folder import load_depth_png
from stllm_core.errors import ConfigError

ARGS = dict(scenes=2, clips_per_scene=1, frames=12, size=(96, 72), questions_per_type=50, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("reasim")
    summary = generate_reasim(out / "a", **ARGS)
    return out, summary


def all_records(root: Path):
    return read_rea_json(root / "train.json") + read_rea_json(root / "val.json")


def test_layout_split_and_counts(dataset):
    out, summary = dataset
    root = out / "a"
    train, val = read_rea_json(root / "train.json"), read_rea_json(root / "val.json")
    assert train.skipped == [] and val.skipped == [] and len(train) > 0 and len(val) > 0
    assert {r.scene_id for r in train}.isdisjoint({r.scene_id for r in val})  # split by scene
    assert {r.scene_id for r in val} == set(summary["val_scenes"])
    assert set(summary["question_types"]) == {"relative_direction", "relative_distance", "find_my_item",
                                             "furniture_affordance", "action_planning"}
    for clip_dir in sorted((root / "clips").iterdir()):
        cf = ClipFolder.read(clip_dir)
        assert len(cf) == 12 and cf.depth_paths is not None and cf.points[0].shape[0] > 1000
        assert cf.load_frame(0).image.shape == (72, 96, 3)
        assert len(cf.read_qa()) > 0
    rec = train[0]
    clip = record_to_clip(rec, num_frames=6)
    assert len(clip.frames) == 6 and clip.scene.num_points > 1000


def test_deterministic(dataset, tmp_path):
    out, _ = dataset
    generate_reasim(tmp_path / "b", **ARGS)
    a, b = out / "a", tmp_path / "b"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    generate_reasim(tmp_path / "c", **{**ARGS, "scenes": 1, "seed": 4})
    assert (tmp_path / "c" / "train.json").read_bytes() != (a / "train.json").read_bytes()


def test_cli(tmp_path, capsys):
    from stllm_core.data.cli import reasim_main

    argv = ["--out", str(tmp_path / "d"), "--scenes", "1", "--clips-per-scene", "1", "--frames", "8", "--size",
            "64x48", "--questions-per-type", "1", "--workers", "1", "-q", "--png", "--no-depth"]
    assert reasim_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["clips"] == 1 and summary["records"]["train"] == 5
    cf = ClipFolder.read(tmp_path / "d" / "clips" / "kitchen_0000_c00")
    assert cf.frames[0].suffix == ".png" and cf.depth_paths is None
    assert reasim_main(["--out", str(tmp_path / "e"), "--frames", "3", "-q"]) == 2  # ConfigError -> exit status 2
    with pytest.raises(SystemExit):
        reasim_main(["--out", str(tmp_path / "e"), "--size", "320by240"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="`frames`"):
        generate_reasim(tmp_path, **{**ARGS, "frames": 4})
    with pytest.raises(ConfigError, match="`size`"):
        generate_reasim(tmp_path, **{**ARGS, "size": (8, 8)})


# ---------------------------------------------------------------------------------------------------------------------
# Independent geometry: the person is the camera centre, facing its optical axis projected on the floor.


def person(c2ws: Path, frame: int):
    T = np.loadtxt(c2ws / f"{frame}.txt")
    fwd = T[:2, 2] / np.linalg.norm(T[:2, 2])
    return T[:2, 3], fwd


def side(p, fwd, target) -> tuple[str, float]:
    """Direction class by projecting on forward/left axes; also the margin (deg) to the nearest class boundary."""
    v = np.asarray(target[:2]) - p
    x, y = float(v @ fwd), float(v @ np.array([-fwd[1], fwd[0]]))
    ang = math.degrees(math.atan2(y, x))
    margin = min(abs(abs(ang) - 45), abs(abs(ang) - 135))
    if x >= abs(y):
        return "front", margin
    if -x >= abs(y):
        return "behind", margin
    return ("left" if y > 0 else "right"), margin


def footprint_dist(p, box) -> float:
    c, s = np.asarray(box["center"][:2]), np.asarray(box["size"][:2])
    nearest = np.clip(p, c - s / 2, c + s / 2)
    return float(np.linalg.norm(p - nearest))


def objects(truth) -> dict:
    """Named targets: furniture by kind (unique kinds only) and items by kind at their initial place."""
    kinds = [b["kind"] for b in truth["kitchen"]["furniture"]]
    out = {b["kind"]: b for b in truth["kitchen"]["furniture"] if kinds.count(b["kind"]) == 1}
    for it in truth["kitchen"]["items"]:
        out[it["kind"]] = {"center": it["position"], "size": it["size"]}
    return out


DIR_WORDS = {"left": "to the left", "right": "to the right", "front": "in front", "behind": "behind"}


def test_every_answer_agrees_with_independent_geometry(dataset):
    root = dataset[0] / "a"
    recs = all_records(root)
    checked = {t: 0 for t in ("relative_direction", "relative_distance", "find_my_item", "furniture_affordance",
                              "action_planning")}
    for r in recs:
        clip = root / "clips" / r.metadata["clip"]
        truth = json.loads((clip / "reasim.json").read_text())
        objs = objects(truth)
        acts = truth["episode"]["actions"]
        key, ans = r.metadata["answer_key"], r.answer
        c2ws = clip / "c2ws"
        assert score_answer(r.question_type, ans, ans)
        if r.question_type == "relative_direction":
            if key["form"] == "two_moments":  # one target, two moments (the person may have moved and turned)
                labs = [side(*person(c2ws, f), objs[key["object"]]["center"]) for f in key["frames"]]
                assert all(m >= 10 - 1e-6 for _, m in labs)
                assert ans.startswith("yes" if labs[0][0] == labs[1][0] else "no")
                assert DIR_WORDS[labs[0][0]] in ans and DIR_WORDS[labs[1][0]] in ans
                checked["two_moments"] = checked.get("two_moments", 0) + 1
                continue
            f0, f1 = key["frames"]
            p0, fw0 = person(c2ws, f0)
            p1, fw1 = person(c2ws, f1)
            assert np.allclose(p0, p1) and np.allclose(fw0, fw1)  # the person stands still during the action
            names = [key["object"]] if key["form"] == "single" else key["objects"]
            labels = []
            for n in names:
                lab, margin = side(p0, fw0, objs[n]["center"])
                assert margin >= 10 - 1e-6 and lab in DIR_WORDS
                labels.append(lab)
                assert n in r.question
            if key["form"] == "single":
                assert ans == DIR_WORDS[labels[0]]
            else:
                assert ans.startswith("yes" if labels[0] == labels[1] else "no")
        elif r.question_type == "relative_distance":
            if key["form"] == "change":
                d = [footprint_dist(person(c2ws, f)[0], objs[key["object"]]) for f in key["frames"]]
                ch = d[1] - d[0]
                expect = "about the same distance" if abs(ch) < 0.2 else ("closer" if ch < -0.5 else "farther")
                assert abs(ch) < 0.2 or abs(ch) > 0.5
                assert ans == expect
            elif key["form"] == "closest_action":  # over every pick/put not of the object itself, from the log
                moments = [a for a in acts if a["verb"] in ("pick up", "put down") and a["item"] != key["object"]]
                d = [footprint_dist(person(c2ws, a["start_frame"])[0], objs[key["object"]]) for a in moments]
                k = int(np.argmin(d))
                assert sorted(d)[1] - d[k] > 0.5
                assert ans == f"while {moments[k]['text']}"
                assert moments[k]["text"] in r.question or r.question.startswith("During")  # options list it
                checked["closest_action"] = checked.get("closest_action", 0) + 1
            else:
                p, _ = person(c2ws, key["frames"][0])
                da, db = (footprint_dist(p, objs[n]) for n in key["objects"])
                assert abs(da - db) > 0.5
                assert ans == f"the {key['objects'][0] if da < db else key['objects'][1]}"
        elif r.question_type == "find_my_item":
            item = key["item"]
            final = truth["episode"]["final_items"][item]
            puts = [a for a in acts if a["verb"] == "put down" and a["item"] == item]
            if puts:  # where the action log says the item was put last
                assert puts[-1]["furniture"] == final["support"]
                assert key["moved"]
            sup = next(b for b in truth["kitchen"]["furniture"] if b["name"] == final["support"])
            assert f"the {sup['kind']}" in ans
            last = int(r.query_stop_frame)
            p, fw = person(c2ws, last)
            if key["direction"] is not None:
                lab, margin = side(p, fw, final["position"])
                assert margin >= 10 - 1e-6 and ans.endswith({"left": "to your left", "right": "to your right",
                                                             "front": "in front of you",
                                                             "behind": "behind you"}[lab])
            if sup["kind"] in ("fridge", "microwave", "cabinet"):  # hidden inside: at the container centre
                assert np.allclose(final["position"], sup["center"], atol=1e-5) and ans.startswith("in the")
            else:  # resting on the top surface, inside its footprint
                it = next(i for i in truth["kitchen"]["items"] if i["kind"] == item)
                top = sup["center"][2] + sup["size"][2] / 2
                assert final["position"][2] == pytest.approx(top + it["size"][2] / 2, abs=1e-5)
                assert footprint_dist(np.asarray(final["position"][:2]), sup) == 0
        elif r.question_type == "furniture_affordance":
            opts = key["options"]
            assert len(set(opts)) == len(opts) == 3 and key["answer"] in opts and ans == f"the {key['answer']}"
            assert all(f"the {o}" in r.question for o in opts)
            if key["form"] == "next":  # the next pick/put after the named action, from the log
                later = [a for a in acts if a["verb"] in ("pick up", "put down")
                         and a["start_frame"] > key["after_frames"][1]]
                assert later[0]["furniture_kind"] == key["answer"]
        else:  # action_planning
            item = key["item"]
            final = truth["episode"]["final_items"][item]
            sup = next(b for b in truth["kitchen"]["furniture"] if b["name"] == final["support"])
            assert sup["kind"] == key["source_kind"] != key["target_kind"]
            assert any(b["kind"] == key["target_kind"] for b in truth["kitchen"]["furniture"])
            assert ans.split(",")[0] in (f"pick up the {item} from the {sup['kind']}",
                                        f"take the {item} out of the {sup['kind']}")
        checked[r.question_type] += 1
    assert all(n > 0 for n in checked.values()) and len(checked) == 7, checked


def test_depth_lies_on_the_scene_boxes(dataset):
    """Back-project frame 0's depth with K and the c2w pose: every point must lie on a box surface of reasim.json."""
    root = dataset[0] / "a"
    clip = sorted((root / "clips").iterdir())[0]
    truth = json.loads((clip / "reasim.json").read_text())
    cf = ClipFolder.read(clip)
    boxes = truth["kitchen"]["structure"] + truth["kitchen"]["furniture"] + [
        {"center": i["position"], "size": i["size"]} for i in truth["kitchen"]["items"]]
    C = np.array([b["center"] for b in boxes])
    H = np.array([b["size"] for b in boxes]) / 2
    for i in (0, len(cf) - 1):
        depth = load_depth_png(cf.depth_paths[i], cf.depth_scale)
        v, u = np.nonzero(np.isfinite(depth))
        z = depth[v, u]
        pts_cam = np.stack([(u - cf.K[0, 2]) / cf.K[0, 0] * z, (v - cf.K[1, 2]) / cf.K[1, 1] * z, z], 1)
        T = cf.poses[i]
        pts = pts_cam @ T[:3, :3].T + T[:3, 3]
        q = np.abs(pts[:, None, :] - C[None]) - H[None]  # signed distance to each box
        sdf = np.linalg.norm(np.maximum(q, 0), axis=2) + np.minimum(q.max(axis=2), 0)
        if i > 0:  # the last frame may show a carried item in the hand: allow a few pixels off the static boxes
            assert np.mean(np.abs(sdf).min(axis=1) < 0.004) > 0.9
        else:
            assert np.abs(sdf).min(axis=1).max() < 0.004
        assert depth.shape == (72, 96) and np.isfinite(depth).mean() > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# What the model receives holds what the answers need.

@pytest.fixture(scope="module")
def derivable(tmp_path_factory):
    """16 kitchens x 1 clip of 12 frames, as the default model's recipe generates them (>= 60 questions per type)."""
    out = tmp_path_factory.mktemp("reasim_oracle")
    generate_reasim(out, scenes=16, clips_per_scene=1, frames=12, size=(128, 96), questions_per_type=4, seed=11,
                    val_fraction=0.0, write_depth=False)
    return out


def smol_processor():
    """The processor of the default model's recipe (training/configs/stllm-smol.yaml): what it receives."""
    import yaml

    from stllm_core.model import config_preset
    from stllm_core.model.processing import STLLMProcessor
    from stllm_core.model.tiny import train_tiny_tokenizer

    recipe = yaml.safe_load((Path(__file__).parents[1] / "training/configs/stllm-smol.yaml").read_text())["model"]
    return STLLMProcessor(config_preset(recipe["base"], **recipe["overrides"]), train_tiny_tokenizer())


def test_the_map_is_the_scene_at_the_end_of_the_clip(derivable):
    """Moved items are in the cloud where the episode left them (none where they were picked up); an item put into a
    container is not in it; the cap of the default model keeps a voxel of every visible item."""
    from stllm_core.model.processing import voxelize

    cap = smol_processor().config.max_points
    for clip_dir in sorted((derivable / "clips").iterdir()):
        truth = json.loads((clip_dir / "reasim.json").read_text())
        cf = ClipFolder.read(clip_dir)
        xyz, rgb = cf.points
        start = {i["kind"]: i for i in truth["kitchen"]["items"]}
        for kind, st in truth["episode"]["final_items"].items():
            size = np.asarray(start[kind]["size"])
            own = np.all(rgb == np.asarray(start[kind]["color"], np.uint8), axis=1)

            def inside(centre, size=size, own=own, xyz=xyz):  # points of the item's colour within its box
                return own & np.all(np.abs(xyz - np.asarray(centre)) <= size / 2 + 1e-4, axis=1)

            if st["inside"]:
                assert not inside(st["position"]).any(), kind
                continue
            assert inside(st["position"]).sum() >= 24, kind
            moved = np.linalg.norm(np.subtract(start[kind]["position"], st["position"])) > 0.3
            if moved:
                assert not inside(start[kind]["position"]).any(), kind
        v, c = voxelize(xyz.astype(np.float64), rgb.astype(np.float64), 0.06, cap)
        for kind, st in truth["episode"]["final_items"].items():
            if not st["inside"]:
                col = np.asarray(start[kind]["color"], float)
                assert (np.linalg.norm(c - col, axis=1) < 30).any(), (clip_dir.name, kind)


def test_colours_name_their_object():
    """A furniture colour jittered by up to JITTER per channel stays nearest its own kind's base colour."""
    from stllm_core.data.reasim.scene import DARK_TILE, FLOOR_COLORS, FURNITURE_COLORS, ITEMS, JITTER, WALL_COLORS

    others = [np.array(c, float) for _, c in ITEMS.values()] + [np.array(c, float) for c in WALL_COLORS]
    others += [np.array(c, float) * s for c in FLOOR_COLORS for s in (1.0, DARK_TILE)]
    worst = JITTER * math.sqrt(3)
    for kind, c in FURNITURE_COLORS.items():
        c = np.array(c, float)
        for other_kind, o in FURNITURE_COLORS.items():
            if other_kind != kind:
                assert np.linalg.norm(c - np.array(o, float)) > 2 * worst, (kind, other_kind)
        assert min(np.linalg.norm(c - o) for o in others) > 2 * worst, kind
