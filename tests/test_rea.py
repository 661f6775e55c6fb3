"""REA records: parsing, validation with a skip report, and record -> Clip loading from a real clip folder."""

import json

import numpy as np
import pytest

from stllm_core.data import QUESTION_TYPES, ClipFolder, ReaRecord, read_rea_json, record_to_clip, write_clip_folder
from stllm_core.data.rea import make_conversations, sample_uniform, strip_placeholders
from stllm_core.errors import DataError
from stllm_core.types import Frame, Scene


@pytest.fixture
def dataset(tmp_path):
    K = np.array([[50.0, 0, 15.5], [0, 50.0, 11.5], [0, 0, 1]])
    frames = []
    for i in range(10):
        T = np.eye(4)
        T[0, 3] = 0.1 * i
        frames.append(Frame(stamp=0.25 * i, image=np.full((24, 32, 3), 10 * i, np.uint8), K=K, T_world_cam=T))
    scene = Scene(points=np.zeros((5, 3), np.float32), colors=np.full((5, 3), 200, np.uint8))
    write_clip_folder(tmp_path / "clips" / "c0", frames, scene, fps=4.0, scene_id="s0",
                      frame_ids=list(range(100, 110)), image_format="png")
    rec = {
        "id": "q1", "scene_id": "s0", "video": "clips/c0/frames", "pointcloud": "clips/c0/s0_vert.npy",
        "c2ws": "clips/c0/c2ws", "K": "clips/c0/K.txt",
        "conversations": make_conversations("Where is the mug?", "on the table, to the left"),
        "metadata": {"dataset": "test", "question_type": "find_my_item", "query_start_frame": 102,
                     "query_stop_frame": 108},
    }
    return tmp_path, rec


def write(tmp_path, rows, name="qa.json"):
    p = tmp_path / name
    p.write_text(json.dumps(rows))
    return p


def test_question_types_are_the_five_rea_types():
    assert QUESTION_TYPES == ("relative_direction", "relative_distance", "find_my_item", "furniture_affordance",
                              "action_planning")


def test_parse_and_round_trip(dataset):
    tmp, rec = dataset
    recs = read_rea_json(write(tmp, [rec]))
    assert len(recs) == 1 and recs.skipped == []
    r = recs[0]
    assert r.question == "Where is the mug?" and r.answer == "on the table, to the left"
    assert r.question_type == "find_my_item" and (r.query_start_frame, r.query_stop_frame) == (102, 108)
    assert r.metadata == {"dataset": "test"}
    assert r.to_dict() == rec
    assert strip_placeholders("<image>\n<pointcloud>\nHi?") == "Hi?"


def test_skip_report_names_each_bad_record(dataset):
    tmp, rec = dataset
    bad_type = {**rec, "id": "q2", "metadata": {**rec["metadata"], "question_type": "counting"}}
    no_conv = {**rec, "id": "q3", "conversations": []}
    no_files = {**rec, "id": "q4", "c2ws": "nowhere/c2ws"}
    not_obj = ["x"]
    no_frames = {**rec, "id": "q5", "metadata": {**rec["metadata"], "query_start_frame": "a"}}
    recs = read_rea_json(write(tmp, [rec, bad_type, no_conv, no_files, not_obj, no_frames, rec]))
    assert [r.id for r in recs] == ["q1"]
    reasons = dict(recs.skipped)
    assert "unknown question_type 'counting'" in reasons["q2"]
    assert "conversations are empty" in reasons["q3"]
    assert "missing c2ws directory" in reasons["q4"] and "nowhere" in reasons["q4"]
    assert "must be a JSON object" in reasons["#4"]
    assert "not integers" in reasons["q5"]
    assert "appears twice" in reasons["q1"]
    with pytest.raises(DataError, match="unknown question_type 'counting'"):
        read_rea_json(write(tmp, [rec, bad_type]), on_error="raise")


def test_malformed_json_raises(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"id": 1,')
    with pytest.raises(DataError, match="not valid JSON"):
        read_rea_json(p)
    with pytest.raises(DataError, match="does not exist"):
        read_rea_json(tmp_path / "none.json")


def test_record_to_clip_samples_query_span(dataset):
    tmp, rec = dataset
    r = read_rea_json(write(tmp, [rec]))[0]
    clip = record_to_clip(r, num_frames=4)
    # frames 102..108 (7 frames) sampled uniformly to 4: positions round(linspace(0, 6, 4)) = 0, 2, 4, 6
    stamps = [f.stamp for f in clip.frames]
    np.testing.assert_allclose(stamps, [0.5, 1.0, 1.5, 2.0])
    assert [int(f.image[0, 0, 0]) for f in clip.frames] == [20, 40, 60, 80]
    np.testing.assert_allclose([f.T_world_cam[0, 3] for f in clip.frames], [0.2, 0.4, 0.6, 0.8])
    assert clip.scene.num_points == 5
    assert len(record_to_clip(r, num_frames=32).frames) == 7  # fewer frames than asked: all of them


def test_record_to_clip_errors(dataset):
    tmp, rec = dataset
    r = ReaRecord.from_dict({**rec, "metadata": {**rec["metadata"], "query_start_frame": 500,
                                                 "query_stop_frame": 600}}, base_dir=tmp)
    with pytest.raises(DataError, match="no frames with a pose .* among the 0 frames .* query_start_frame 500"):
        record_to_clip(r)
    with pytest.raises(DataError, match="query_stop_frame 1 < query_start_frame 5"):
        ReaRecord.from_dict({**rec, "metadata": {**rec["metadata"], "query_start_frame": 5, "query_stop_frame": 1}})


def test_frames_without_pose_are_not_sampled(dataset):
    tmp, rec = dataset
    for i in (103, 104, 105):  # e.g. a reconstruction that could not register these frames
        (tmp / "clips" / "c0" / "c2ws" / f"{i}.txt").unlink()
    r = read_rea_json(write(tmp, [rec]))[0]
    clip = record_to_clip(r, num_frames=8)
    assert [int(f.image[0, 0, 0]) for f in clip.frames] == [20, 60, 70, 80]  # 102, 106, 107, 108


def test_clip_folder_qa(dataset):
    tmp, rec = dataset
    local = {**rec, "video": "frames", "pointcloud": "s0_vert.npy", "c2ws": "c2ws", "K": "K.txt"}
    write(tmp / "clips" / "c0", [local])
    cf = ClipFolder.read(tmp / "clips" / "c0")
    (r,) = cf.read_qa()
    assert r.video_path == tmp / "clips" / "c0" / "frames"
    assert len(record_to_clip(r, 3).frames) == 3


def test_sample_uniform():
    assert sample_uniform(list(range(10)), 3) == [0, 4, 9]  # rint(4.5) = 4 (round half to even)
    assert sample_uniform([1, 2], 5) == [1, 2]
