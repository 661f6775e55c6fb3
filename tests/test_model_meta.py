"""A model with the shapes of LLaVA-Video-7B-Qwen2 + the official aligner, on the meta device (no memory)."""

from __future__ import annotations

import torch

from stllm_core.model import STLLMForConditionalGeneration, config_preset
from stllm_core.model.loading import build_language_model, build_vision_tower
from stllm_core.model.processing import ModelInputs


def test_llava_video_7b_shapes_and_parameter_counts():
    cfg = config_preset("llava-video-7b")
    with torch.device("meta"):
        model = STLLMForConditionalGeneration(cfg, build_vision_tower(cfg, torch.bfloat16),
                                              build_language_model(cfg, torch.bfloat16))
    counts = model.num_parameters_per_part()
    print("\nllava-video-7b parameters per part:")
    for name, n in counts.items():
        print(f"  {name:18s} {n / 1e6:10.2f} M  {'trainable' if name in cfg.trainable else 'frozen'}")
    print(f"  {'total':18s} {sum(counts.values()) / 1e9:10.3f} B")
    assert 7.55e9 < counts["language_model"] < 7.7e9  # Qwen2-7B (untied lm_head)
    assert 0.38e9 < counts["vision_tower"] < 0.42e9  # SigLIP so400m, 26 of 27 layers (feature layer -2)
    assert len(model.vision_tower.encoder.layers) == 26
    assert counts["vision_projector"] == 1152 * 3584 + 3584 + 3584 * 3584 + 3584  # LLaVA mlp2x_gelu
    assert 30e6 < counts["aligner"] < 150e6
    # 127 frequencies as the official code (765 features per 3-vector); direction + position: 2 x 765 -> 768, + LN
    assert counts["ray_encoders"] == 2 * (2 * 765 * 768 + 768 + 2 * 768)
    assert model.pooled_grid == 14 and cfg.tokens_per_frame(14) == 196  # 27x27 patches -> 14x14 tokens

    # shapes chain through the whole model for 32 frames at 384x384 (meta tensors: no compute, no memory)
    T, S, P, Q, L = 32, 384, 8192, 20, 300
    dev = torch.device("meta")
    input_ids = torch.zeros(1, L, dtype=torch.long, device=dev)
    inputs = ModelInputs(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        prefix_mask=torch.zeros(1, L, dtype=torch.bool, device=dev),
        pixel_values=torch.empty(1, T, 3, S, S, device=dev, dtype=torch.bfloat16),
        frame_mask=torch.ones(1, T, dtype=torch.bool, device=dev),
        patch_rays=torch.empty(1, T, 14, 14, 6, device=dev), points=torch.empty(1, P, 6, device=dev),
        point_rays=torch.empty(1, P, 6, device=dev), point_mask=torch.ones(1, P, dtype=torch.bool, device=dev),
        question_ids=torch.zeros(1, Q, dtype=torch.long, device=dev),
        question_mask=torch.ones(1, Q, dtype=torch.bool, device=dev),
    )
    assert model.get_image_features(inputs.pixel_values).shape == (1, T, 14, 14, 3584)
    prefix = model.get_prefix_embeds(inputs)
    assert prefix.shape == (1, 32, 3584) and prefix.dtype == torch.bfloat16
