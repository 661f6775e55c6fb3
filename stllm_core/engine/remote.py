"""RemoteEngine: Engine.generate through an OpenAI-compatible server that takes prompt embeddings (vLLM).

A fleet runs one language-model server for many robots. Each robot keeps the encoders, the aligner, the tokenizer and
the LM's input embeddings, builds the prompt embeddings (prefix tokens + prompt tokens) exactly as for the local
engine, and sends them to the server's `/v1/completions` with `prompt_embeds` (base64 of `torch.save` of the
(L, D) tensor: the format vLLM's `--enable-prompt-embeds` reads with `torch.load(weights_only=True)`), streaming.
The server returns token ids (`return_token_ids`); the robot detokenizes them as it does locally, so greedy answers
are the same tokens as the local engine's.

    engine = RemoteEngine("http://127.0.0.1:8000", "stllm-smol", EngineConfig(stop_token_ids=(2,)), hidden_size=576)
    engine.connect(tokenizer)       # the served model is the local one: name, hidden size, vocabulary (or raises)
    gen = engine.generate(embeds)   # a Generation, as Engine.generate returns

Timings as seen from the robot: prefill_ms = request sent -> first token received (network + queueing + prefill),
decode_ms = the rest (callback time excluded). Cancellation (`cancel` set, or the per-question timeout) closes the
stream; vLLM aborts a request whose client went away. Every failure of the server or the network raises
LLMServerError with what happened; nothing the server sends can raise anything else.
An API key for a server behind an authenticating proxy: the environment variable STLLM_LLM_API_KEY (sent as
`Authorization: Bearer ...`).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable

import torch

from stllm_core.engine.generation import EngineConfig, Generation, check_max_new_tokens, check_prompt_embeds
from stllm_core.errors import InputError, STLLMError

logger = logging.getLogger(__name__)

PROBE_TEXT = "Where did I put the mug? 0123 kitchen, fridge."
MAX_ERROR_CHARS = 300


class LLMServerError(STLLMError):
    """The language-model server is unreachable, refused a request, or replied with something malformed."""


def parse_llm_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of 'http[s]://host[:port][/prefix]' (a trailing /v1 is dropped).

    Example: parse_llm_url("http://127.0.0.1:8000/v1") -> ("http", "127.0.0.1", 8000, "").
    """
    u = urllib.parse.urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise InputError(f"llm_url must be http://host:port or https://host:port (an OpenAI-compatible server); "
                         f"got {url!r}")
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"llm_url {url!r} has an invalid port") from None
    prefix = u.path.rstrip("/")
    if prefix.endswith("/v1"):
        prefix = prefix[:-3]
    return u.scheme, u.hostname, port, prefix


