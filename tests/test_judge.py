"""LLM judge: strict verdict parser, rubric prompts, and the HTTP client against a loopback OpenAI-style server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stllm_core.errors import ConfigError
from training import judge


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("correct", True),
        ("Correct.", True),
        ("CORRECT", True),
        ("**Correct**", True),
        ("Verdict: correct", True),
        ("correct - the side matches\nmore text", True),
        ("\n\n  correct\n", True),
        ("incorrect", False),
        ("Incorrect.", False),
        ("wrong", False),
        ("Wrong!", False),
        ("not correct", False),
        ("Not correct, the fridge is on the right.", False),
        ("", None),
        (None, None),
        ("   \n ", None),
        ("banana", None),
        ("I think it is correct", None),
        ("partially correct", None),
        ("correctly placed", None),
        ("The answer is incorrect", None),
    ],
)
def test_parse_verdict_table(reply, expected):
    assert judge.parse_verdict(reply) is expected


def test_tally_counts_invalid_as_failure():
    t = judge.Tally()
    for v in (True, True, False, None):
        t.add(v)
    assert (t.correct, t.wrong, t.invalid, t.total) == (2, 1, 1, 4)
    assert t.accuracy == pytest.approx(50.0)


def test_messages_use_task_rubric():
    msgs = judge.build_messages("Where is the fridge?", "On the left.", "", "relative_direction")
    assert msgs[0]["role"] == "system" and "correct or wrong" in msgs[0]["content"]
    user = msgs[1]["content"]
    assert judge.RUBRICS["relative_direction"] in user and "Candidate answer: (empty)" in user
    assert judge.DEFAULT_RUBRIC in judge.build_messages("q", "r", "p", "no_such_type")[1]["content"]
    assert set(judge.RUBRICS) == {"relative_direction", "relative_distance", "find_my_item", "furniture_affordance",
                                  "action_planning"}


class _Server:
    """An OpenAI-compatible /chat/completions endpoint on 127.0.0.1 with scripted answers."""

    def __init__(self, script):
        self.script = list(script)  # items: (status, reply text) consumed in order
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, text = outer.script.pop(0)
                if status == 200:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                else:
                    payload = json.dumps({"error": text})
                data = payload.encode() if status != 299 else text.encode()
                self.send_response(200 if status == 299 else status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _client(url, **kw):
    cfg = judge.JudgeConfig(base_url=url, model="judge-test", api_key_env="STLLM_TEST_JUDGE_KEY", timeout_sec=30,
                            retry_backoff_sec=0.0, **kw)
    return judge.JudgeClient(cfg, sleep=lambda s: None)


def test_client_round_trip_and_retry(monkeypatch):
    monkeypatch.setenv("STLLM_TEST_JUDGE_KEY", "sk-test")
    items = [
        {"id": "a", "question_type": "relative_direction", "question": "Where?", "reference": "Left.",
         "prediction": "Left."},
        {"id": "b", "question_type": "relative_direction", "question": "Where?", "reference": "Left.",
         "prediction": "Right."},
        {"id": "c", "question_type": "find_my_item", "question": "Where is my mug?", "reference": "On the left.",
         "prediction": "Somewhere."},
        {"id": "d", "question_type": "find_my_item", "question": "Where is my mug?", "reference": "On the left.",
         "prediction": "Left."},
    ]
    script = [(200, "Correct."), (503, "busy"), (200, "incorrect"), (200, "It depends"), (400, "bad request")]
    with _Server(script) as srv:
        rows, tallies = judge.judge_all(_client(srv.url), items)
    assert [r["verdict"] for r in rows] == [True, False, None, None]
    assert rows[3]["error"] and "HTTP 400" in rows[3]["error"]
    assert {k: tallies["overall"][k] for k in ("correct", "wrong", "invalid", "accuracy")} == {
        "correct": 1, "wrong": 1, "invalid": 2, "accuracy": 25.0}
    assert abs(tallies["overall"]["stderr"] - 100 * (0.25 * 0.75 / 4) ** 0.5) < 1e-9
    assert tallies["relative_direction"]["accuracy"] == 50.0 and tallies["find_my_item"]["invalid"] == 2
    assert len(srv.requests) == 5  # the 503 was retried once
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-test" and req["body"]["temperature"] == 0.0
    assert "Candidate answer: Left." in req["body"]["messages"][1]["content"]


def test_client_errors(monkeypatch):
    monkeypatch.delenv("STLLM_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="STLLM_TEST_JUDGE_KEY"):
        _client("http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="base_url"):
        judge.JudgeConfig(base_url="ftp://x")
    with _Server([(299, "not json"), (503, "a"), (503, "b")]) as srv:
        c = judge.JudgeClient(judge.JudgeConfig(base_url=srv.url, api_key_env=None, max_retries=1,
                                                retry_backoff_sec=0.0), sleep=lambda s: None)
        with pytest.raises(judge.JudgeError, match="malformed"):
            c.judge("q", "r", "p")
        with pytest.raises(judge.JudgeError, match="HTTP 503"):
            c.judge("q", "r", "p")
        assert srv.requests[0]["auth"] is None and len(srv.requests) == 3
