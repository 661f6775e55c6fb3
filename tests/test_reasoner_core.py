"""Reasoner and AnswerWorker without ROS: the queue bound, the per-question deadline, cancellation, bad input."""

from __future__ import annotations

import threading
import time

import pytest

from stllm_core.errors import ConfigError
from stllm_core.model.tiny import random_clip
from stllm_core.reasoning.config import ReasonerConfig
from stllm_core.reasoning.pipeline import AnswerPipeline
from stllm_core.reasoning.reasoner import Reasoner, clean_question
from stllm_core.reasoning.worker import AnswerWorker, Busy, Cancelled, Timeout
from stllm_core.types import Clip


def test_worker_refuses_beyond_the_queue_bound_and_survives_errors():
    worker = AnswerWorker(queue_size=1)
    gate = threading.Event()
    running = worker.submit(lambda cancel: gate.wait(10) and "first", timeout=30).future
    time.sleep(0.2)  # the first job is running now
    waiting = worker.submit(lambda cancel: "second", timeout=30).future
    with pytest.raises(Busy, match="busy"):
        worker.submit(lambda cancel: "third", timeout=30)
    gate.set()
    assert running.result(10) == "first" and waiting.result(10) == "second"
    failing = worker.submit(lambda cancel: 1 / 0, timeout=30).future
    with pytest.raises(ZeroDivisionError):
        failing.result(10)
    assert worker.submit(lambda cancel: "alive", timeout=30).future.result(10) == "alive"
    worker.close()


def test_worker_cancels_a_job_at_its_deadline():
    worker = AnswerWorker(queue_size=2)
    seen = []

    def slow(cancel: threading.Event):
        seen.append(cancel.wait(30))  # returns True as soon as the deadline sets it
        return "late"

    fut = worker.submit(slow, timeout=0.3).future
    with pytest.raises(Timeout, match="while answering"):
        fut.result(30)
    assert seen == [True]
    worker.close()


def test_worker_fails_a_job_whose_deadline_passed_in_the_queue():
    worker = AnswerWorker(queue_size=2)
    gate = threading.Event()
    worker.submit(lambda cancel: gate.wait(10), timeout=30)
    time.sleep(0.1)
    queued = worker.submit(lambda cancel: "never", timeout=0.2).future
    time.sleep(0.5)
    gate.set()
    with pytest.raises(Timeout, match="waiting in the queue"):
        queued.result(10)
    worker.close()


def test_worker_cancel_removes_a_waiting_job_and_stops_a_running_one():
    worker = AnswerWorker(queue_size=1)
    stopped = []

    def long(cancel: threading.Event):
        stopped.append(cancel.wait(30))
        return "partial"

    running = worker.submit(long, timeout=60)
    time.sleep(0.2)
    queued = worker.submit(lambda cancel: "never", timeout=60)
    with pytest.raises(Busy):
        worker.submit(lambda cancel: "third", timeout=60)
    assert worker.cancel(queued) and worker.waiting == 0  # out of the queue at once: the place is free again
    with pytest.raises(Cancelled, match="waiting in the queue"):
        queued.future.result(1)
    assert worker.reserve() is None  # the freed place, taken for a later submit
    assert "busy" in worker.reserve()
    worker.release()
    assert worker.cancel(running)
    with pytest.raises(Cancelled, match="while answering") as e:
        running.future.result(10)
    assert e.value.partial == "partial" and stopped == [True]
    assert worker.submit(lambda cancel: "next", timeout=30).future.result(10) == "next"
    assert not worker.cancel(running)  # finished: nothing to cancel
    worker.close()


@pytest.fixture(scope="module")
def pipeline():
    return AnswerPipeline.load("tiny-random")


def test_reasoner_answers_and_refuses_with_reasons(pipeline):
    clip = random_clip(4, seed=1)
    r = Reasoner(ReasonerConfig(model="tiny-random", max_new_tokens=4), pipeline, lambda w, n, s: clip)
    ok = r.ask("Where is the mug?")
    assert ok.success and ok.num_frames == 4 and ok.num_tokens <= 4 and ok.clip_start == clip.start
    assert "empty" in r.ask("   ").error
    assert "window_sec" in r.ask("Where?", window_sec=-2).error
    assert "max_new_tokens" in r.ask("Where?", max_new_tokens=10_000).error
    r.close()
    empty = Reasoner(ReasonerConfig(model="tiny-random"), pipeline, lambda w, n, s: Clip(frames=()))
    assert "no camera frames" in empty.ask("Where is the mug?").error
    empty.close()


def test_reasoner_times_out_a_slow_answer(pipeline):
    def slow_clip(window, n, strategy):
        time.sleep(1.0)
        return random_clip(4, seed=2)

    r = Reasoner(ReasonerConfig(model="tiny-random", timeout_sec=0.2), pipeline, slow_clip)
    res = r.ask("Where is the mug?")
    assert not res.success and "timed out" in res.error
    r.close()


def test_question_cleaning_and_config_errors():
    assert clean_question("a\x00b\u200b c\n\td", 100) == "ab c d"
    with pytest.raises(ConfigError, match="queue_size"):
        ReasonerConfig(queue_size=-1)
    with pytest.raises(ConfigError, match="service_name"):
        ReasonerConfig(service_name="ask me")


def test_a_cancelled_answer_keeps_its_partial_text_and_the_next_question_is_answered(pipeline):
    clip = random_clip(4, seed=1)
    cfg = ReasonerConfig(model="tiny-random", max_new_tokens=512, queue_size=1)
    r = Reasoner(cfg, pipeline, lambda w, n, s: clip)
    partial, phases, counts = [], [], []
    started = threading.Event()

    def on_text(text, n):
        partial.append(text)
        counts.append(n)
        started.set()

    req = r.submit("Where is the mug?", on_text=on_text, on_phase=phases.append, temperature=1.0)
    queued = r.submit("And the pan?")
    assert queued.phase == "queued"
    assert started.wait(30)
    assert queued.cancel() and req.cancel()
    res, res_queued = req.wait(), queued.wait()
    assert res.status == "cancelled" and not res.success and res.answer == partial[-1]
    assert 0 < res.num_tokens < 512 and res.num_tokens >= counts[-1]
    assert res_queued.status == "cancelled" and res_queued.num_tokens == 0 and "queue" in res_queued.error
    assert phases == ["encoding", "generating"]
    ok = r.ask("Where is the mug?", max_new_tokens=4)
    assert ok.success and ok.status == "answered" and ok.request_id
    assert "temperature" in r.ask("Where?", temperature=-1.0).error
    assert "top_p" in r.ask("Where?", top_p=0.0).error
    stats = r.stats.snapshot()
    assert stats["cancelled"] == 2 and stats["answered"] == 1 and stats["refused"] == 2
    assert stats["last_latency_ms"] > 0 and "top_p" in stats["last_refusal"]
    r.close()



def test_service_and_topic_names_are_checked_with_the_reason():
    assert ReasonerConfig(service_name="stllm/ask").service_name == "stllm/ask"  # relative: the node's namespace
    for bad in ("stllm ask", "stllm//ask", "2d/ask"):
        with pytest.raises(ConfigError, match="service_name"):
            ReasonerConfig(service_name=bad)
