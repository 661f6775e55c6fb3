"""Helpers for tests that use real ROS 2 (rclpy + Fast DDS over loopback) across processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ros_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: loopback DDS, the SHM profile, offline HF, this repo first on PYTHONPATH."""
    env = dict(os.environ)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(ROOT / "config" / "fastdds_localhost.xml"))
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class NodeProcess:
    """A child process (usually a ROS node) started with `ros_env()`, killed on exit; its output is kept for asserts.

    with NodeProcess([sys.executable, "-m", "stllm_ros.reasoner_node", ...]) as proc:
        ...
        proc.output  # everything it printed so far
    """

    def __init__(self, cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None):
        self.cmd = list(cmd)
        self.env = env or ros_env()
        self.cwd = cwd or ROOT
        self.proc: subprocess.Popen | None = None
        self._chunks: list[str] = []
        self._reader: threading.Thread | None = None

    @classmethod
    def python(cls, module: str, *args: str, env: dict[str, str] | None = None) -> NodeProcess:
        return cls([sys.executable, "-m", module, *args], env=env)

    def __enter__(self) -> NodeProcess:
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._chunks.append(line)

    @property
    def output(self) -> str:
        return "".join(self._chunks)

    def wait_for_output(self, text: str, timeout: float = 60.0) -> None:
        try:
            wait_until(lambda: text in self.output or self.returncode is not None, timeout, what=repr(text))
        except TimeoutError as e:
            raise TimeoutError(f"{e}; process output so far:\n{self.output[-4000:]}") from None
        if text not in self.output:
            raise RuntimeError(f"process exited ({self.returncode}) before printing {text!r}:\n{self.output[-4000:]}")

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        if self._reader:
            self._reader.join(5)
        return rc

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGINT (a clean ROS shutdown), then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.wait(5)

    def __exit__(self, *exc) -> None:
        self.stop()


class RosTestNode:
    """An rclpy context + node spun by a MultiThreadedExecutor in a background thread (shut down cleanly on close)."""

    def __init__(self, name: str = "test_client"):
        import rclpy
        from rclpy.executors import MultiThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def wait_for_service(self, client, timeout: float = 60.0) -> None:
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"service {client.srv_name} not available after {timeout:.0f} s")
        time.sleep(1.0)  # the server's request reader may not have matched this client yet (a request would be lost)

    def call(self, client, request, timeout: float = 60.0):
        """Call a service and wait for the reply; retries the send once if the reply never comes (discovery races)."""
        for attempt in range(2):
            future = client.call_async(request)
            done = threading.Event()
            future.add_done_callback(lambda _f, done=done: done.set())
            if done.wait(timeout if attempt else timeout / 2):
                return future.result()
            client.remove_pending_request(future)
        raise TimeoutError(f"no reply from {client.srv_name} after {timeout:.0f} s")

    def close(self) -> None:
        self.executor.shutdown()
        self._thread.join(10)
        self.node.destroy_node()
        self.context.try_shutdown()

    def __enter__(self) -> RosTestNode:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
