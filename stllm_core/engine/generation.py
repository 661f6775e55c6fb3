"""Token generation over a Hugging Face causal LM fed with `inputs_embeds`.

The engine knows no tokenizer and no ROS: it takes prompt embeddings (prefix tokens already placed by the model) and
returns token ids. The prompt is prefilled once into a KV cache, then one token is decoded per step.

Worked example (greedy, stop token 2)::

    engine = Engine(lm, EngineConfig(max_new_tokens=8, stop_token_ids=(2,)))
    gen = engine.generate(embeds)          # embeds: (1, L, D) on any device/dtype
    gen.tokens                             # e.g. [17, 5, 40] (the stop token itself is not included)
    gen.stopped                            # "eos" | "length" | "cancelled"
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stllm_core.config import check, check_choice
from stllm_core.errors import InputError

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS_LIMIT = 512
"""Hard cap on tokens generated per call (bounds latency and the static KV cache)."""

BACKENDS = ("eager", "compiled", "tensorrt")
STOP_REASONS = ("eos", "length", "cancelled")


@dataclass(frozen=True)
class EngineConfig:
    """How to decode.

    temperature 0 means greedy (argmax); > 0 samples from softmax(logits / temperature) restricted to the smallest set
    of tokens whose probability mass reaches `top_p` (nucleus sampling), with a torch.Generator seeded by `seed` at the
    start of every call (so the same inputs give the same tokens).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    backend: str = "eager"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        check_max_new_tokens(self.max_new_tokens, "max_new_tokens")
        check(
            isinstance(self.temperature, (int, float)) and 0.0 <= float(self.temperature) <= 100.0,
            "temperature",
            self.temperature,
            "a number in [0, 100] (0 = greedy)",
        )
        check(
            isinstance(self.top_p, (int, float)) and 0.0 < float(self.top_p) <= 1.0,
            "top_p",
            self.top_p,
            "a number in (0, 1]",
        )
        check(
            all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            self.stop_token_ids,
            "a sequence of non-negative token ids",
        )
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", self.seed, "an integer")
        check_choice("backend", self.backend, BACKENDS)

    def sampling(self, temperature: float | None = None, top_p: float | None = None) -> tuple[float, float]:
        """One call's (temperature, top_p): the given values (None = this config's), checked as the config's are."""
        chosen = dataclasses.replace(self, temperature=self.temperature if temperature is None else temperature,
                                     top_p=self.top_p if top_p is None else top_p)
        return float(chosen.temperature), float(chosen.top_p)


def check_prompt_embeds(inputs_embeds: object, max_new_tokens: int, hidden_size: int, max_positions: int,
                        limit_name: str) -> None:
    """Refuse a prompt that is not a finite (1, L, D) tensor with L >= 1, D = hidden_size (0: not checked) and
    L + max_new_tokens within max_positions (0: not checked; `limit_name` names the limit in the message)."""
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
        shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds)
        raise InputError(f"inputs_embeds must be a (1, L, D) tensor; got {shape}.")
    b, length, d = inputs_embeds.shape
    if b != 1:
        raise InputError(f"inputs_embeds must have batch size 1 (the engine decodes one sequence); got {b}.")
    if length < 1:
        raise InputError("inputs_embeds is empty (L = 0); the prompt needs at least one position.")
    if hidden_size and d != hidden_size:
        raise InputError(f"inputs_embeds width {d} does not match the language model's hidden size {hidden_size}.")
    if max_positions and length + max_new_tokens > max_positions:
        raise InputError(f"prompt of {length} positions + {max_new_tokens} new tokens exceeds {limit_name} "
                         f"{max_positions}.")
    if not torch.isfinite(inputs_embeds).all():
        raise InputError("inputs_embeds contains NaN or infinite values.")


