"""CPU fine-tuning of the tiny model: loss falls, export loads, resume is exact, LoRA merges, bad data is counted."""

import json
import math
from pathlib import Path

import pytest
import torch

from stllm_core.errors import ConfigError, DataError
from training import train as tr
from training.data import DataConfig, READataset, SkippedSample

ALL_PARTS = ["vision_tower", "vision_projector", "point_encoder", "ray_encoders", "aligner", "language_model"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A tiny REA-Sim split (the data helper's generator): 3 training kitchens, ~15 questions, 8 frames of 64x48."""
    from stllm_core.data import generate_reasim

    out = tmp_path_factory.mktemp("reasim")
    generate_reasim(out, scenes=4, clips_per_scene=1, frames=8, size=(64, 48), questions_per_type=1, seed=0,
                    write_depth=False)
    return out / "train.json"


def _cfg(data, out, **train):
    t = {"lr": 3e-3, "grad_accum": 1, "batch_size": 2, "max_steps": 8, "warmup_ratio": 0.1, "save_every": 0,
         "val_loss_limit": 4, **train}
    return tr.RunConfig.from_dict({"model": {"base": "tiny"}, "data": {"train": str(data), "cache_clips": 32},
                                   "train": t, "out_dir": str(out)})


def test_loss_decreases_and_export_loads(smoke, tmp_path):
    from stllm_core.model import load_pretrained

    cfg = _cfg(smoke, tmp_path / "run", trainable=ALL_PARTS, max_steps=10)
    cfg.data.val = str(smoke.parent / "val.json")
    res = tr.train(cfg, progress=False)
    assert res.steps == 10 and len(res.losses) == 10 and all(math.isfinite(x) for x in res.losses)
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < first - 0.2, res.losses
    assert res.val_loss is not None and math.isfinite(res.val_loss)
    # The exported directory is a normal model directory with a model card.
    model, processor = load_pretrained(res.export_dir)
    card = (res.export_dir / "README.md").read_text()
    n = len(json.loads(smoke.read_text()))
    assert "optimizer steps: 10" in card and f"{n} usable records" in card and "validation loss" in card
    log_file = tmp_path / "run" / "train_log.jsonl"
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 11))
    assert list((tmp_path / "run" / "tb").iterdir()), "no TensorBoard events written"
    # Exported weights = trained weights: the loss on a training sample matches the run's model.
    ds = READataset(smoke, processor, DataConfig())
    with torch.no_grad():
        loss = model(ds[0]).loss
    assert math.isfinite(float(loss)) and float(loss) < res.losses[0]


