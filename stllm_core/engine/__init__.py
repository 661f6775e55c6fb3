"""Generation engine (KV-cached decoding over inputs_embeds), execution backends and encoder export.

Knows no tokenizer and no ROS: token ids in, token ids out.
"""

from stllm_core.engine.backends import make_decoder, make_encoder, require_tensorrt
from stllm_core.engine.generation import (
    BACKENDS,
    MAX_NEW_TOKENS_LIMIT,
    Engine,
    EngineConfig,
    Generation,
    check_max_new_tokens,
)

__all__ = [
    "BACKENDS",
    "MAX_NEW_TOKENS_LIMIT",
    "Engine",
    "EngineConfig",
    "Generation",
    "check_max_new_tokens",
    "make_decoder",
    "make_encoder",
    "require_tensorrt",
]
