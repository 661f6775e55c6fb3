"""The ONE prompt builder used by training and inference (so what is trained is what runs).

A user turn is
    <|st_prefix|> x num_queries            (placeholders replaced by the aligner's prefix embeddings)
    The video lasts for {t:.2f} seconds, and {N} frames are uniformly sampled from it. These frames are located at
    {0.00s,0.50s,...}. (the time instruction of LLaVA-Video / ST-LLM; style "full" only)
    {question}
rendered with the language model tokenizer's own chat template (generation prompt appended). Style "full" keeps the
template's default system line; style "short" gives an empty system line (where the template has a system role) and
drops the time instruction. For training, the answer tokens plus the end-of-turn token follow, and labels mask
everything else with -100.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stllm_core.errors import InputError
from stllm_core.model.configuration import PROMPT_STYLES

PREFIX_TOKEN = "<|st_prefix|>"
IMAGE_PLACEHOLDER = "<image>"
POINTS_PLACEHOLDER = "<pointcloud>"
IGNORE_INDEX = -100
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>", "</s>")


def time_instruction(duration: float, frame_times: Sequence[float]) -> str:
    """Example: time_instruction(2.0, [0, 1, 2]) -> 'The video lasts for 2.00 seconds, and 3 frames are uniformly
    sampled from it. These frames are located at 0.00s,1.00s,2.00s.'"""
    located = ",".join(f"{t:.2f}s" for t in frame_times)
    return (f"The video lasts for {duration:.2f} seconds, and {len(frame_times)} frames are uniformly sampled from it. "
            f"These frames are located at {located}.")


def ensure_prefix_token(tokenizer) -> int:
    """Add PREFIX_TOKEN as a special token if the tokenizer lacks it; return its id."""
    if PREFIX_TOKEN not in tokenizer.get_vocab():
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(PREFIX_TOKEN, special=True, normalized=False)], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(PREFIX_TOKEN))


def reserved_strings(tokenizer) -> list[str]:
    """Strings user text must never contain: our placeholders and every special/added token of the tokenizer."""
    out = {PREFIX_TOKEN, IMAGE_PLACEHOLDER, POINTS_PLACEHOLDER}
    out.update(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False) and tok.content:
            out.add(tok.content)
    return sorted(out, key=len, reverse=True)


def clean_text(text: str, tokenizer, max_chars: int | None = None, what: str = "question") -> str:
    """Strip placeholders and special tokens from user text (repeated until none is left, so '<ima<image>ge>' cannot
    re-form one), normalise whitespace, and refuse empty or over-long text with an InputError."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a str, got {type(text).__name__}.")
    if max_chars is not None and len(text) > max_chars:
        raise InputError(f"{what} has {len(text)} characters; at most {max_chars} are accepted.")
    pattern = re.compile("|".join(re.escape(s) for s in reserved_strings(tokenizer)))
    prev = None
    while prev != text:
        prev, text = text, pattern.sub(" ", text)
    text = " ".join(text.split())
    if not text:
        raise InputError(f"{what} is empty after removing placeholders and special tokens.")
    return text


def build_prompt(tokenizer, question: str, duration: float, frame_times: Sequence[float], num_prefix: int,
                 style: str = "full") -> str:
    """The chat-formatted prompt string (generation prompt included) for an already-cleaned question.

    style "full": prefix, time instruction, question, with the template's default system line; "short": prefix and
    question, with an empty system line (where the chat template knows a system role).
    """
    if style not in PROMPT_STYLES:
        raise InputError(f"Got {style!r} for the prompt style; expected one of {', '.join(PROMPT_STYLES)}.")
    parts = [PREFIX_TOKEN * num_prefix, question] if style == "short" else \
        [PREFIX_TOKEN * num_prefix, time_instruction(duration, frame_times), question]
    messages = [{"role": "user", "content": "\n".join(parts)}]
    if style == "short" and "system" in (tokenizer.chat_template or ""):
        messages.insert(0, {"role": "system", "content": ""})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn (the tokenizer's eos, else a known end-of-turn token)."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for tok in _END_OF_TURN:
        if tok in vocab:
            return int(vocab[tok])
    raise InputError("The tokenizer has no eos token and none of the known end-of-turn tokens "
                     f"{', '.join(_END_OF_TURN)}.")


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end generation: the end-of-turn id plus any known end-of-turn token in the vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = [end_of_turn_id(tokenizer)] + [int(vocab[t]) for t in _END_OF_TURN if t in vocab]
    return list(dict.fromkeys(ids))


def encode_example(
    tokenizer,
    question: str,
    duration: float,
    frame_times: Sequence[float],
    num_prefix: int,
    answer: str | None = None,
    style: str = "full",
) -> tuple[list[int], list[int] | None]:
    """Token ids of the prompt (+ answer + end-of-turn when `answer` is given) and the matching labels.

    The question and answer must already be cleaned. Labels are -100 everywhere except the answer and end-of-turn.
    """
    prompt = build_prompt(tokenizer, question, duration, frame_times, num_prefix, style)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return list(ids), None
    ans = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    return list(ids) + list(ans), [IGNORE_INDEX] * len(ids) + list(ans)
