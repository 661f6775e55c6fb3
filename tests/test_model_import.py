"""import_llava_video on tiny fake LLaVA-Video checkpoints in both layouts (LLaVA-NeXT and transformers)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from stllm_core.errors import ModelLoadError
from stllm_core.model import load_pretrained, random_clip
from stllm_core.model.loading import import_llava_video
from stllm_core.model.tiny import train_tiny_tokenizer

LM_CFG = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False)


def fake_llava_video(root, layout: str, vision_heads: int):
    torch.manual_seed(1)
    vcfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=vision_heads,
                patch_size=8, image_size=32, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    tower = SiglipVisionModel(SiglipVisionConfig(**vcfg))
    lm = Qwen2ForCausalLM(Qwen2Config(**LM_CFG))
    proj = {"linear_1.weight": torch.randn(32, 32), "linear_1.bias": torch.randn(32),
            "linear_2.weight": torch.randn(32, 32), "linear_2.bias": torch.randn(32)}
    lm_sd = lm.state_dict()
    if layout == "llava-next":
        vis = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()}
        pj = {f"model.mm_projector.{'0' if k.startswith('linear_1') else '2'}.{k.split('.')[-1]}": v
              for k, v in proj.items()}
        lmk = dict(lm_sd)
        config = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava",
                  "mm_vision_tower": "google/siglip-so400m-patch14-384", **LM_CFG}
    else:
        vis = {f"vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()}
        pj = {f"multi_modal_projector.{k}": v for k, v in proj.items()}
        lmk = {("language_model." + k): v for k, v in lm_sd.items()}
        config = {"model_type": "llava_onevision", "vision_config": {"model_type": "siglip_vision_model", **vcfg},
                  "text_config": {"model_type": "qwen2", **LM_CFG}}
    keys = sorted(lmk)
    root.mkdir()
    save_file({**vis, **pj, "model.image_newline": torch.zeros(32), **{k: lmk[k] for k in keys[:10]}},
              str(root / "model-00001-of-00002.safetensors"))
    save_file({k: lmk[k].contiguous() for k in keys[10:]}, str(root / "model-00002-of-00002.safetensors"))
    (root / "config.json").write_text(json.dumps(config))
    train_tiny_tokenizer().save_pretrained(root)
    return tower, lm, proj


@pytest.mark.parametrize("layout,heads", [("llava-next", 1), ("hf", 4)])
def test_import_llava_video(tmp_path, layout, heads):
    tower, lm, proj = fake_llava_video(tmp_path / "src", layout, heads)
    out = import_llava_video(tmp_path / "src", tmp_path / "out", preset="tiny")
    assert (out / "vision" / "model.safetensors").is_file() and (out / "llm" / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["config"]["llm"] == "llm"  # relative: relocatable
    shutil.move(str(out), str(tmp_path / "moved"))
    model, processor = load_pretrained(tmp_path / "moved")
    assert model.vision_tower.config.num_attention_heads == heads
    assert len(model.vision_tower.encoder.layers) == 1  # feature_layer -2 of 2 layers
    ref = tower.state_dict()
    for k, v in model.vision_tower.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    ref = lm.state_dict()
    for k, v in model.language_model.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    for k, v in model.vision_projector.state_dict().items():
        torch.testing.assert_close(v, proj[k], rtol=0, atol=0, msg=k)
    inputs = processor("Where is the mug?", random_clip(4, seed=0), answer="left")
    with torch.no_grad():
        out_ = model(inputs)
    assert torch.isfinite(out_.loss)
    # the saved ST-LLM weights exclude the frozen, path-referenced backbones
    saved = (tmp_path / "moved" / "model.safetensors").stat().st_size
    assert saved < (tmp_path / "moved" / "llm" / "model-00001-of-00002.safetensors").stat().st_size * 20


def test_import_refuses_a_non_llava_directory(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        import_llava_video(tmp_path / "src", tmp_path / "out")
    (tmp_path / "src" / "config.json").write_text("{}")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="No vision tower weights"):
        import_llava_video(tmp_path / "src", tmp_path / "out")
