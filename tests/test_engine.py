"""Engine tests with a real tiny transformers LlamaForCausalLM (random weights, CPU, fp32)."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from stllm_core.engine import MAX_NEW_TOKENS_LIMIT, Engine, EngineConfig
from stllm_core.engine.backends import StaticCacheDecoder, engine_cache_key, require_tensorrt
from stllm_core.errors import ConfigError, InputError

VOCAB, HIDDEN = 96, 32


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # larger output weights: sharper, more varied greedy choices than the default init
        model.lm_head.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def lm() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def ref24(lm) -> list[int]:
    """Full-recompute greedy reference: 24 tokens after prompt()."""
    return full_recompute_greedy(lm, prompt(), 24)


def prompt(length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, HIDDEN, generator=g)


@torch.no_grad()
def full_recompute_greedy(model, embeds: torch.Tensor, n: int) -> list[int]:
    """Reference: no cache, the whole sequence re-run every step, argmax of the last position."""
    seq, out = embeds, []
    for _ in range(n):
        logits = model(inputs_embeds=seq, use_cache=False).logits[:, -1]
        tok = int(logits[0].argmax())
        out.append(tok)
        seq = torch.cat([seq, model.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
    return out


def test_kv_cached_greedy_equals_full_recompute(lm, ref24):
    embeds, ref = prompt(), ref24
    assert len(set(ref)) > 3, f"degenerate reference sequence {ref}"
    gen = Engine(lm, EngineConfig(max_new_tokens=24)).generate(embeds)
    assert gen.tokens == ref
    assert gen.stopped == "length"
    assert gen.prefill_ms > 0 and gen.decode_ms > 0


def test_static_cache_decoder_equals_eager_and_reuses_cache(lm):
    """The 'compiled' backend's static-cache path (uncompiled here, so it runs fast on CPU) gives the same tokens."""
    eager = Engine(lm, EngineConfig(max_new_tokens=20))
    static = Engine(lm, EngineConfig(max_new_tokens=20))
    static.decoder = StaticCacheDecoder(lm, compile=False)
    for seed, length in ((1, 12), (2, 30), (3, 5)):  # the second and third calls reuse (reset) one static cache
        embeds = prompt(length, seed)
        assert static.generate(embeds).tokens == eager.generate(embeds).tokens
    assert static.decoder.cache_len == 256


def test_compile_failure_falls_back_to_the_uncompiled_step(lm, caplog):
    """If torch.compile cannot build the step (e.g. no C++ compiler), the static-cache step runs uncompiled."""
    engine = Engine(lm, EngineConfig(max_new_tokens=12))
    eager_tokens = engine.generate(prompt()).tokens
    engine.decoder = StaticCacheDecoder(lm, compile=False)

    def broken_compiled_step(ids, positions):
        raise RuntimeError("inductor: no working C++ compiler found")

    engine.decoder._step_fn = broken_compiled_step
    engine.decoder.compiled = True
    with caplog.at_level("WARNING"):
        assert engine.generate(prompt()).tokens == eager_tokens
    assert not engine.decoder.compiled and "no working C++ compiler" in engine.decoder.fallback_reason
    assert "running it uncompiled" in caplog.text


def test_qwen2_kv_cache_equals_full_recompute():
    torch.manual_seed(3)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    embeds = prompt(9, 4)
    assert Engine(model, EngineConfig(max_new_tokens=16)).generate(embeds).tokens == full_recompute_greedy(
        model, embeds, 16
    )


def test_stop_token_ends_generation_and_is_not_returned(lm, ref24):
    embeds, ref = prompt(), ref24
    stop = ref[5]
    first = ref.index(stop)
    gen = Engine(lm, EngineConfig(max_new_tokens=24, stop_token_ids=(stop, VOCAB + 7))).generate(embeds)
    assert gen.stopped == "eos"
    assert gen.tokens == ref[:first]


