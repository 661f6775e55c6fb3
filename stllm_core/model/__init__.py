"""The ST-LLM model: configuration, modeling, processing (prompt + inputs), save/load, and a tiny random model.

    from stllm_core.model import build_tiny, random_clip
    model, processor = build_tiny(seed=0)
    inputs = processor("Where is the mug?", random_clip(4))
    out = model(inputs)  # .logits (1, L, vocab)
"""

from stllm_core.model.configuration import PARTS, PRESETS, STLLMConfig, config_preset
from stllm_core.model.loading import build_model, load_pretrained, save_pretrained, wheel_backbone_dir
from stllm_core.model.modeling import STLLMForConditionalGeneration, STLLMOutput
from stllm_core.model.processing import ModelInputs, STLLMProcessor, collate
from stllm_core.model.tiny import build_tiny, random_clip

__all__ = [
    "PARTS",
    "PRESETS",
    "ModelInputs",
    "STLLMConfig",
    "STLLMForConditionalGeneration",
    "STLLMOutput",
    "STLLMProcessor",
    "build_model",
    "build_tiny",
    "collate",
    "config_preset",
    "load_pretrained",
    "random_clip",
    "save_pretrained",
    "wheel_backbone_dir",
]
