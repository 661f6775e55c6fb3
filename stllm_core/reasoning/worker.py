"""AnswerWorker: one inference thread fed by a bounded queue, with a per-question deadline and cancellation.

Callers (the ROS service and action callbacks) submit a job and wait on its Future; the worker never runs inside a ROS
callback, so sensor callbacks keep flowing while a question is answered. Beyond `queue_size` waiting jobs `submit`
raises Busy (`reserve` takes a place ahead of time, so an action server can reject a goal before accepting it).
A job whose deadline passes while waiting is failed without running; a running job gets its `cancel` event set at the
deadline (the engine stops at the next token). `cancel(job)` removes a waiting job from the queue at once, or stops a
running one at its next token; its future then raises Cancelled carrying what the job returned (the partial answer).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from stllm_core.errors import STLLMError

log = logging.getLogger(__name__)


class Busy(STLLMError):
    """The queue is full."""


class Timeout(STLLMError):
    """The question's deadline passed."""


class Cancelled(STLLMError):
    """The caller cancelled the job. `partial`: what the job returned after it stopped (None if it never ran)."""

    def __init__(self, message: str, partial: Any = None):
        super().__init__(message)
        self.partial = partial


@dataclass(eq=False)
class Job:
    fn: Callable[[threading.Event], Any]
    deadline: float
    timeout: float
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop at the next token
    state: str = "queued"  # queued | running | done
    cancelled: bool = False  # by the caller (not by the deadline)


class AnswerWorker:
    def __init__(self, queue_size: int, name: str = "stllm-answer-worker"):
        self.queue_size = queue_size
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._reserved = 0
        self._running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs waiting behind the running one (places reserved for them included)."""
        with self._cond:
            return len(self._queue) + self._reserved

    @property
    def busy(self) -> bool:
        return self._running is not None

    def _refusal(self) -> str | None:
        waiting = len(self._queue) + self._reserved
        if waiting >= self.queue_size + (0 if self._running is not None else 1):
            return (f"the reasoner is busy: {waiting} question(s) waiting (queue_size={self.queue_size}); "
                    "try again shortly")
        return None

    def reserve(self) -> str | None:
        """Take a place in the queue for a later `submit(..., reserved=True)`; the busy reason if there is none."""
        with self._cond:
            reason = self._refusal()
            if reason is None:
                self._reserved += 1
            return reason

    def release(self) -> None:
        """Give back a reserved place that will not be used."""
        with self._cond:
            self._reserved = max(0, self._reserved - 1)

    def submit(self, fn: Callable[[threading.Event], Any], timeout: float, reserved: bool = False) -> Job:
        """Queue `fn(cancel_event)`; raises Busy when `queue_size` jobs already wait behind the running one."""
        job = Job(fn, time.monotonic() + timeout, timeout)
        with self._cond:
            if reserved:
                self._reserved = max(0, self._reserved - 1)
            else:
                reason = self._refusal()
                if reason is not None:
                    raise Busy(reason)
            self._queue.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Cancel `job`: a waiting one leaves the queue now, a running one stops at its next token. False when it had
        finished already."""
        with self._cond:
            if job.state == "done" or job.cancelled:
                return job.cancelled and job.state != "done"
            job.cancelled = True
            if job.state == "queued":
                self._queue.remove(job)
                job.state = "done"
                job.future.set_exception(Cancelled("cancelled while waiting in the queue"))
                return True
            job.cancel.set()
            return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                job.state = "running"
                self._running = job
            try:
                if time.monotonic() >= job.deadline:
                    job.future.set_exception(Timeout(f"timed out after {job.timeout:.1f} s while waiting in the queue"))
                    continue
                timer = threading.Timer(max(0.0, job.deadline - time.monotonic()), job.cancel.set)
                timer.daemon = True
                timer.start()
                try:
                    result = job.fn(job.cancel)
                finally:
                    timer.cancel()
                if job.cancelled:
                    job.future.set_exception(Cancelled("cancelled while answering", partial=result))
                elif job.cancel.is_set():
                    job.future.set_exception(Timeout(f"timed out after {job.timeout:.1f} s while answering"))
                else:
                    job.future.set_result(result)
            except BaseException as e:  # the worker must survive anything a job raises
                if not isinstance(e, STLLMError):
                    log.exception("answering failed")
                job.future.set_exception(e)
            finally:
                with self._cond:
                    job.state = "done"
                    self._running = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for job in pending:
            job.state = "done"
            job.future.set_exception(Cancelled("the reasoner is shutting down"))
        if self._running is not None:
            self._running.cancel.set()
        self._thread.join(timeout=10)
