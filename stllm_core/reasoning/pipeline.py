"""AnswerPipeline: question + Clip -> answer text, the one object the ROS node and the evaluation use.

    pipe = AnswerPipeline.load(model="tiny-random", device="cpu", dtype="float32", backend="eager", seed=0)
    ans = pipe.answer("Where is the mug?", clip, on_text=print)   # on_text(partial answer so far, tokens so far)
    ans.text, ans.encode_ms, ans.prefill_ms, ans.decode_ms

Steps: clean/validate the question -> processor (frames, rays, points, prompt ids) -> model.get_prefix_embeds
(encoder stack; `encode_ms` covers processor + encoders + prompt embedding) -> Engine.generate (prefill/decode ms)
-> detokenize (special tokens skipped, stripped). One lock serializes inference: answer() is safe to call from
several threads, one question at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stllm_core.config import check, check_choice
from stllm_core.engine import Engine, EngineConfig, check_max_new_tokens
from stllm_core.engine.backends import make_encoder
from stllm_core.engine.export import EncoderStack, encoder_args, pad_encoder_inputs
from stllm_core.errors import InputError, ModelLoadError
from stllm_core.types import Clip

logger = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
EMBEDDED = ("stllm-smol",)  # models shipped in the repository's models/ folder (share/stllm_ros/models when installed)


def resolve_embedded(name: str) -> Path:
    """The directory of an embedded model: <repo>/models/<name>, or share/stllm_ros/models/<name> of an install."""
    roots = [Path(__file__).resolve().parents[2]]
    roots += [Path(p) / "share" / "stllm_ros" for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    for root in roots:
        cand = root / "models" / name
        if (cand / "config.json").exists():
            return cand
    raise ModelLoadError(
        f"the embedded model {name!r} is not in this installation (looked for models/{name}/config.json under "
        f"{', '.join(str(r) for r in roots)}); train it with scripts/train_smol.sh, pass a model directory, or use "
        f"model:={TINY_RANDOM} (untrained, for plumbing only)"
    )
def served_name(model: str) -> str:
    """The name a language-model server serves this model's LM under (stllm-serve): the embedded model's name or
    the model directory's name. Example: served_name("runs/x/export/") -> "export"."""
    return model if model in EMBEDDED or model == TINY_RANDOM else Path(model).expanduser().resolve().name


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_QUESTION_CHARS = 1000


@dataclass(frozen=True)
class Answer:
    """One answer with its timings (milliseconds) and what it was computed from."""

    text: str
    num_tokens: int
    encode_ms: float  # processor + vision/point encoders + aligner + prompt embedding
    prefill_ms: float  # language model over the prompt, to the first token
    decode_ms: float  # the remaining tokens (streaming callback time excluded)
    num_frames: int  # frames the model saw
    num_points: int  # voxelized scene points the model saw
    stopped: str = "eos"  # "eos" | "length" | "cancelled"

    @property
    def total_ms(self) -> float:
        return self.encode_ms + self.prefill_ms + self.decode_ms