def test_resume_is_exact(smoke, tmp_path):
    kw = dict(batch_size=1, grad_accum=2, max_steps=5, save_every=2, lr=1e-3, deterministic=True)
    full = tr.train(_cfg(smoke, tmp_path / "full", **kw), progress=False, export=False)
    part1 = tr.train(_cfg(smoke, tmp_path / "split", **kw), stop_after=3, progress=False, export=False)
    assert part1.steps == 3 and tr.list_checkpoints(tmp_path / "split")[-1].name == "step_00000003"
    part2 = tr.train(_cfg(smoke, tmp_path / "split", **kw), resume=True, progress=False, export=False)
    assert part2.steps == 5 and part2.samples == full.samples
    assert part1.losses + part2.losses == full.losses  # bit-for-bit
    from safetensors.torch import load_file

    a = load_file(str(tr.list_checkpoints(tmp_path / "full")[-1] / "trainable.safetensors"))
    b = load_file(str(tr.list_checkpoints(tmp_path / "split")[-1] / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # keep_last=2 pruned older checkpoints; a fresh run refuses to overwrite them.
    assert [p.name for p in tr.list_checkpoints(tmp_path / "full")] == ["step_00000004", "step_00000005"]
    with pytest.raises(ConfigError, match="--resume"):
        tr.train(_cfg(smoke, tmp_path / "full", **kw), progress=False)


def test_lora_trains_adapters_and_export_merges(smoke, tmp_path):
    from stllm_core.model import load_pretrained

    cfg = _cfg(smoke, tmp_path / "lora", max_steps=2, trainable=["aligner"])
    cfg.lora = tr.LoraSection(enabled=True, r=4, alpha=8, dropout=0.0)
    model, processor = tr.build_base(cfg.model)
    model = tr.prepare_model(model, cfg)
    names = [n for n, _ in tr.trainable_named_parameters(model)]
    assert any("lora_A" in n for n in names) and all(n.startswith(("aligner.", "language_model.")) for n in names)
    assert not any(n.startswith("language_model.") and "lora_" not in n for n in names)
    res = tr.train(cfg, progress=False)
    loaded, _ = load_pretrained(res.export_dir)
    assert not any("lora" in k for k in loaded.state_dict())
    assert "LoRA: r=4" in (res.export_dir / "README.md").read_text()


def test_key_term_loss_alone_then_with_the_lm_and_a_blind_baseline(smoke, tmp_path):
    """The key-term loss alone trains the prefix without an LM pass (the LM's weights get no gradient) and exports a
    model that a second run (model.base) continues with both losses; the question-only (blind) run trains on the same
    records with nothing of the scene, which the logged answers' key terms do not need."""
    from safetensors.torch import load_file

    from training.aux import SLOTS, key_terms

    assert key_terms("no, the fridge was to the left and the mug was behind") == [
        2, 1 + SLOTS["direction"].index("left"), 1 + SLOTS["direction2"].index("behind"), 0,
        1 + SLOTS["furniture"].index("fridge"), 1 + SLOTS["item"].index("mug"), 0]
    s1 = tr.train(_cfg(smoke, tmp_path / "s1", max_steps=4, lm_loss=False, aux_loss=1.0), progress=False)
    logged = [json.loads(line) for line in (tmp_path / "s1" / "train_log.jsonl").read_text().splitlines()]
    assert all("aux_loss" in r and "lm_loss" not in r for r in logged)
    ckpt = load_file(str(tr.list_checkpoints(tmp_path / "s1")[-1] / "trainable.safetensors"))
    assert any(k.startswith("aux_head.") for k in ckpt) and not any(".language_model." in k for k in ckpt)
    cfg = _cfg(smoke, tmp_path / "s2", max_steps=2, aux_loss=0.5)
    cfg.model = tr.ModelSection(base=str(s1.export_dir))
    s2 = tr.train(cfg, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "s2" / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["lm_loss"]) and math.isfinite(r["aux_loss"]) for r in logged)
    assert s2.export_dir is not None and not any(k.startswith("aux_head") for k in
                                                 load_file(str(s2.export_dir / "model.safetensors")))
    cfg = _cfg(smoke, tmp_path / "blind", max_steps=2)
    cfg.data.ablation = "blind"
    assert math.isfinite(tr.train(cfg, progress=False).losses[-1])
    with pytest.raises(ConfigError, match="train.lm_loss"):
        _cfg(smoke, tmp_path / "x", lm_loss=False)  # nothing to train
    with pytest.raises(ConfigError, match="data.ablation"):
        tr.RunConfig.from_dict({"data": {"ablation": "deaf"}})


def test_bf16_autocast_and_gradient_checkpointing(smoke, tmp_path):
    from stllm_core.model import load_pretrained

    cfg = _cfg(smoke, tmp_path / "bf16", max_steps=1, batch_size=1, precision="bf16", gradient_checkpointing=True,
               trainable=["aligner", "language_model"])
    cfg.model.dtype = "bfloat16"
    model = tr.prepare_model(tr.build_base(cfg.model)[0], cfg)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}  # fp32 master weights, frozen parts in bf16
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.language_model.modules())
    res = tr.train(cfg, progress=False)
    assert math.isfinite(res.losses[0])
    assert load_pretrained(res.export_dir)[0].config.trainable == ("aligner", "language_model")


