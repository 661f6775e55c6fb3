"""Backend equivalence: 'compiled' (static cache + torch.compile, CUDA graphs on CUDA) gives the eager tokens.

On CUDA it always runs. On CPU torch.compile (inductor) takes ~20 s for a tiny model, over this file's time budget, so
it runs only with STLLM_TEST_COMPILE=1 (the static-cache path itself is covered uncompiled in test_engine.py).
"""

from __future__ import annotations

import os

import pytest
import torch
from test_engine import prompt, tiny_llama

from stllm_core.engine import Engine, EngineConfig

CUDA = torch.cuda.is_available()
RUN_CPU = os.environ.get("STLLM_TEST_COMPILE") == "1"


@pytest.mark.skipif(not (CUDA or RUN_CPU), reason="no CUDA (set STLLM_TEST_COMPILE=1 to compile on the CPU, ~20 s)")
def test_compiled_backend_matches_eager_greedy_tokens():
    device = "cuda" if CUDA else "cpu"
    lm = tiny_llama().to(device)
    eager = Engine(lm, EngineConfig(max_new_tokens=24))
    compiled = Engine(lm, EngineConfig(max_new_tokens=24, backend="compiled"))
    for seed, length in ((1, 12), (2, 40)):  # the second call replays the same compiled step / CUDA graph
        embeds = prompt(length, seed).to(device)
        assert compiled.generate(embeds).tokens == eager.generate(embeds).tokens
    assert compiled.decoder.compiled, compiled.decoder.fallback_reason


@pytest.mark.skipif(not CUDA, reason="bf16 logits parity needs CUDA")
def test_compiled_bf16_logits_within_tolerance():
    lm = tiny_llama().to("cuda", torch.bfloat16)
    embeds = prompt(16, 3).to("cuda", torch.bfloat16)
    eager = Engine(lm, EngineConfig(max_new_tokens=8))
    compiled = Engine(lm, EngineConfig(max_new_tokens=8, backend="compiled"))
    e, c = eager.decoder, compiled.decoder
    torch.testing.assert_close(c.prefill(embeds, 32).float(), e.prefill(embeds, 32).float(), rtol=2e-2, atol=2e-2)
    for pos, tok in enumerate([3, 17, 5, 60], start=16):
        torch.testing.assert_close(c.step(tok, pos).float(), e.step(tok, pos).float(), rtol=2e-2, atol=2e-2)


def test_tensorrt_encoder_engine_is_cached():
    pytest.importorskip("torch_tensorrt", exc_type=ImportError)
    if not CUDA:
        pytest.skip("TensorRT needs CUDA")
    from stllm_core.engine.backends import TensorRTEncoder

    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).cuda().eval()
    x = torch.randn(4, 16, device="cuda")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        first = TensorRTEncoder(module, [x], tmp)
        assert not first.cache_hit and first.path.is_file()
        second = TensorRTEncoder(module, [x], tmp)
        assert second.cache_hit
        torch.testing.assert_close(second(x), module(x), rtol=1e-2, atol=1e-2)
