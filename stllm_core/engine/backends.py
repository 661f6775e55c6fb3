"""Execution backends: how the decoder step and the encoder stack run.

Decoder (used by Engine):
- "eager": DynamicCache, plain PyTorch (sdpa attention when the LM was built with it).
- "compiled": StaticCache (fixed KV buffers, so every decode step has the same shapes) and `torch.compile` of the
  one-token step; on CUDA with mode "reduce-overhead" (CUDA graphs), on CPU with inductor's default mode (no CUDA
  graphs). If compilation fails (e.g. no C++ compiler for inductor), the same static-cache step runs uncompiled and
  the reason is logged once.
- "tensorrt": the decoder runs as "compiled" (a TensorRT decoder is not implemented); the encoder stack is the part
  compiled with TensorRT (see `TensorRTEncoder`).

Encoder (used by AnswerPipeline through `make_encoder`): "eager" runs the module, "compiled" wraps it in
`torch.compile`, "tensorrt" builds (or loads from the on-disk cache) a torch-tensorrt engine of its torch.export graph.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from stllm_core.errors import ConfigError

logger = logging.getLogger(__name__)

STATIC_CACHE_ROUND = 256
"""Static KV caches are allocated in multiples of this many positions, so compiled graphs are reused across calls."""


def require_tensorrt():
    """Return the torch_tensorrt module, or raise ConfigError saying what is missing (CUDA or the package)."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "Got 'tensorrt' for `backend`; it needs a CUDA GPU but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Use backend 'compiled' or 'eager' on this machine."
        )
    try:
        import torch_tensorrt  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            f"Got 'tensorrt' for `backend`; it needs the torch_tensorrt package, which failed to import ({exc}). "
            f"Install the torch-tensorrt release matching torch {torch.__version__} (on Jetson: JetPack's TensorRT and "
            "NVIDIA's torch-tensorrt wheel), or use backend 'compiled'."
        ) from exc
    return torch_tensorrt


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _lm_device(lm: torch.nn.Module) -> torch.device:
    return next(lm.parameters()).device