def test_bad_records_are_counted_with_ids(smoke, tmp_path):
    from stllm_core.model import build_tiny

    _, processor = build_tiny()
    records = json.loads(smoke.read_text())
    good = records[0]
    missing = dict(good, id="missing-K", K="nowhere/K.txt")
    unknown = dict(good, id="bad-type", metadata=dict(good["metadata"], question_type="telepathy"))
    empty = dict(good, id="no-talk", conversations=[])
    corrupt_dir = tmp_path / "broken"
    corrupt_dir.mkdir()
    (corrupt_dir / "frame_0000000000.jpg").write_bytes(b"not a jpeg")
    corrupt = dict(good, id="corrupt-frame", video=str(corrupt_dir))
    path = tmp_path / "mixed.json"
    for r in (good, missing, unknown, empty, corrupt):
        for k in ("video", "pointcloud", "c2ws", "K"):
            if not r[k].startswith("/"):
                r[k] = str(smoke.parent / r[k])
    path.write_text(json.dumps([good, missing, unknown, empty, corrupt]))

    ds = READataset(path, processor, DataConfig())
    skipped = dict(ds.report.skipped_on_read)
    assert set(skipped) == {"missing-K", "bad-type", "no-talk"}
    assert "K file" in skipped["missing-K"] and "telepathy" in skipped["bad-type"]
    assert len(ds) == 2
    item = ds[1]
    assert isinstance(item, SkippedSample) and item.record_id == "corrupt-frame"
    assert ds.report.num_skipped == 4 and "corrupt-frame" in json.dumps(ds.report.as_dict())

    with pytest.raises(DataError, match="missing-K"):
        READataset(path, processor, DataConfig(on_error="raise"))
    path2 = tmp_path / "only_corrupt.json"
    path2.write_text(json.dumps([good, corrupt]))
    with pytest.raises(DataError, match="corrupt-frame"):
        READataset(path2, processor, DataConfig(on_error="raise"))[1]
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        READataset(tmp_path / "bad.json", processor, DataConfig())

    # Training over the mixed file skips the corrupt record and reports it.
    res = tr.train(_cfg(path, tmp_path / "mixed", batch_size=1, max_steps=3), progress=False)
    assert res.skipped == {"corrupt-frame": res.skipped["corrupt-frame"]}
    data = json.loads((res.export_dir / "training.json").read_text())
    assert {r[0] for r in data["data"]["skipped_on_read"]} == {"missing-K", "bad-type", "no-talk"}


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="learning_rate"):
        tr.RunConfig.from_dict({"train": {"learning_rate": 1e-4}})
    with pytest.raises(ConfigError, match="train.precision"):
        tr.RunConfig.from_dict({"train": {"precision": "int3"}})
    with pytest.raises(ConfigError, match="train.trainable"):
        tr.RunConfig.from_dict({"train": {"trainable": ["everything"]}})
    with pytest.raises(ConfigError, match="data.on_error"):
        tr.RunConfig.from_dict({"data": {"on_error": "ignore"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        tr.RunConfig.load(bad)


def test_cli_runs_shipped_config(smoke, tmp_path, capsys):
    config = Path(tr.__file__).parent / "configs" / "tiny.yaml"
    rc = tr.main(["--config", str(config), "--train-data", str(smoke), "--out", str(tmp_path / "o"),
                  "--max-steps", "2", "--no-progress"])
    assert rc == 0 and "done: 2 steps" in capsys.readouterr().out
    assert (tmp_path / "o" / "model" / "model.safetensors").is_file()
    assert tr.main(["--config", str(tmp_path / "none.yaml")]) == 2
    # a resumed run may change the batch size: it continues at the same sample position
    rc = tr.main(["--config", str(config), "--train-data", str(smoke), "--out", str(tmp_path / "o"), "--resume",
                  "--max-steps", "3", "--batch-size", "1", "--no-progress"])
    assert rc == 0 and "done: 3 steps" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["samples"] == log[-2]["samples"] + 1 and log[-1]["step"] == 3
    assert tr.main(["--config", str(config), "--train-data", str(smoke), "--out", str(tmp_path / "b"),
                    "--batch-size", "0", "--no-progress"]) == 2
