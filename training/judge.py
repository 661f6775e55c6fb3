"""LLM-as-judge for REA answers over any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, Ollama...).

The paper judges each answer with gpt-4o / gemini-2.0-flash at temperature 0, with one rubric per task, and counts
accuracy = correct / (correct + wrong + invalid). Its released parser counts any reply that *contains* "correct" as
correct, so "incorrect" scores as a hit; `parse_verdict` here is strict (see its docstring). The rubrics below are this
project's own wording of what each task checks.

Only the standard library is used (urllib); the API key is read from an environment variable, never from a file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from stllm_core.config import check
from stllm_core.errors import ConfigError, STLLMError

log = logging.getLogger(__name__)


class JudgeError(STLLMError):
    """The judge endpoint failed (HTTP error after retries, unreachable, or a malformed response)."""


RUBRICS: dict[str, str] = {
    "relative_direction": (
        "The task asks where an object lies relative to the person (left, right, in front, behind; whether two objects "
        "are on the same side; which hand is nearer) at one or two moments of the video. The candidate is correct only "
        "if every direction or side it states agrees with the reference. A missing, hedged or opposite direction is "
        "wrong. Extra wording that does not contradict the reference is fine."),
    "relative_distance": (
        "The task asks about distance: whether the person moved closer to or away from an object, during which action "
        "the person was closest, or which of two objects is nearer. The candidate is correct only if its conclusion "
        "(closer / farther / about the same / which action / which object) matches the reference. If the reference "
        "says it is unclear, only an answer saying it cannot be determined is correct."),
    "find_my_item": (
        "The task asks where a small item is now and how the person can reach it. The candidate is correct only if it "
        "puts the item in the same direction relative to the person (and near the same landmark, if the reference "
        "names one) and any route it gives does not contradict the reference. A vague location with no direction is "
        "wrong."),
    "furniture_affordance": (
        "The task asks which fixed object (fridge, hob, oven, sink, microwave, dishwasher, freezer, tv, ...) the "
        "person will most likely use next. The candidate is correct only if it names the same object as the reference; "
        "plain synonyms (hob/stove/cooktop) count. Naming several objects without committing to one is wrong."),
    "action_planning": (
        "The task asks what the person should do next toward a goal. The candidate is correct only if its next action "
        "has the same verb and object meaning as the reference (e.g. 'open the fridge' vs 'get the milk out of the "
        "fridge' is correct; a different object or a later step is wrong)."),
}
DEFAULT_RUBRIC = ("The candidate is correct only if it states the same answer as the reference; wording may differ, "
                  "but any contradiction, omission of the key fact, or hedging between options is wrong.")

SYSTEM_PROMPT = ("You grade answers to questions about an egocentric video of a person in a kitchen and the 3D scene "
                 "around them. You compare a candidate answer with a reference answer. Reply with exactly one word: "
                 "correct or wrong.")


def build_messages(question: str, reference: str, prediction: str, question_type: str | None = None) -> list[dict]:
    """Chat messages asking the judge for a one-word verdict under the rubric of `question_type`."""
    rubric = RUBRICS.get(question_type or "", DEFAULT_RUBRIC)
    user = (f"Rubric: {rubric}\n\n"
            f"Question: {question.strip()}\n"
            f"Reference answer: {reference.strip()}\n"
            f"Candidate answer: {prediction.strip() or '(empty)'}\n\n"
            "Is the candidate answer correct? Reply with exactly one word: correct or wrong.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_NEGATIVE = ("incorrect", "not correct", "wrong", "not right")


def parse_verdict(reply: str | None) -> bool | None:
    """Strict verdict: True for "correct", False for "wrong"/"incorrect"/"not correct", None (invalid) otherwise.

    Only the first non-empty line counts, after dropping markdown emphasis/quotes and a "Verdict:"/"Answer:" label;
    it must START with the verdict word followed by nothing or a non-letter (so "Correct." and "correct - the side
    matches" are True, "correctly placed", "I think it is correct" and "partially correct" are None).

    >>> [parse_verdict(r) for r in ("correct", "Correct.", "incorrect", "wrong", "not correct", "", "banana")]
    [True, True, False, False, False, None, None]
    """
    if not reply:
        return None
    lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    line = lines[0].strip().lower()
    line = re.sub(r"^[\s*_`'\">#-]+", "", line)
    line = re.sub(r"^(verdict|answer|judgement|judgment|grade)\s*:\s*[*_`'\"]*", "", line).strip()

    def starts(word: str) -> bool:
        return line == word or (line.startswith(word) and not line[len(word)].isalpha())

    if any(starts(w) for w in _NEGATIVE):
        return False
    if starts("correct"):
        return True
    return None


@dataclass
class Tally:
    """Judge outcomes; accuracy counts invalid replies as failures, as the paper does."""

    correct: int = 0
    wrong: int = 0
    invalid: int = 0

    def add(self, verdict: bool | None) -> None:
        if verdict is True:
            self.correct += 1
        elif verdict is False:
            self.wrong += 1
        else:
            self.invalid += 1

    @property
    def total(self) -> int:
        return self.correct + self.wrong + self.invalid

    @property
    def accuracy(self) -> float:
        """correct / (correct + wrong + invalid) in percent; NaN when empty."""
        return 100.0 * self.correct / self.total if self.total else float("nan")

    @property
    def stderr(self) -> float:
        """Standard error of the accuracy (binomial), in percentage points; NaN when empty."""
        if not self.total:
            return float("nan")
        p = self.correct / self.total
        return 100.0 * (p * (1 - p) / self.total) ** 0.5

    def as_dict(self) -> dict:
        return {"correct": self.correct, "wrong": self.wrong, "invalid": self.invalid, "accuracy": self.accuracy,
                "stderr": self.stderr}


@dataclass
class JudgeConfig:
    base_url: str = "https://api.openai.com/v1"  # the part before /chat/completions
    model: str = "gpt-4o"
    api_key_env: str | None = "OPENAI_API_KEY"  # None: send no Authorization header (local servers)
    temperature: float = 0.0
    max_tokens: int = 16
    timeout_sec: float = 60.0
    max_retries: int = 3  # retries on 429 / 5xx / connection errors
    retry_backoff_sec: float = 2.0  # doubled after each retry
    extra_body: dict = field(default_factory=dict)  # merged into the request (e.g. {"seed": 0})

    def __post_init__(self):
        check(self.base_url.startswith(("http://", "https://")), "base_url", self.base_url, "an http(s):// URL")
        check(bool(self.model), "model", self.model, "a model name")
        check(self.temperature >= 0, "temperature", self.temperature, ">= 0")
        check(self.max_tokens >= 1, "max_tokens", self.max_tokens, ">= 1")
        check(self.timeout_sec > 0, "timeout_sec", self.timeout_sec, "> 0")
        check(self.max_retries >= 0, "max_retries", self.max_retries, ">= 0")
        check(self.retry_backoff_sec >= 0, "retry_backoff_sec", self.retry_backoff_sec, ">= 0")


@dataclass(frozen=True)
class Judgement:
    verdict: bool | None
    reply: str


_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


class JudgeClient:
    """Calls POST {base_url}/chat/completions and parses the verdict strictly."""

    def __init__(self, config: JudgeConfig | None = None, sleep: Callable[[float], None] = time.sleep):
        self.config = config or JudgeConfig()
        self._sleep = sleep
        self._api_key = None
        if self.config.api_key_env:
            self._api_key = os.environ.get(self.config.api_key_env)
            if not self._api_key:
                raise ConfigError(f"Environment variable {self.config.api_key_env!r} (judge `api_key_env`) is not set; "
                                  "export the API key there, or set api_key_env to null for a server without keys.")

    def complete(self, messages: list[dict]) -> str:
        cfg = self.config
        url = cfg.base_url.rstrip("/") + "/chat/completions"
        body = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                "max_tokens": cfg.max_tokens, **cfg.extra_body}
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body).encode()
        delay = cfg.retry_backoff_sec
        for attempt in range(cfg.max_retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=cfg.timeout_sec) as resp:
                    payload = resp.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code not in _RETRY_STATUS or attempt == cfg.max_retries:
                    raise JudgeError(f"Judge endpoint {url} answered HTTP {e.code}: {detail}") from e
                log.warning("judge HTTP %d (attempt %d/%d), retrying in %.1f s", e.code, attempt + 1,
                            cfg.max_retries + 1, delay)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == cfg.max_retries:
                    raise JudgeError(f"Judge endpoint {url} unreachable after {attempt + 1} attempts: {e}") from e
                log.warning("judge endpoint error %s (attempt %d), retrying in %.1f s", e, attempt + 1, delay)
            self._sleep(delay)
            delay *= 2
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"Judge endpoint {url} returned a malformed response: {payload[:300]!r}") from e
        return content or ""

    def judge(self, question: str, reference: str, prediction: str, question_type: str | None = None) -> Judgement:
        reply = self.complete(build_messages(question, reference, prediction, question_type))
        return Judgement(parse_verdict(reply), reply)


def judge_all(client: JudgeClient, items: Iterable[dict]) -> tuple[list[dict], dict[str, dict]]:
    """Judge every item ({id, question_type, question, reference, prediction}).

    Returns (per-item rows with verdict and raw reply, {question_type | "overall": Tally.as_dict()}).
    A JudgeError on one item is recorded as invalid (and counted), never silently dropped.
    """
    rows, tallies = [], {"overall": Tally()}
    for it in items:
        qtype = it.get("question_type") or "unknown"
        try:
            j = client.judge(it["question"], it["reference"], it["prediction"], qtype)
            verdict, reply, error = j.verdict, j.reply, None
        except JudgeError as e:
            log.error("judge failed on record %s: %s", it.get("id"), e)
            verdict, reply, error = None, "", str(e)
        tallies["overall"].add(verdict)
        tallies.setdefault(qtype, Tally()).add(verdict)
        rows.append({"id": it.get("id"), "question_type": qtype, "verdict": verdict, "reply": reply, "error": error})
    return rows, {k: t.as_dict() for k, t in tallies.items()}