def check_max_new_tokens(value: object, field: str = "max_new_tokens") -> int:
    """Validate a token budget: an int in [1, MAX_NEW_TOKENS_LIMIT]; raises ConfigError naming `field`."""
    check(
        isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_NEW_TOKENS_LIMIT,
        field,
        value,
        f"an integer in [1, {MAX_NEW_TOKENS_LIMIT}] (MAX_NEW_TOKENS_LIMIT)",
    )
    return int(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Generation:
    """The result of one `Engine.generate` call.

    prefill_ms: from the call to the first token chosen (time to first token, prompt processing included).
    decode_ms: the remaining steps, excluding time spent inside the `on_token` callback (reported as callback_ms).
    """

    tokens: list[int]
    prefill_ms: float
    decode_ms: float
    stopped: str  # one of STOP_REASONS
    callback_ms: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by decode steps (all but the first) per second of decode time; 0 when undefined."""
        steps = max(len(self.tokens) - 1, 0)
        return steps / (self.decode_ms / 1e3) if self.decode_ms > 0 and steps else 0.0


class Engine:
    """Generates token ids from prompt embeddings with a KV cache; backend chosen by `EngineConfig.backend`.

    Not thread-safe: callers that share one engine across threads serialize calls (AnswerPipeline holds a lock).
    """

    def __init__(self, language_model: torch.nn.Module, config: EngineConfig | None = None) -> None:
        from stllm_core.engine.backends import make_decoder

        self.config = config or EngineConfig()
        self.language_model = language_model.eval()
        self.decoder = make_decoder(self.config.backend, self.language_model)
        param = next(self.language_model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.hidden_size = int(self.language_model.get_input_embeddings().weight.shape[1])
        lm_cfg = getattr(self.language_model, "config", None)
        self.max_positions = int(getattr(lm_cfg, "max_position_embeddings", 0) or 0)

    @property
    def backend(self) -> str:
        return self.config.backend

    def _check_embeds(self, inputs_embeds: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        check_prompt_embeds(inputs_embeds, max_new_tokens, self.hidden_size, self.max_positions,
                            "the language model's max_position_embeddings")
        return inputs_embeds.to(device=self.device, dtype=self.dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pick(self, logits: torch.Tensor, generator: torch.Generator | None, temperature: float, top_p: float) -> int:
        """Choose the next token from logits (1, V)."""
        if temperature == 0.0:
            return int(logits[0].argmax())
        probs = torch.softmax(logits[0].float() / float(temperature), dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs  # mass of strictly more likely tokens
            sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
            choice = torch.multinomial(sorted_probs, 1, generator=generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=generator))

    @torch.inference_mode()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        max_new_tokens: int | None = None,
        on_token: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> Generation:
        """Decode up to `max_new_tokens` tokens after the prompt `inputs_embeds` (1, L, D).

        `temperature` / `top_p`: this call's sampling (None = the engine's configured values), checked as
        EngineConfig checks them.
        Stops at the first stop token (not included in `tokens`), at the token budget, or when `cancel` is set
        (checked before the prefill and before every decode step). `on_token(id)` is called once per kept token,
        in order, on the calling thread.
        """
        n_max = self.config.max_new_tokens if max_new_tokens is None else check_max_new_tokens(max_new_tokens)
        embeds = self._check_embeds(inputs_embeds, n_max)
        if cancel is not None and cancel.is_set():
            return Generation([], 0.0, 0.0, "cancelled")
        temperature, top_p = self.config.sampling(temperature, top_p)
        generator = None
        if temperature > 0.0:
            generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        stops = set(self.config.stop_token_ids)
        length = embeds.shape[1]
        tokens: list[int] = []
        stopped = "length"
        callback_s = 0.0

        t0 = time.perf_counter()
        logits = self.decoder.prefill(embeds, max_len=length + n_max)  # (1, V)
        token = self._pick(logits, generator, temperature, top_p)
        self._sync()
        t1 = time.perf_counter()
        while True:
            if token in stops:
                stopped = "eos"
                break
            tokens.append(token)
            if on_token is not None:
                tc = time.perf_counter()
                on_token(token)
                callback_s += time.perf_counter() - tc
            if len(tokens) >= n_max:
                break
            if cancel is not None and cancel.is_set():
                stopped = "cancelled"
                break
            logits = self.decoder.step(token, position=length + len(tokens) - 1)
            token = self._pick(logits, generator, temperature, top_p)
        self._sync()
        t2 = time.perf_counter()
        gen = Generation(
            tokens=tokens,
            prefill_ms=(t1 - t0) * 1e3,
            decode_ms=max((t2 - t1 - callback_s) * 1e3, 0.0),
            stopped=stopped,
            callback_ms=callback_s * 1e3,
        )
        logger.debug(
            "generated %d tokens (%s): prefill %.1f ms over %d positions, decode %.1f ms",
            len(tokens),
            stopped,
            gen.prefill_ms,
            length,
            gen.decode_ms,
        )
        return gen
