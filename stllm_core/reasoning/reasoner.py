"""Reasoner: question + recent clip + scene -> answer, with the queue/timeout policy. No ROS here.

The ROS node (stllm_ros.reasoner_node) is an adapter around `Reasoner.submit` (a Request to wait on or cancel) and
`Reasoner.ask` (submit and wait); tests and other front-ends can use it
directly. Refusals are returned as `Result(success=False, error=...)` with a reason a user can act on; nothing a caller
sends can raise out of `ask`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from stllm_core.engine import MAX_NEW_TOKENS_LIMIT
from stllm_core.errors import InputError, STLLMError
from stllm_core.reasoning.config import ReasonerConfig
from stllm_core.reasoning.worker import AnswerWorker, Busy, Cancelled, Job, Timeout
from stllm_core.types import Clip

log = logging.getLogger(__name__)

# clip_source(window_sec, num_frames, strategy) -> Clip (frames in the window with known poses + scene snapshot)
ClipSource = Callable[[float, int, str], Clip]


STATUSES = ("answered", "refused", "cancelled", "timeout")


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
    status: str = ""  # answered | refused | cancelled | timeout ("" = from success: answered / refused)
    request_id: str = ""

    def __post_init__(self) -> None:
        self.status = self.status or ("answered" if self.success else "refused")


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


class ReasonerStats:
    """Counts and latencies of the answers, for diagnostics (thread-safe)."""

    def __init__(self, keep: int = 200):
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(STATUSES, 0)
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=keep)
        self.last: Result | None = None
        self.last_refusal = ""

    def record(self, result: Result, latency_ms: float) -> None:
        with self._lock:
            self.counts[result.status] += 1
            if result.status == "answered":
                self.latencies_ms.append(latency_ms)
                self.last = result
            else:
                self.last_refusal = result.error

    def snapshot(self) -> dict:
        with self._lock:
            lat = sorted(self.latencies_ms)
            last = self.last
            return {
                **self.counts,
                "last_latency_ms": self.latencies_ms[-1] if lat else 0.0,
                "p95_latency_ms": lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)] if lat else 0.0,
                "last_encode_ms": last.encode_ms if last else 0.0,
                "last_prefill_ms": last.prefill_ms if last else 0.0,
                "last_decode_ms": last.decode_ms if last else 0.0,
                "last_refusal": self.last_refusal,
            }


class Request:
    """One question on its way through the worker: `wait()` gives its Result, `cancel()` stops it (a waiting one
    leaves the queue, a running one stops at its next token; the Result is then `status == "cancelled"` with the
    partial answer)."""

    def __init__(self, reasoner: Reasoner, request_id: str, job: Job | None, refusal: Result | None = None):
        self.reasoner, self.request_id, self.job = reasoner, request_id, job
        self._refusal = refusal
        self._result: Result | None = None
        self._t0 = time.monotonic()

    @property
    def phase(self) -> str:
        return "queued" if self.job is not None and self.job.state == "queued" else ""

    def cancel(self) -> bool:
        return self.job is not None and self.reasoner.worker.cancel(self.job)

    def wait(self, timeout: float | None = None) -> Result:
        if self._result is not None:
            return self._result
        cfg = self.reasoner.config
        try:
            if self._refusal is not None:
                result = self._refusal
            else:
                result = self.job.future.result(timeout=cfg.timeout_sec + 5.0 if timeout is None else timeout)
        except Cancelled as e:
            partial = e.partial if isinstance(e.partial, Result) else Result(False)  # what it had when it stopped
            result = dataclasses.replace(partial, success=False, error=str(e), status="cancelled")
        except Timeout as e:
            result = Result(False, error=str(e), status="timeout")
        except (Busy, InputError) as e:
            result = Result(False, error=str(e))
        except STLLMError as e:
            result = Result(False, error=f"{type(e).__name__}: {e}")
        except TimeoutError:
            result = Result(False, error=f"timed out after {cfg.timeout_sec:.1f} s", status="timeout")
        except Exception as e:  # never let a bug take the service down; say what happened
            log.exception("unexpected error while answering")
            result = Result(False, error=f"internal error: {type(e).__name__}: {e}")
        result.request_id = self.request_id
        self._result = result
        self.reasoner.stats.record(result, (time.monotonic() - self._t0) * 1e3)
        return result


class Reasoner:
    """Answers questions about the recent past through a pipeline (see stllm_core.reasoning.pipeline)."""

    def __init__(self, config: ReasonerConfig, pipeline, clip_source: ClipSource):
        self.config = config
        self.pipeline = pipeline
        self.clip_source = clip_source
        self.worker = AnswerWorker(config.queue_size)
        self.stats = ReasonerStats()

    @property
    def num_frames(self) -> int:
        return self.config.num_frames or int(self.pipeline.num_frames)

    def ask(
        self,
        question: str,
        window_sec: float = 0.0,
        max_new_tokens: int = 0,
        on_text: Callable[[str, int], None] | None = None,
        **kw,
    ) -> Result:
        """Answer and wait (see `submit` for the arguments)."""
        return self.submit(question, window_sec, max_new_tokens, on_text, **kw).wait()

    def submit(
        self,
        question: str,
        window_sec: float = 0.0,
        max_new_tokens: int = 0,
        on_text: Callable[[str, int], None] | None = None,
        on_phase: Callable[[str], None] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        request_id: str = "",
        reserved: bool = False,
    ) -> Request:
        """Queue a question; never raises. `on_text(partial, num_tokens)` as the answer grows; `on_phase(phase)` at
        "encoding" and "generating"; `temperature` / `top_p` for this answer (None = the node's); `request_id`
        (default a new UUID) names it in results and partial answers; `reserved`: a place taken by `reserve()`."""
        cfg = self.config
        request_id = request_id or uuid.uuid4().hex
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
            if temperature is not None and not (0.0 <= temperature <= 100.0):
                raise InputError(f"temperature must be 0 (greedy) .. 100, or negative for the node's default "
                                 f"({cfg.temperature}); got {temperature}")
            if top_p is not None and not (0.0 < top_p <= 1.0):
                raise InputError(f"top_p must be in (0, 1], or 0 for the node's default ({cfg.top_p}); got {top_p}")
            window = window_sec or cfg.window_sec
            max_tokens = max_new_tokens or cfg.max_new_tokens
            job = self.worker.submit(
                lambda cancel: self._answer(q, window, max_tokens, on_text, on_phase, cancel, temperature, top_p),
                cfg.timeout_sec, reserved=reserved,
            )
            return Request(self, request_id, job)
        except (Busy, InputError) as e:
            if reserved:
                self.worker.release()
            return Request(self, request_id, None, Result(False, error=str(e)))

    def reserve(self) -> str | None:
        """A place in the queue for a later `submit(..., reserved=True)`, or the busy reason (see AnswerWorker)."""
        return self.worker.reserve()

    def _answer(self, question: str, window: float, max_tokens: int, on_text, on_phase, cancel: threading.Event,
                temperature: float | None, top_p: float | None) -> Result:
        if on_phase is not None:
            on_phase("encoding")
        clip = self.clip_source(window, self.num_frames, self.config.frame_selection)
        if not clip.frames:
            return Result(
                False,
                error=f"no camera frames with a known pose in the last {window:g} s: check that images arrive on the "
                "image topic and that TF connects the camera frame to the world frame",
            )
        text_cb = on_text
        if on_phase is not None:
            generating = [False]

            def text_cb(text: str, n: int) -> None:
                if not generating[0]:
                    generating[0] = True
                    on_phase("generating")
                if on_text is not None:
                    on_text(text, n)

        ans = self.pipeline.answer(question, clip, max_new_tokens=max_tokens, on_text=text_cb, cancel=cancel,
                                   temperature=temperature, top_p=top_p)
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
