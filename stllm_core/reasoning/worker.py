"""AnswerWorker: one inference thread fed by a bounded queue, with a per-question deadline.

Callers (the ROS service callback) submit a job and wait on its Future; the worker never runs inside a ROS callback, so
sensor callbacks keep flowing while a question is answered. Beyond `queue_size` waiting jobs `submit` raises Busy;
a job whose deadline passes while waiting is failed without running; a running job gets its `cancel` event set at the
deadline (the engine stops at the next token).
"""

from __future__ import annotations

import logging
import queue
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


@dataclass
class _Job:
    fn: Callable[[threading.Event], Any]
    deadline: float
    timeout: float
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)


class AnswerWorker:
    def __init__(self, queue_size: int, name: str = "stllm-answer-worker"):
        self.queue_size = queue_size
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: _Job | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, fn: Callable[[threading.Event], Any], timeout: float) -> Future:
        """Queue `fn(cancel_event)`; raises Busy when `queue_size` jobs already wait behind the running one."""
        with self._lock:
            busy_running = self._running is not None
            if self._waiting >= self.queue_size + (0 if busy_running else 1):
                raise Busy(
                    f"the reasoner is busy: {self._waiting} question(s) waiting (queue_size={self.queue_size}); "
                    "try again shortly"
                )
            self._waiting += 1
        job = _Job(fn, time.monotonic() + timeout, timeout)
        self._queue.put(job)
        return job.future

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
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
                if job.cancel.is_set():
                    job.future.set_exception(Timeout(f"timed out after {job.timeout:.1f} s while answering"))
                else:
                    job.future.set_result(result)
            except BaseException as e:  # the worker must survive anything a job raises
                if not isinstance(e, STLLMError):
                    log.exception("answering failed")
                job.future.set_exception(e)
            finally:
                with self._lock:
                    self._running = None

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
