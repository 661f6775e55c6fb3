"""AnswerPipeline with the tiny random model (real processor, model, tokenizer and engine; CPU, fp32)."""

from __future__ import annotations

import threading

import pytest
import torch
from test_engine import full_recompute_greedy

from stllm_core.engine import MAX_NEW_TOKENS_LIMIT, EngineConfig
from stllm_core.errors import ConfigError, InputError, ModelLoadError
from stllm_core.model import random_clip, save_pretrained
from stllm_core.reasoning import Answer, AnswerPipeline
from stllm_core.reasoning.pipeline import remove_control_chars

QUESTION = "Where did I leave the mug?"


@pytest.fixture(scope="module")
def pipe() -> AnswerPipeline:
    return AnswerPipeline.load("tiny-random", seed=0, max_new_tokens=24)


@pytest.fixture(scope="module")
def clip():
    return random_clip(6, seed=3)


def reference_tokens(pipe: AnswerPipeline, question: str, clip, n: int) -> list[int]:
    """The same answer computed by hand: processor -> encoders -> prompt -> full-recompute greedy, stop at eos."""
    with torch.no_grad():
        inputs = pipe.processor(question, clip)
        embeds = pipe.model.embed_prompt(inputs, pipe.model.get_prefix_embeds(inputs))
    tokens = full_recompute_greedy(pipe.model.language_model, embeds, n)
    stops = set(pipe.processor.stop_token_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


def test_answer_equals_hand_computed_reference(pipe, clip):
    ans = pipe.answer(QUESTION, clip)
    assert isinstance(ans, Answer)
    ref = reference_tokens(pipe, QUESTION, clip, 24)
    assert ans.num_tokens == len(ref)
    assert ans.text == pipe.processor.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert ans.stopped == ("length" if len(ref) == 24 else "eos")
    assert ans.encode_ms > 0 and ans.prefill_ms > 0 and ans.decode_ms >= 0
    assert ans.num_frames == pipe.num_frames == 4  # 6 frames given, the tiny model takes 4
    assert 0 < ans.num_points <= 256
    again = pipe.answer(QUESTION, clip)
    assert again == Answer(**{**ans.__dict__, **_timings(again)})  # deterministic except for the timings


def _timings(a: Answer) -> dict:
    return {"encode_ms": a.encode_ms, "prefill_ms": a.prefill_ms, "decode_ms": a.decode_ms}


def test_streaming_partials_grow_to_the_final_text(pipe, clip):
    """Sampling (the random tiny model's greedy answer is only newlines): varied tokens, streamed as they come."""
    sampler = AnswerPipeline(pipe.model, pipe.processor, EngineConfig(temperature=1.5, max_new_tokens=20))
    partials: list[str] = []
    counts: list[int] = []
    ans = sampler.answer(QUESTION, clip, on_text=lambda text, n: (partials.append(text), counts.append(n)))
    assert ans.text, "the sampled answer is empty; the test needs text"
    assert partials and partials[-1] == ans.text
    assert all(a != b for a, b in zip(partials, partials[1:])), "a partial was repeated"
    assert len(partials) <= ans.num_tokens
    assert counts == sorted(counts) and counts[-1] <= ans.num_tokens
    assert sampler.answer(QUESTION, clip).text == ans.text  # seeded sampling is reproducible


def test_max_new_tokens_and_cancel(pipe, clip):
    ans = pipe.answer(QUESTION, clip, max_new_tokens=3)
    assert ans.num_tokens <= 3
    cancel = threading.Event()
    cancel.set()
    ans = pipe.answer(QUESTION, clip, cancel=cancel)
    assert ans.stopped == "cancelled" and ans.num_tokens == 0 and ans.text == ""
    with pytest.raises(ConfigError, match="max_new_tokens"):
        pipe.answer(QUESTION, clip, max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1)


@pytest.mark.parametrize(
    "question, match",
    [
        ("", "question is empty"),
        ("   \t\n ", "question is empty"),
        ("\x00\x07\x1b", "question is empty"),
        ("<image><pointcloud>", "question is empty"),
        ("x" * 1001, "max_question_chars=1000"),
        (None, "must be a str"),
    ],
)
def test_bad_questions_are_refused(pipe, clip, question, match):
    with pytest.raises(InputError, match=match):
        pipe.answer(question, clip)


def test_question_cleaning(pipe, clip):
    assert pipe.max_question_chars == 1000
    assert pipe.clean_question("Where\x07 is\u200b the\x00 mug?") == "Where is the mug?"
    assert pipe.clean_question("Where <image>is the<|im_end|> mug?\n") == "Where is the mug?"
    assert pipe.clean_question("<ima<image>ge>Where is it?") == "<ima ge>Where is it?"  # no placeholder re-forms
    assert pipe.clean_question("x" * 1000) == "x" * 1000
    assert remove_control_chars("a\tb\x7fc\u202ed") == "a bcd"
    # Cleaned and clean questions give the same answer.
    assert pipe.answer("Where did\x07 I leave <image>the mug?", clip).text == pipe.answer(QUESTION, clip).text


def test_bad_clip_is_refused(pipe):
    from stllm_core.types import Clip

    with pytest.raises(InputError, match="0 frames"):
        pipe.answer(QUESTION, Clip(frames=()))


def test_concurrent_answers_equal_serial(pipe, clip):
    serial = pipe.answer(QUESTION, clip).text
    results: list[str] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            results.append(pipe.answer(QUESTION, clip).text)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == [serial] * 3


def test_saved_model_dir_gives_the_same_answer(pipe, clip, tmp_path):
    save_pretrained(pipe.model, pipe.processor, tmp_path / "tiny")
    loaded = AnswerPipeline.load(str(tmp_path / "tiny"), max_new_tokens=24)
    assert loaded.answer(QUESTION, clip).text == pipe.answer(QUESTION, clip).text
    assert loaded.num_frames == pipe.num_frames


def test_warmup_answers_a_random_clip(pipe):
    ans = pipe.warmup(max_new_tokens=2)
    assert ans.num_frames == pipe.num_frames and ans.num_points > 0 and ans.num_tokens <= 2


def test_load_errors_are_typed(tmp_path):
    with pytest.raises(ModelLoadError, match="nope"):
        AnswerPipeline.load(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="`dtype`"):
        AnswerPipeline.load(dtype="float64")
    with pytest.raises(ConfigError, match="`backend`"):
        AnswerPipeline.load(backend="onnx")
    with pytest.raises(ConfigError, match="`device`"):
        AnswerPipeline.load(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="`device`"):
            AnswerPipeline.load(device="cuda")


def test_padded_encoder_path_gives_the_same_answer(pipe, clip):
    """Non-eager backends pad the encoder inputs to fixed shapes; the answer must not change. The encoder is run
    through the padded path with an eager module here (torch.compile itself is covered in test_engine_backends)."""
    padded = AnswerPipeline(pipe.model, pipe.processor, EngineConfig(max_new_tokens=16))
    padded.backend = "fixed-shape eager"  # any non-eager name takes the padded path
    padded._encoders = _AlwaysEager(padded)
    assert padded.answer(QUESTION, clip).text == pipe.answer(QUESTION, clip, max_new_tokens=16).text
    assert padded._encoders.shapes[0][3] == (1, 256, 6)  # points padded to max_points


class _AlwaysEager(dict):
    """Stands in for the per-shape encoder cache: records the padded shapes and returns the eager EncoderStack."""

    def __init__(self, pipe: AnswerPipeline) -> None:
        super().__init__()
        from stllm_core.engine.export import EncoderStack

        self.stack = EncoderStack(pipe.model).eval()
        self.shapes: list = []

    def __contains__(self, key) -> bool:
        self.shapes.append(tuple(s for s, _ in key))
        return True

    def __getitem__(self, key):
        return self.stack