def test_max_new_tokens_per_call_and_limit(lm):
    engine = Engine(lm, EngineConfig(max_new_tokens=24))
    gen = engine.generate(prompt(), max_new_tokens=3)
    assert len(gen.tokens) == 3 and gen.stopped == "length"
    with pytest.raises(ConfigError, match="max_new_tokens.*512"):
        engine.generate(prompt(), max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        engine.generate(prompt(), max_new_tokens=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        EngineConfig(max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1)


def test_sampling_is_deterministic_by_seed(lm):
    embeds = prompt()

    def sample(seed: int, top_p: float = 1.0) -> list[int]:
        cfg = EngineConfig(max_new_tokens=16, temperature=1.5, top_p=top_p, seed=seed)
        return Engine(lm, cfg).generate(embeds).tokens

    a, b, c = sample(0), sample(0), sample(1)
    assert a == b
    assert a != c
    assert a != full_recompute_greedy(lm, embeds, 16)
    assert sample(5, top_p=0.9) == sample(5, top_p=0.9)


def test_tiny_top_p_is_greedy(lm):
    """top_p so small that only the most likely token survives: sampling must reproduce greedy decoding."""
    embeds = prompt()
    greedy = Engine(lm, EngineConfig(max_new_tokens=16)).generate(embeds).tokens
    nucleus = Engine(lm, EngineConfig(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=9)).generate(embeds)
    assert nucleus.tokens == greedy


def test_streaming_callback_sees_every_token_in_order(lm):
    seen: list[int] = []
    gen = Engine(lm, EngineConfig(max_new_tokens=10)).generate(prompt(), on_token=seen.append)
    assert seen == gen.tokens and len(seen) == 10


def test_cancel_from_callback_and_before_start(lm):
    engine = Engine(lm, EngineConfig(max_new_tokens=40))
    cancel = threading.Event()
    seen: list[int] = []

    def on_token(tok: int) -> None:
        seen.append(tok)
        if len(seen) == 4:
            cancel.set()

    gen = engine.generate(prompt(), on_token=on_token, cancel=cancel)
    assert gen.stopped == "cancelled" and gen.tokens == seen and len(seen) == 4
    gen = engine.generate(prompt(), cancel=cancel)  # still set: nothing runs
    assert gen.stopped == "cancelled" and gen.tokens == []


def test_cancel_from_another_thread(lm):
    engine = Engine(lm, EngineConfig(max_new_tokens=MAX_NEW_TOKENS_LIMIT - 20))
    cancel = threading.Event()
    started = threading.Event()

    def on_token(tok: int) -> None:
        started.set()

    result = {}
    t = threading.Thread(target=lambda: result.update(gen=engine.generate(prompt(), on_token=on_token, cancel=cancel)))
    t.start()
    assert started.wait(60), "generation never produced a token"
    cancel.set()
    t.join(120)
    assert not t.is_alive()
    gen = result["gen"]
    assert gen.stopped == "cancelled" and 1 <= len(gen.tokens) < MAX_NEW_TOKENS_LIMIT - 20


def test_bad_inputs_raise_typed_errors(lm):
    engine = Engine(lm)
    with pytest.raises(InputError, match="batch size 1"):
        engine.generate(torch.zeros(2, 4, HIDDEN))
    with pytest.raises(InputError, match=r"\(1, L, D\)"):
        engine.generate(torch.zeros(4, HIDDEN))
    with pytest.raises(InputError, match="hidden size 32"):
        engine.generate(torch.zeros(1, 4, HIDDEN + 1))
    with pytest.raises(InputError, match="empty"):
        engine.generate(torch.zeros(1, 0, HIDDEN))
    with pytest.raises(InputError, match="max_position_embeddings 512"):
        engine.generate(torch.zeros(1, 500, HIDDEN), max_new_tokens=20)
    with pytest.raises(InputError, match="NaN"):
        engine.generate(torch.full((1, 3, HIDDEN), float("nan")))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"backend": "onnx"}, "backend"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_engine_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        EngineConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_tensorrt_backend_refused_clearly_without_cuda(lm):
    with pytest.raises(ConfigError, match="tensorrt.*CUDA"):
        require_tensorrt()
    with pytest.raises(ConfigError, match="tensorrt"):
        Engine(lm, EngineConfig(backend="tensorrt"))


def test_engine_cache_key_changes_with_each_part():
    x = [torch.zeros(1, 3, 8, 8)]
    base = engine_cache_key("abc", x, "bfloat16", "H100 sm90", "v1")
    assert base == engine_cache_key("abc", [torch.ones(1, 3, 8, 8)], "bfloat16", "H100 sm90", "v1")
    assert base != engine_cache_key("abd", x, "bfloat16", "H100 sm90", "v1")
    assert base != engine_cache_key("abc", [torch.zeros(1, 3, 8, 9)], "bfloat16", "H100 sm90", "v1")
    assert base != engine_cache_key("abc", x, "float16", "H100 sm90", "v1")
    assert base != engine_cache_key("abc", x, "bfloat16", "Orin sm87", "v1")