def embeds_to_base64(embeds: torch.Tensor) -> str:
    """base64 of torch.save of a contiguous CPU (L, D) tensor: what vLLM's prompt_embeds field takes."""
    buf = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous().clone(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def _error_message(status: int, body: bytes) -> str:
    """The server's own reason ({"error": {"message": ...}} or {"detail": ...}), else the body, shortened."""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            err = data.get("error", data.get("detail", data.get("message")))
            if isinstance(err, dict):
                err = err.get("message", err)
            if err:
                return f"HTTP {status}: {_short(err)}"
    except (ValueError, UnicodeDecodeError):
        pass
    return f"HTTP {status}: {_short(body.decode('utf-8', 'replace')) or '(empty body)'}"


class RemoteEngine:
    """Generates token ids from prompt embeddings on a remote OpenAI-compatible server (see the module docstring).

    `model_name`: the served model's name (`stllm-serve` serves the model under the stllm model's name).
    `connect_timeout_sec`: TCP connect; `read_timeout_sec`: the longest silence between two streamed chunks (the
    per-question timeout of the reasoner bounds the whole answer through `cancel`). Thread-safe: each call opens its
    own connection.
    """

    backend = "remote"

    def __init__(self, url: str, model_name: str, config: EngineConfig | None = None, hidden_size: int = 0,
                 vocab_size: int = 0, connect_timeout_sec: float = 5.0, read_timeout_sec: float = 60.0) -> None:
        self.url = url
        self.scheme, self.host, self.port, self.prefix = parse_llm_url(url)
        self.model_name = model_name
        self.config = config or EngineConfig()
        self.hidden_size = int(hidden_size)
        self.vocab_size = int(vocab_size)
        self.connect_timeout_sec = float(connect_timeout_sec)
        self.read_timeout_sec = float(read_timeout_sec)
        self.max_model_len = 0
        self.device, self.dtype = torch.device("cpu"), torch.float32

    # --- HTTP ------------------------------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.connect_timeout_sec)

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get("STLLM_LLM_API_KEY", "")
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _open(self, method: str, path: str, body: dict | None = None):
        """(connection, response) with the response's headers read; LLMServerError when unreachable."""
        conn = self._connection()
        data = json.dumps(body).encode() if body is not None else None
        try:
            conn.request(method, self.prefix + path, body=data, headers=self._headers())
            if conn.sock is not None:
                conn.sock.settimeout(self.read_timeout_sec)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise LLMServerError(f"the language-model server at {self.url} is unreachable ({method} {path}: "
                                 f"{type(e).__name__}: {e})") from None

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        conn, resp = self._open(method, path, body)
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise LLMServerError(f"the language-model server at {self.url} dropped the reply to {path}: {e}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise LLMServerError(f"the language-model server at {self.url} refused {path}: "
                                 f"{_error_message(resp.status, raw)}")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise LLMServerError(f"the language-model server at {self.url} sent a reply to {path} that is not "
                                 f"JSON: {_short(raw[:200].decode('utf-8', 'replace'))}") from None
        if not isinstance(data, dict):
            raise LLMServerError(f"the language-model server at {self.url} sent a reply to {path} that is not a "
                                 f"JSON object: {_short(str(data))}")
        return data

    # --- configure-time checks ------------------------------------------------------------------------------------
    def connect(self, tokenizer=None) -> dict:
        """Check that the server serves this model: its name among /v1/models, the same tokenizer (a probe text
        tokenized by both), and its hidden size (a one-position prompt_embeds request). Returns what was found;
        raises LLMServerError saying what does not match."""
        models = self._json("GET", "/v1/models").get("data")
        if not isinstance(models, list):
            raise LLMServerError(f"{self.url}/v1/models did not list models")
        names = [m.get("id") for m in models if isinstance(m, dict)]
        entry = next((m for m in models if isinstance(m, dict) and m.get("id") == self.model_name), None)
        if entry is None:
            raise LLMServerError(
                f"the server at {self.url} does not serve {self.model_name!r} (it serves {names}); start it with "
                f"`stllm-serve --model {self.model_name}` (or vLLM's --served-model-name {self.model_name}) over the "
                f"same language model as the local one")
        self.max_model_len = int(entry.get("max_model_len") or 0)
        if tokenizer is not None:
            want = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
            got = self._json("POST", "/tokenize", {"model": self.model_name, "prompt": PROBE_TEXT,
                                                   "add_special_tokens": False}).get("tokens")
            if got != want:
                raise LLMServerError(
                    f"the model served as {self.model_name!r} at {self.url} has another vocabulary: {PROBE_TEXT!r} "
                    f"is {want} here and {got} there (serve this model's own language model: stllm-serve)")
        if self.hidden_size:
            try:
                self._completion(torch.zeros(1, self.hidden_size), 1, 0.0, 1.0, stream=False)
            except LLMServerError as e:
                raise LLMServerError(f"the model served as {self.model_name!r} at {self.url} does not take "
                                     f"{self.hidden_size}-wide prompt embeddings (this model's hidden size): {e}"
                                     ) from None
        logger.info("language model %r served at %s (max_model_len %d)", self.model_name, self.url,
                    self.max_model_len)
        return {"model": self.model_name, "max_model_len": self.max_model_len, "served": names}

    # --- generation ------------------------------------------------------------------------------------------------
    def _request_body(self, embeds: torch.Tensor, n_max: int, temperature: float, top_p: float, stream: bool) -> dict:
        return {"model": self.model_name, "prompt": None, "prompt_embeds": embeds_to_base64(embeds),
                "max_tokens": n_max, "temperature": temperature, "top_p": top_p, "seed": self.config.seed,
                "stop_token_ids": list(self.config.stop_token_ids), "return_token_ids": True,
                "skip_special_tokens": False, "stream": stream}

    def _completion(self, embeds, n_max, temperature, top_p, stream):
        conn, resp = self._open("POST", "/v1/completions", self._request_body(embeds, n_max, temperature, top_p,
                                                                               stream))
        if resp.status != 200 or not stream:
            try:
                raw = resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise LLMServerError(f"the language-model server at {self.url} dropped its reply: {e}") from None
            finally:
                conn.close()
            if resp.status != 200:
                raise LLMServerError(f"the language-model server at {self.url} refused the question: "
                                     f"{_error_message(resp.status, raw)}")
            return raw
        return conn, resp

    def _check_embeds(self, inputs_embeds: torch.Tensor, n_max: int) -> torch.Tensor:
        check_prompt_embeds(inputs_embeds, n_max, self.hidden_size, self.max_model_len, "the server's max_model_len")
        return inputs_embeds[0]  # sent in its own dtype (bf16 halves the bytes); the server casts to its own

    def _chunk_tokens(self, line: bytes) -> tuple[list[int], str | None] | None:
        """(token ids, finish_reason) of one 'data: {...}' line; None for '[DONE]'; LLMServerError if malformed."""
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return None
        try:
            data = json.loads(payload)
            choice = data["choices"][0]
            ids = choice.get("token_ids") or []
            reason = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            if b'"error"' in payload:
                raise LLMServerError(f"the language-model server at {self.url} failed mid-answer: "
                                     f"{_error_message(500, payload)}") from None
            raise LLMServerError(f"the language-model server at {self.url} sent a malformed stream chunk: "
                                 f"{_short(payload[:200].decode('utf-8', 'replace'))}") from None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and
                                                (not self.vocab_size or t < self.vocab_size) for t in ids):
            raise LLMServerError(f"the language-model server at {self.url} sent token ids that are not ids of this "
                                 f"vocabulary ({self.vocab_size} tokens): {_short(str(ids))}")
        return ids, reason

    def generate(
        self,
        inputs_embeds: torch.Tensor,
        max_new_tokens: int | None = None,
        on_token: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> Generation:
        """As Engine.generate: up to `max_new_tokens` token ids after `inputs_embeds` (1, L, D), stop tokens excluded,
        `on_token(id)` per kept token in order, `cancel` checked between streamed chunks (it also closes the
        stream at once, from a watcher thread, while a read waits)."""
        n_max = self.config.max_new_tokens if max_new_tokens is None else check_max_new_tokens(max_new_tokens)
        embeds = self._check_embeds(inputs_embeds, n_max)
        if cancel is not None and cancel.is_set():
            return Generation([], 0.0, 0.0, "cancelled")
        temperature, top_p = self.config.sampling(temperature, top_p)
        stops = set(self.config.stop_token_ids)
        tokens: list[int] = []
        stopped, callback_s, t_first = "length", 0.0, None
        t0 = time.perf_counter()
        conn, resp = self._completion(embeds, n_max, temperature, top_p, True)
        done = threading.Event()

        def watch() -> None:  # closing the socket is what ends a blocked read and tells the server to stop
            while not done.wait(0.02):
                if cancel.is_set():
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except (OSError, AttributeError):
                        pass
                    return

        if cancel is not None:
            threading.Thread(target=watch, daemon=True, name="stllm-remote-cancel").start()
        finished = False
        try:
            while not finished:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as e:
                    if cancel is not None and cancel.is_set():
                        stopped = "cancelled"
                        break
                    raise LLMServerError(f"lost the language-model server at {self.url} mid-answer after "
                                         f"{len(tokens)} tokens ({type(e).__name__}: {e})") from None
                if not line:
                    if cancel is not None and cancel.is_set():
                        stopped = "cancelled"
                        break
                    raise LLMServerError(f"the language-model server at {self.url} closed the stream mid-answer "
                                         f"after {len(tokens)} tokens")
                if not line.startswith(b"data:"):
                    continue  # blank separators, SSE comments
                parsed = self._chunk_tokens(line)
                if parsed is None:
                    break
                ids, reason = parsed
                if t_first is None and ids:
                    t_first = time.perf_counter()
                for tok in ids:
                    if tok in stops:
                        stopped, finished = "eos", True
                        break
                    if len(tokens) >= n_max:
                        finished = True
                        break
                    tokens.append(tok)
                    if on_token is not None:
                        tc = time.perf_counter()
                        on_token(tok)
                        callback_s += time.perf_counter() - tc
                if reason is not None and not finished:  # the server's own stop: an eos it did not send, or length
                    stopped, finished = ("eos" if reason == "stop" else "length"), True
                if cancel is not None and cancel.is_set() and not finished:
                    stopped = "cancelled"
                    break
        finally:
            done.set()
            conn.close()
        t2 = time.perf_counter()
        t_first = t_first or t2
        return Generation(tokens=tokens, prefill_ms=(t_first - t0) * 1e3,
                          decode_ms=max((t2 - t_first - callback_s) * 1e3, 0.0), stopped=stopped,
                          callback_ms=callback_s * 1e3)
