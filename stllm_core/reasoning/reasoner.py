"""Reasoner: question + recent clip + scene -> answer, with the queue/timeout policy. No ROS here.

The ROS node (stllm_ros.reasoner_node) is an adapter around `Reasoner.ask`; tests and other front-ends can use it
directly. Refusals are returned as `Result(success=False, error=...)` with a reason a user can act on; nothing a caller
sends can raise out of `ask`.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from stllm_core.engine import MAX_NEW_TOKENS_LIMIT
from stllm_core.errors import InputError, STLLMError
from stllm_core.reasoning.config import ReasonerConfig
from stllm_core.reasoning.worker import AnswerWorker, Busy, Timeout
from stllm_core.types import Clip

log = logging.getLogger(__name__)

# clip_source(window_sec, num_frames, strategy) -> Clip (frames in the window with known poses + scene snapshot)
ClipSource = Callable[[float, int, str], Clip]


@dataclass
class Result:
    success: bool
    answer: str = ""
    error: str = ""
    clip_start: float = 0.0
    clip_end: float = 0.0
    num_frames: int = 0
    num_points: int = 0
    encode_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    num_tokens: int = 0


def clean_question(text: str, max_chars: int) -> str:
    """Validate a user's question: refuse empty or overlong text; drop control characters (keep newlines as spaces).

    >>> clean_question("  where is\\tthe mug?\\x00 ", 100)
    'where is the mug?'
    """
    if not isinstance(text, str):
        raise InputError(f"the question must be text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise InputError(
            f"the question is {len(text)} characters long; the maximum is {max_chars} (max_question_chars)"
        )
    chars = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\n\r\v\f":
            chars.append(" ")
        elif cat in ("Cc", "Cf", "Cs", "Co", "Cn") or ch == "\ufffd":
            continue
        else:
            chars.append(ch)
    cleaned = " ".join("".join(chars).split())
    if not cleaned:
        raise InputError("the question is empty" + (" (only whitespace or control characters)" if text else ""))
    return cleaned


class Reasoner:
    """Answers questions about the recent past through a pipeline (see stllm_core.reasoning.pipeline)."""

    def __init__(self, config: ReasonerConfig, pipeline, clip_source: ClipSource):
        self.config = config
        self.pipeline = pipeline
        self.clip_source = clip_source
        self.worker = AnswerWorker(config.queue_size)

    @property
    def num_frames(self) -> int:
        return self.config.num_frames or int(self.pipeline.num_frames)

    def ask(
        self,
        question: str,
        window_sec: float = 0.0,
        max_new_tokens: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> Result:
        cfg = self.config
        try:
            q = clean_question(question, cfg.max_question_chars)
            if window_sec < 0 or window_sec != window_sec or window_sec > 3600:
                raise InputError(
                    f"window_sec must be between 0 (= default {cfg.window_sec} s) and 3600, got {window_sec}"
                )
            if max_new_tokens > MAX_NEW_TOKENS_LIMIT:
                raise InputError(
                    f"max_new_tokens must be at most {MAX_NEW_TOKENS_LIMIT} (0 = default {cfg.max_new_tokens}), "
                    f"got {max_new_tokens}"
                )
            window = window_sec or cfg.window_sec
            max_tokens = max_new_tokens or cfg.max_new_tokens
            future = self.worker.submit(
                lambda cancel: self._answer(q, window, max_tokens, on_text, cancel), cfg.timeout_sec
            )
            return future.result(timeout=cfg.timeout_sec + 5.0)
        except (Busy, Timeout, InputError) as e:
            return Result(False, error=str(e))
        except STLLMError as e:
            return Result(False, error=f"{type(e).__name__}: {e}")
        except TimeoutError:
            return Result(False, error=f"timed out after {cfg.timeout_sec:.1f} s")
        except Exception as e:  # never let a bug take the service down; say what happened
            log.exception("unexpected error while answering %r", question)
            return Result(False, error=f"internal error: {type(e).__name__}: {e}")

    def _answer(self, question: str, window: float, max_tokens: int, on_text, cancel: threading.Event) -> Result:
        clip = self.clip_source(window, self.num_frames, self.config.frame_selection)
        if not clip.frames:
            return Result(
                False,
                error=f"no camera frames with a known pose in the last {window:g} s: check that images arrive on the "
                "image topic and that TF connects the camera frame to the world frame",
            )
        ans = self.pipeline.answer(question, clip, max_new_tokens=max_tokens, on_text=on_text, cancel=cancel)
        return Result(
            True,
            answer=ans.text,
            clip_start=clip.start,
            clip_end=clip.end,
            num_frames=ans.num_frames,
            num_points=ans.num_points,
            encode_ms=ans.encode_ms,
            prefill_ms=ans.prefill_ms,
            decode_ms=ans.decode_ms,
            num_tokens=ans.num_tokens,
        )

    def close(self) -> None:
        self.worker.close()