class EagerDecoder:
    """Prefill the prompt into a DynamicCache, then feed one token id per step."""

    name = "eager"

    def __init__(self, language_model: torch.nn.Module) -> None:
        self.lm = language_model
        self.cache = None
        self._keep_last = _accepts(language_model.forward, "logits_to_keep")

    def _ids(self, token: int) -> torch.Tensor:
        return torch.tensor([[token]], dtype=torch.long, device=_lm_device(self.lm))

    def prefill(self, inputs_embeds: torch.Tensor, max_len: int) -> torch.Tensor:
        """Run the prompt (1, L, D); return the last position's logits (1, V)."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.lm.config)
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.lm(inputs_embeds=inputs_embeds, past_key_values=self.cache, use_cache=True, **kwargs)
        return out.logits[:, -1]

    def step(self, token: int, position: int) -> torch.Tensor:
        """Feed token `token` at absolute position `position`; return its logits (1, V)."""
        out = self.lm(input_ids=self._ids(token), past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]


class StaticCacheDecoder(EagerDecoder):
    """Static KV cache + (optionally) `torch.compile` of the one-token step.

    The prefill runs uncompiled (its length varies); each decode step has shapes (1, 1) and a fixed cache size, so one
    compiled graph (one CUDA graph on CUDA) serves every step and every call whose prompt + budget fits the cache.
    """

    name = "compiled"

    def __init__(self, language_model: torch.nn.Module, compile: bool = True) -> None:
        super().__init__(language_model)
        self.cache_len = 0
        self.compiled = False
        self.fallback_reason: str | None = None
        self._step_fn = self._step_eager
        if compile:
            on_cuda = _lm_device(language_model).type == "cuda"
            mode = "reduce-overhead" if on_cuda else "default"
            if not on_cuda:
                logger.info("backend 'compiled' on %s: torch.compile without CUDA graphs", _lm_device(language_model))
            self._step_fn = torch.compile(self._step_eager, mode=mode, dynamic=False)
            self.compiled = True

    def _ensure_cache(self, max_len: int) -> None:
        from transformers import StaticCache

        if self.cache is not None and self.cache_len >= max_len:
            self.cache.reset()
            return
        size = -(-max_len // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND
        limit = getattr(self.lm.config, "max_position_embeddings", 0) or 0
        if limit:
            size = max(min(size, limit), max_len)
        self.cache = StaticCache(config=self.lm.config, max_cache_len=size)
        self.cache_len = size

    def prefill(self, inputs_embeds: torch.Tensor, max_len: int) -> torch.Tensor:
        self._ensure_cache(max_len)
        length = inputs_embeds.shape[1]
        positions = torch.arange(length, device=inputs_embeds.device).unsqueeze(0)
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.lm(
            inputs_embeds=inputs_embeds, position_ids=positions, past_key_values=self.cache, use_cache=True, **kwargs
        )
        return out.logits[:, -1]

    def _step_eager(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.lm(input_ids=ids, position_ids=positions, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]

    def step(self, token: int, position: int) -> torch.Tensor:
        device = _lm_device(self.lm)
        ids = torch.tensor([[token]], dtype=torch.long, device=device)
        positions = torch.tensor([[position]], dtype=torch.long, device=device)
        if self._step_fn is not self._step_eager:
            try:
                return self._step_fn(ids, positions).clone()  # clone: CUDA-graph outputs are overwritten next replay
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back, with the reason logged
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                logger.warning("torch.compile of the decode step failed; running it uncompiled (%s)", exc)
                self._step_fn = self._step_eager
                self.compiled = False
                # The failed call may or may not have advanced the cache; redo the step from a consistent state.
                self._rewind_to(position)
        return self._step_eager(ids, positions)

    def _rewind_to(self, position: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(position)


def make_decoder(backend: str, language_model: torch.nn.Module):
    """The decoder object for an EngineConfig.backend value."""
    if backend == "eager":
        return EagerDecoder(language_model)
    if backend == "compiled":
        return StaticCacheDecoder(language_model, compile=True)
    if backend == "tensorrt":
        require_tensorrt()
        logger.info("backend 'tensorrt': encoder stack through TensorRT, decoder through torch.compile + static cache")
        return StaticCacheDecoder(language_model, compile=True)
    raise ConfigError(f"Got {backend!r} for `backend`; expected one of 'eager', 'compiled', 'tensorrt'.")


# ----------------------------------------------------------------------------------------------------------- encoder


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the module's parameter/buffer names, shapes, dtypes and values (weights change -> key changes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def engine_cache_key(
    fingerprint: str, example_inputs: Sequence[torch.Tensor], precision: str, device_name: str, versions: str
) -> str:
    """Key of a cached TensorRT engine: model weights, input shapes/dtypes, precision, GPU and library versions."""
    spec = {
        "model": fingerprint,
        "inputs": [[list(t.shape), str(t.dtype)] for t in example_inputs],
        "precision": precision,
        "device": device_name,
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def default_engine_cache_dir() -> Path:
    base = os.environ.get("STLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "stllm")
    return Path(base) / "trt_engines"


class TensorRTEncoder:
    """A TensorRT engine of `module` for fixed input shapes, built once and cached on disk.

    The engine file is `<cache_dir>/<key>.ep` (torch-tensorrt's ExportedProgram format), key from
    `engine_cache_key`. A hit loads it with `torch.export.load` (our own file, written by `torch_tensorrt.save`).
    Precision follows the module's dtype (torch-tensorrt's explicit typing): cast the module to bfloat16 for bf16.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        trt = require_tensorrt()
        self.example_inputs = tuple(example_inputs)
        dtype = next(module.parameters()).dtype
        precision = str(dtype).removeprefix("torch.")
        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        device_name = f"{props.name} sm{props.major}{props.minor}"
        versions = f"torch {torch.__version__} torch_tensorrt {getattr(trt, '__version__', '?')}"
        self.key = engine_cache_key(module_fingerprint(module), self.example_inputs, precision, device_name, versions)
        self.cache_dir = Path(cache_dir) if cache_dir else default_engine_cache_dir()
        self.path = self.cache_dir / f"{self.key}.ep"
        self.cache_hit = self.path.is_file()
        if self.cache_hit:
            logger.info("TensorRT engine cache hit: %s", self.path)
            self.module = torch.export.load(str(self.path)).module()
            return
        logger.info("building TensorRT engine (%s, %s) -> %s", precision, device_name, self.path)
        exported = torch.export.export(module.eval(), self.example_inputs)
        compiled = trt.dynamo.compile(exported, arg_inputs=list(self.example_inputs))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        trt.save(compiled, str(tmp), arg_inputs=list(self.example_inputs))
        os.replace(tmp, self.path)  # atomic: a crash never leaves a half-written engine under the key
        self.module = compiled

    def __call__(self, *inputs: torch.Tensor):
        for got, want in zip(inputs, self.example_inputs, strict=True):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ConfigError(
                    f"TensorRT encoder engine {self.key} was built for input {tuple(want.shape)} {want.dtype}; got "
                    f"{tuple(got.shape)} {got.dtype}. Keep num_frames / image size / max points fixed, or rebuild."
                )
        return self.module(*inputs)


def make_encoder(
    backend: str,
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """A callable running `module(*tensors)` with the given backend (see the module docstring)."""
    if backend == "eager":
        return module
    if backend == "compiled":
        # Default mode: the encoder is compute-bound (large matmuls), so CUDA graphs and autotuning gain little and
        # would multiply the warm-up time.
        return torch.compile(module, dynamic=False)
    if backend == "tensorrt":
        if example_inputs is None:
            raise ConfigError("backend 'tensorrt' needs example inputs to fix the encoder's input shapes.")
        return TensorRTEncoder(module, example_inputs, cache_dir)
    raise ConfigError(f"Got {backend!r} for `backend`; expected one of 'eager', 'compiled', 'tensorrt'.")