def remove_control_chars(text: str) -> str:
    """Drop Unicode control/format characters (C0/C1 controls, zero-width and bidi marks); whitespace becomes ' '."""
    out = []
    for ch in text:
        if ch.isspace():
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            continue
        else:
            out.append(ch)
    return "".join(out)


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available) -> torch.device; ConfigError if unusable."""
    check(isinstance(device, str) and bool(device), "device", device, "'cpu', 'cuda', 'cuda:N' or 'auto'")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        check(False, "device", device, "'cpu', 'cuda', 'cuda:N' or 'auto'")
    check(dev.type in ("cpu", "cuda"), "device", device, "'cpu', 'cuda', 'cuda:N' or 'auto'")
    if dev.type == "cuda":
        check(torch.cuda.is_available(), "device", device, "a CUDA device, but torch.cuda.is_available() is False")
        count = torch.cuda.device_count()
        check(dev.index is None or dev.index < count, "device", device, f"an index below {count}")
    return dev


class AnswerPipeline:
    """Processor + model + engine behind one thread-safe `answer()` call."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        engine_config: EngineConfig | None = None,
        engine_cache_dir: str | Path | None = None,
        llm_url: str = "",
        model_name: str = "",
    ) -> None:
        """`llm_url`: "" decodes with the model's own language model; an OpenAI-compatible server's URL (vLLM with
        prompt embeddings, see stllm_core.engine.remote) decodes there instead, the served model being checked to
        be this one (`model_name`, hidden size, vocabulary): LLMServerError otherwise. The local language model then
        keeps only its input embeddings (its decoder layers are freed)."""
        self.model = model.eval()
        self.processor = processor
        stops = tuple(processor.stop_token_ids)
        if engine_config is None:
            engine_config = EngineConfig(stop_token_ids=stops)
        elif not engine_config.stop_token_ids:
            engine_config = dataclasses.replace(engine_config, stop_token_ids=stops)
        self.llm_url = llm_url
        if llm_url:
            from stllm_core.engine.remote import RemoteEngine

            emb = model.language_model.get_input_embeddings().weight
            self.engine = RemoteEngine(llm_url, model_name, engine_config, hidden_size=int(emb.shape[1]),
                                       vocab_size=int(emb.shape[0]))
            self.engine.connect(processor.tokenizer)
            decoder = model.language_model.get_decoder()
            if hasattr(decoder, "layers"):
                decoder.layers = torch.nn.ModuleList()  # the server runs them; the robot needs the embeddings
        else:
            self.engine = Engine(model.language_model, engine_config)
        self.backend = engine_config.backend
        self.engine_cache_dir = engine_cache_dir
        self._encoders: dict[tuple, Callable] = {}
        self._lock = threading.Lock()

    # --- construction --------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str = TINY_RANDOM,
        device: str = "cpu",
        dtype: str = "float32",
        backend: str = "eager",
        seed: int = 0,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        engine_cache_dir: str | Path | None = None,
        llm_url: str = "",
    ) -> AnswerPipeline:
        """Load "tiny-random" (a random tiny model built in-process, seconds) or a saved model directory.
        `llm_url`: decode on that language-model server (see __init__) instead of locally."""
        check_choice("dtype", dtype, DTYPES)
        dev = resolve_device(device)
        engine_config = EngineConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, backend=backend
        )
        from stllm_core.model import build_tiny, load_pretrained

        t0 = time.perf_counter()
        if model == TINY_RANDOM:
            net, processor = build_tiny(seed=seed)
            net = net.to(device=dev, dtype=DTYPES[dtype])
        else:
            path = resolve_embedded(model) if model in EMBEDDED else Path(model).expanduser()
            if not path.is_dir():
                raise ModelLoadError(
                    f"model {model!r} is neither {TINY_RANDOM!r} nor an existing model directory (looked at {path})."
                )
            net, processor = load_pretrained(path, device=str(dev), dtype=DTYPES[dtype])
        logger.info(
            "loaded model %s on %s (%s, backend %s) in %.1f s", model, dev, dtype, backend, time.perf_counter() - t0
        )
        return cls(net, processor, engine_config, engine_cache_dir, llm_url=llm_url, model_name=served_name(model))

    # --- properties --------------------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        """Frames the model wants per clip."""
        return int(self.model.config.num_frames)

    @property
    def max_question_chars(self) -> int:
        return int(getattr(self.model.config, "max_question_chars", DEFAULT_MAX_QUESTION_CHARS))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_new_tokens(self) -> int:
        return self.engine.config.max_new_tokens

    # --- steps -------------------------------------------------------------------------------------------------
    def clean_question(self, question: str) -> str:
        """Validated question text: InputError if not a str, empty/whitespace, or longer than max_question_chars;
        control characters removed; placeholders and special tokens stripped (the model's prompt cleaning)."""
        if not isinstance(question, str):
            raise InputError(f"question must be a str, got {type(question).__name__}.")
        if len(question) > self.max_question_chars:
            raise InputError(
                f"question has {len(question)} characters; the limit is max_question_chars={self.max_question_chars}."
            )
        text = remove_control_chars(question)
        if not text.strip():
            raise InputError("question is empty (nothing but whitespace or control characters).")
        return self.processor.clean_question(text)

    def _encoder(self, inputs) -> Callable:
        """The encoder for this backend (eager: the model itself; compiled/tensorrt: per input-shape module)."""
        if self.backend == "eager":
            return lambda *args: self.model.get_prefix_embeds(inputs)
        key = tuple((tuple(a.shape), a.dtype) for a in encoder_args(inputs))
        if key not in self._encoders:
            self._encoders[key] = make_encoder(
                self.backend, EncoderStack(self.model).eval(), encoder_args(inputs), self.engine_cache_dir
            )
        return self._encoders[key]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self, max_new_tokens: int | None = None) -> Answer:
        """Answer one question about a random clip, so that compilation ('compiled': torch.compile, CUDA graphs;
        'tensorrt': engine build or cache load) happens now rather than at the first real question. Non-eager
        backends pad encoder inputs to fixed shapes, so any clip warms every later one; the decoder's static cache
        is sized for the default token budget. Returns the warm-up answer (its timings include the compilation)."""
        from stllm_core.model import random_clip

        clip = random_clip(self.num_frames, seed=0, num_points=min(int(self.model.config.max_points), 2000))
        t0 = time.perf_counter()
        ans = self.answer("Where is the mug?", clip, max_new_tokens=max_new_tokens or self.max_new_tokens)
        logger.info("warm-up (%s backend) took %.1f s", self.backend, time.perf_counter() - t0)
        return ans

    def answer(
        self,
        question: str,
        clip: Clip,
        max_new_tokens: int | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> Answer:
        """Answer `question` about `clip`. `on_text(partial, num_tokens)` receives the whole partial answer each time
        it grows, with the number of tokens generated so far. `cancel`: set it to stop at the next token (the answer
        so far is returned, `stopped == "cancelled"`). `temperature` / `top_p`: this answer's sampling (None = the
        pipeline's).

        Raises InputError for a bad question or clip, ConfigError for a bad max_new_tokens.
        """
        if max_new_tokens is not None:
            check_max_new_tokens(max_new_tokens)
        q = self.clean_question(question)
        tokenizer = self.processor.tokenizer
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            inputs = self.processor(q, clip).to(self.device)
            if self.backend != "eager":  # fixed shapes: one compiled graph / TensorRT engine for every clip
                inputs = pad_encoder_inputs(inputs, self.model.config)
            prefix = self._encoder(inputs)(*encoder_args(inputs))  # (1, Nq, D)
            embeds = self.model.embed_prompt(inputs, prefix)  # (1, L, D)
            self._sync()
            encode_ms = (time.perf_counter() - t0) * 1e3

            on_token = None
            if on_text is not None:
                tokens: list[int] = []
                last = [""]

                def on_token(tok: int) -> None:
                    tokens.append(tok)
                    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    if text != last[0]:
                        last[0] = text
                        on_text(text, len(tokens))

            gen = self.engine.generate(embeds, max_new_tokens=max_new_tokens, on_token=on_token, cancel=cancel,
                                       temperature=temperature, top_p=top_p)
        text = tokenizer.decode(gen.tokens, skip_special_tokens=True).strip()
        return Answer(
            text=text,
            num_tokens=len(gen.tokens),
            encode_ms=encode_ms,
            prefill_ms=gen.prefill_ms,
            decode_ms=gen.decode_ms,
            num_frames=inputs.num_frames,
            num_points=inputs.num_points,
            stopped=gen.stopped,
        )
