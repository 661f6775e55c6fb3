"""stllm-train: fine-tune ST-LLM on REA-format records (CPU, one GPU, or several through `accelerate launch`).

    stllm-train --config training/configs/tiny.yaml [--out DIR] [--resume] [--max-steps N] [--batch-size B]
    accelerate launch --config_file training/configs/accelerate/ddp.yaml -m training.train --config ...

What is trained is what the configuration says (default: the model config's `trainable` parts; the official recipe
trains the vision projector, aligner + queries, ray encoders and freezes the vision tower, point encoder and LM),
optionally with LoRA adapters on the language model (peft). AdamW + cosine schedule with linear warm-up, gradient
accumulation, bf16/fp16 autocast, gradient checkpointing.

Checkpoints (no pickle anywhere) go to <out>/checkpoints/step_XXXXXXXX/:
    trainable.safetensors   every trainable parameter by name (frozen parts come from the base model)
    optimizer.safetensors   optimizer state tensors; optimizer.json: param groups + parameter names
    rng_rank{R}.safetensors torch (CPU + CUDA) and numpy generator states; state.json: step, data position per rank,
                            scheduler, python RNG, running counters, the run config
Resuming restores all of it, so a resumed run reproduces the uninterrupted one exactly (same data order, same losses).
A finished run exports <out>/model (stllm_core.model.save_pretrained, loadable by the robot) + a README.md model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stllm_core.config import check, check_choice, from_dict
from stllm_core.errors import ConfigError, DataError, STLLMError
from training.data import ABLATIONS, DataConfig, READataset, SkippedSample, collate_or_skip

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "model"


# ------------------------------------------------------------------------------------------------------------ config
@dataclass
class ModelSection:
    """base: a preset name (tiny | smol | llava-video-7b) or a model directory written by save_pretrained.
    overrides: STLLMConfig fields changed on a preset (e.g. llm: /data/qwen2-7b, vision: /data/siglip).
    tokenizer: tokenizer directory for a preset whose LLM is a config dict (random weights); "tiny" uses its own,
        other presets fall back to the tiny tokenizer (fine for throughput runs, useless for real training).
    dtype: dtype the model is built in; trainable parameters are always kept in float32 (master weights).
    init_device: where the model is built ("cpu", or "cuda" to build a 7B random model directly on the GPU).
    seed: seed for random initialisation (so a resumed run rebuilds the same frozen random parts)."""

    base: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    dtype: str = "float32"
    init_device: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        check(bool(self.base), "model.base", self.base, "a preset name or a model directory")
        check_choice("model.dtype", self.dtype, DTYPES)


@dataclass
class LoraSection:
    """Optional LoRA adapters on the language model (peft). Merged into the exported model."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        check(self.r >= 1, "lora.r", self.r, "an int >= 1")
        check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a float in [0, 1)")
        check(bool(self.target_modules), "lora.target_modules", self.target_modules, "a non-empty list")


@dataclass
class TrainSection:
    trainable: list[str] | None = None  # parts to train; null = the model config's `trainable`
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; trainable weights stay fp32)
    batch_size: int = 1  # per device, per micro-step
    grad_accum: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    epochs: float = 1.0
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    max_grad_norm: float = 1.0  # 0 disables clipping
    gradient_checkpointing: bool = False
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept (older ones deleted); 0 = keep all
    log_every: int = 1
    num_workers: int = 0  # DataLoader workers (decoding frames)
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms: bit-exact reruns/resumes (some ops get slower)
    val_loss_limit: int = 64  # val records for the end-of-run loss in the model card (0 = all, -1 = none)
    lm_loss: bool = True  # the language-model loss on the answer tokens; false: only the auxiliary loss (no LM pass)
    aux_loss: float = 0.0  # weight of the key-term loss on the prefix (training/aux.py); 0 = off

    def __post_init__(self):
        check_choice("train.precision", self.precision, PRECISIONS)
        for name in ("batch_size", "grad_accum", "log_every"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"train.{name}", v, "an int >= 1")
        for name in ("max_steps", "save_every", "keep_last", "num_workers"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, f"train.{name}", v, "an int >= 0")
        check(self.lr > 0, "train.lr", self.lr, "> 0")
        check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", self.warmup_ratio, "a float in [0, 1)")
        check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")
        check(self.epochs > 0 or self.max_steps > 0, "train.epochs", self.epochs, "> 0 (or set train.max_steps)")
        check(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, ">= 0")
        check(self.aux_loss >= 0, "train.aux_loss", self.aux_loss, ">= 0 (0 = off)")
        check(self.lm_loss or self.aux_loss > 0, "train.lm_loss", self.lm_loss, "true when train.aux_loss is 0 "
              "(else nothing is trained)")
        self.betas = tuple(float(b) for b in self.betas)
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", self.betas,
              "two floats in [0, 1)")
        if self.trainable is not None:
            from stllm_core.model.configuration import PARTS

            self.trainable = list(self.trainable)
            for part in self.trainable:
                check_choice("train.trainable", part, PARTS)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    out_dir: str = "runs/tiny"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> RunConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"The training config{' ' + where if where else ''} must be a mapping; got {d!r}.")
        d = dict(d)
        sections = {"model": ModelSection, "data": DataConfig, "train": TrainSection, "lora": LoraSection}
        for key, cls_ in sections.items():
            d[key] = from_dict(cls_, d.get(key), where=f"{where} [{key}]".strip())
        return from_dict(cls, d, where=where)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"Training config {path} does not exist.") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"Training config {path} is not valid YAML: {e}") from None
        return cls.from_dict(data or {}, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["betas"] = list(self.train.betas)
        return d


# ------------------------------------------------------------------------------------------------------------- model
def build_base(spec: ModelSection):
    """(model, processor) from the model section: a preset (random parts seeded) or a saved model directory."""
    from stllm_core.model import build_model, config_preset, load_pretrained
    from stllm_core.model.configuration import PRESETS

    dtype = DTYPES[spec.dtype]
    if spec.base not in PRESETS:
        if spec.overrides:
            raise ConfigError(f"model.overrides apply to presets only; model.base {spec.base!r} is a directory.")
        return load_pretrained(spec.base, device=spec.init_device, dtype=dtype)
    cfg = config_preset(spec.base, **spec.overrides)
    if spec.tokenizer:
        from stllm_core.model.loading import load_tokenizer

        tokenizer = load_tokenizer(spec.tokenizer)
    elif isinstance(cfg.llm, dict):
        from stllm_core.model.tiny import train_tiny_tokenizer

        if spec.base != "tiny":
            log.warning("model.base %r has a randomly initialised LLM and no model.tokenizer: using the tiny "
                        "tokenizer (throughput runs only)", spec.base)
        tokenizer = train_tiny_tokenizer()
        llm = dict(cfg.llm)  # as build_tiny does: room for the tokenizer's ids, its eos/pad
        llm.update(vocab_size=max(llm.get("vocab_size", 0), len(tokenizer)), eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        cfg = cfg.replace(llm=llm)
    else:
        tokenizer = None  # the LLM's own (path or wheel)
    with torch.random.fork_rng(devices=[]), torch.device(spec.init_device):
        torch.manual_seed(spec.seed)
        return build_model(cfg, tokenizer, device=spec.init_device, dtype=dtype)


def prepare_model(model, cfg: RunConfig):
    """Freeze/unfreeze parts, add LoRA, keep trainable weights in fp32, enable gradient checkpointing."""
    trainable = tuple(cfg.train.trainable) if cfg.train.trainable is not None else tuple(model.config.trainable)
    model.config = model.config.replace(trainable=trainable)
    model.apply_trainable(trainable)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), bias="none")
        model.language_model = get_peft_model(model.language_model, lcfg)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.train.gradient_checkpointing:
        for name in ("vision_tower", "language_model"):
            part = getattr(model, name)
            if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5.2x
                part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(part, "gradient_checkpointing_enable"):
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError(f"Nothing to train: train.trainable={list(trainable)} selects no parameters and LoRA is "
                          "off.")
    return model


def trainable_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lr_lambda_factory(total_steps: int, warmup_steps: int, min_ratio: float):
    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


# ---------------------------------------------------------------------------------------------------- data order
class RankCursor:
    """Where one rank is in its data stream: epoch e uses permutation(seed + e) of the dataset, rank r reads
    positions r, r + W, r + 2W, ...; `pos` counts the items of the current epoch this rank has consumed."""

    def __init__(self, n: int, seed: int, rank: int, world: int, epoch: int = 0, pos: int = 0):
        if n < world:
            raise DataError(f"{n} usable training records cannot feed {world} processes.")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.pos = epoch, pos
        self._perm_epoch, self._mine = None, None

    def _indices(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            self._mine = perm[self.rank::self.world][: self.n // self.world]  # same length on every rank
            self._perm_epoch = self.epoch
        return self._mine

    def next_index(self) -> int:
        idx = self._indices()
        if self.pos >= len(idx):
            self.epoch, self.pos = self.epoch + 1, 0
            idx = self._indices()
        self.pos += 1
        return idx[self.pos - 1]


class Batches:
    """Micro-batches of `batch_size` good samples for one rank; failed samples are skipped and counted."""

    def __init__(self, dataset: READataset, cursor: RankCursor, batch_size: int, num_workers: int, pad_token_id: int):
        self.dataset, self.cursor, self.batch_size = dataset, cursor, batch_size
        self.num_workers, self.pad_token_id = num_workers, pad_token_id
        self.skipped: list[SkippedSample] = []
        self._pool = None
        if num_workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="stllm-data")

    def _load(self, indices: list[int]) -> list[Any]:
        if self._pool is None:
            return [self.dataset[i] for i in indices]
        return list(self._pool.map(self.dataset.__getitem__, indices))

    def next(self):
        good: list[Any] = []
        attempts = 0
        while len(good) < self.batch_size:
            need = self.batch_size - len(good)
            items = self._load([self.cursor.next_index() for _ in range(need)])
            attempts += need
            for x in items:
                (self.skipped if isinstance(x, SkippedSample) else good).append(x)
            if len(good) < self.batch_size and attempts >= max(100, 10 * self.batch_size):
                last = self.skipped[-1]
                raise DataError(f"{self.dataset.path}: {attempts - len(good)} of the last {attempts} samples failed "
                                f"to load (last: record {last.record_id!r}: {last.reason}); refusing to go on.")
        return collate_or_skip(good, self.pad_token_id)[0]

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------- checkpoint (no pickle)
def _jsonable_opt_value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict[str, Any], rank: int, world: int,
                    is_main: bool) -> None:
    """Write one checkpoint directory (rank 0 writes weights/optimizer/state; every rank its RNG file)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    np_state = np.random.get_state()
    rng = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(path / f"rng_rank{rank}.safetensors"),
              metadata={"numpy": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]),
                        "python": json.dumps(random.getstate())})
    if not is_main:
        return
    named = trainable_named_parameters(model)
    save_file({n: p.detach().float().cpu().contiguous() for n, p in named}, str(path / "trainable.safetensors"))
    opt = optimizer.state_dict()
    tensors, extra = {}, {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                extra.setdefault(str(pid), {})[k] = v
    save_file(tensors, str(path / "optimizer.safetensors"))
    groups = [{k: _jsonable_opt_value(v) for k, v in g.items()} for g in opt["param_groups"]]
    (path / "optimizer.json").write_text(json.dumps({"param_groups": groups, "state_extra": extra,
                                                     "param_names": [n for n, _ in named]}, indent=1))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    (path / "state.json").write_text(json.dumps({**state, "scheduler": sched, "world_size": world}, indent=1))


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int) -> dict[str, Any]:
    """Restore what save_checkpoint wrote; returns state.json. Errors name the file and what does not match."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        opt_meta = json.loads((path / "optimizer.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise STLLMError(f"Checkpoint {path} is incomplete or corrupt: {e}") from e
    named = trainable_named_parameters(model)
    names = [n for n, _ in named]
    if names != opt_meta["param_names"] or set(weights) != set(names):
        missing = sorted(set(names) - set(weights))[:3]
        extra = sorted(set(weights) - set(names))[:3]
        raise STLLMError(f"Checkpoint {path} does not match the model's trainable parameters (missing {missing}, "
                         f"unexpected {extra}); was train.trainable or lora changed?")
    with torch.no_grad():
        for n, p in named:
            if p.shape != weights[n].shape:
                raise STLLMError(f"Checkpoint {path}: {n} has shape {tuple(weights[n].shape)}, model {tuple(p.shape)}.")
            p.copy_(weights[n].to(p.dtype))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in opt_tensors.items():
        _, pid, k = key.split(".", 2)
        opt_state.setdefault(int(pid), {})[k] = v
    for pid, kv in opt_meta["state_extra"].items():
        opt_state.setdefault(int(pid), {}).update(kv)
    groups = []
    for g in opt_meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        with safe_open(str(rng_file), framework="pt") as f:
            meta = f.metadata()
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
        np.random.set_state((kind, rng["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
        py = json.loads(meta["python"])
        random.setstate((py[0], tuple(py[1]), py[2]))
    else:
        log.warning("%s missing: RNG of rank %d not restored (different number of processes?)", rng_file, rank)
    return state


def list_checkpoints(out_dir: Path) -> list[Path]:
    d = out_dir / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.json").exists())


# --------------------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    out_dir: Path
    steps: int  # optimizer steps done in total (including before a resume)
    losses: list[float]  # per optimizer step, this session
    samples: int  # samples consumed in total
    skipped: dict[str, str]  # record id -> reason (training set)
    export_dir: Path | None
    samples_per_s: float
    val_loss: float | None = None


class Objective(torch.nn.Module):
    """What one micro-step minimises: the LM loss on the answer tokens and/or the key-term loss on the prefix
    (training/aux.py). Holds the model and the key-term head, so that one module goes through accelerate."""

    def __init__(self, model, tokenizer, tc: TrainSection):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.lm_loss, self.aux_weight = tc.lm_loss, tc.aux_loss
        self.aux_head = None
        if tc.aux_loss > 0:
            from training.aux import KeyTermHead

            lm_hidden = model.language_model.get_input_embeddings().weight.shape[1]
            self.aux_head = KeyTermHead(model.config.num_queries, lm_hidden, model.config.initializer_range)

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.labels is None:
            raise STLLMError("The batch has no labels: nothing to train on.")
        prefix = self.model.get_prefix_embeds(batch)
        loss, stats = torch.zeros((), device=prefix.device), {}
        if self.lm_loss:
            stats["lm_loss"] = self.model(batch, prefix=prefix).loss
            loss = loss + stats["lm_loss"]
        if self.aux_head is not None:
            from training.aux import answer_texts, key_terms

            targets = torch.tensor([key_terms(a) for a in answer_texts(self.tokenizer, batch.labels)],
                                   device=prefix.device)
            stats["aux_loss"], right = self.aux_head.loss(prefix, targets)
            stats["aux_acc"] = right.all(dim=1).float().mean()
            loss = loss + self.aux_weight * stats["aux_loss"]
        return loss, stats


def train(cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True,
          export: bool = True) -> TrainResult:
    """Run (or resume) training. `stop_after` ends the session after that many total optimizer steps without changing
    the schedule (as if interrupted); the final export happens only when the run reaches its last step."""
    from accelerate import Accelerator

    tc = cfg.train
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give the REA JSON file to train on.")
    # cpu=True without CUDA: lets accelerate form a multi-process CPU (gloo) group under torchrun / accelerate launch.
    accelerator = Accelerator(gradient_accumulation_steps=tc.grad_accum, mixed_precision=PRECISIONS[tc.precision],
                              cpu=not torch.cuda.is_available())
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if tc.deterministic:
        # Without this, CPU/GPU kernels with parallel scatter-adds (embedding and gather backward) vary in the last bits
        # from run to run, so a resumed run equals an uninterrupted one only up to float rounding.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(cfg, accelerator, resume=resume, stop_after=stop_after, progress=progress, export=export)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if accelerator.num_processes == 1:
            # accelerate keeps process-wide singletons; reset them so a later train() in this process (tests, notebooks)
            # may use another precision. Multi-process runs keep theirs (one run per process there).
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def _train(cfg: RunConfig, accelerator, *, resume: bool, stop_after: int | None, progress: bool,
           export: bool) -> TrainResult:
    from tqdm import tqdm

    tc = cfg.train
    out_dir = Path(cfg.out_dir)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    ckpts = list_checkpoints(out_dir)
    if is_main:
        if out_dir.exists() and any(out_dir.iterdir()) and not resume:
            if ckpts:
                raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue or choose another "
                                  "--out.")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(_to_yaml(cfg.to_dict()))

    model, processor = build_base(cfg.model)
    model = Objective(prepare_model(model, cfg), processor.tokenizer, tc)
    model.to(accelerator.device)
    dataset = READataset(cfg.data.train, processor, cfg.data)
    if len(dataset) == 0:
        raise DataError(f"{cfg.data.train}: no usable records ({dataset.report.summary()}).")
    per_step = tc.batch_size * tc.grad_accum * world
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * len(dataset) / per_step))
    warmup = int(round(tc.warmup_ratio * total_steps))

    named = trainable_named_parameters(model)
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=tc.betas, eps=tc.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(total_steps, warmup, tc.min_lr_ratio))

    step, samples, cursor_state, skipped_before = 0, 0, None, {}
    if resume and ckpts:
        state = load_checkpoint(ckpts[-1], model, optimizer, scheduler, rank)
        if state.get("world_size") != world:
            log.warning("resuming a %s-process run with %d processes: the data order differs from an uninterrupted run",
                        state.get("world_size"), world)
        step, samples = int(state["step"]), int(state["samples"])
        cursor_state = state["cursors"][rank] if rank < len(state["cursors"]) else None
        skipped_before = dict(state.get("skipped", {}))
        for section in ("model", "data", "lora"):
            if state.get("config", {}).get(section) != cfg.to_dict()[section]:
                log.warning("the `%s` section differs from the checkpoint's: the resumed run is not a continuation "
                            "of the same experiment", section)
        if state.get("total_steps") != total_steps:
            log.warning("total steps changed from %s to %d since the checkpoint", state.get("total_steps"), total_steps)
        log.info("resumed from %s at step %d", ckpts[-1], step)
    elif resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out_dir / CHECKPOINT_DIR)

    model, optimizer = accelerator.prepare(model, optimizer)
    cursor = RankCursor(len(dataset), tc.seed, rank, world, *(cursor_state or (0, 0)))
    batches = Batches(dataset, cursor, tc.batch_size, tc.num_workers, processor.pad_token_id)
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
    last = min(total_steps, stop_after) if stop_after is not None else total_steps
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and is_main), desc="train", unit="step",
               dynamic_ncols=True)
    losses: list[float] = []
    # A resumed run appends to its log; a fresh one starts it anew.
    log_file = (out_dir / "train_log.jsonl").open("a" if step > 0 else "w") if is_main else None
    t_start, samples_start = time.perf_counter(), samples
    params = [p for _, p in trainable_named_parameters(accelerator.unwrap_model(model))]
    try:
        model.train()
        while step < last:
            t0 = time.perf_counter()
            micro_losses, micro_stats = [], []
            for _ in range(tc.grad_accum):
                batch = batches.next()
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss, stats = model(batch.to(accelerator.device))
                    micro_stats.append({k: v.detach().float() for k, v in stats.items()})
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tc.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach().float())
            scheduler.step()
            step += 1
            samples += per_step
            step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
            losses.append(step_loss)
            dt = time.perf_counter() - t0
            sps = per_step / dt
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{sps:.2f}")
            if is_main and (step % tc.log_every == 0 or step == last):
                lr = scheduler.get_last_lr()[0]
                writer.add_scalar("train/loss", step_loss, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/samples_per_s", sps, step)
                writer.add_scalar("train/skipped_records", len(batches.skipped), step)
                extra = {k: float(torch.stack([m[k] for m in micro_stats]).mean()) for k in micro_stats[0]}
                for k, v in extra.items():
                    writer.add_scalar(f"train/{k}", v, step)
                log_file.write(json.dumps({"step": step, "loss": step_loss, "lr": lr, "samples_per_s": sps,
                                           "samples": samples, **extra}) + "\n")
                log_file.flush()
            if (tc.save_every and step % tc.save_every == 0) or step == last:
                _checkpoint(accelerator, out_dir, model, optimizer, scheduler, cursor, step, samples, total_steps,
                            {**skipped_before, **_skip_dict(batches.skipped)}, cfg, tc.keep_last)
    finally:
        bar.close()
        batches.close()
        if log_file:
            log_file.close()
    elapsed = time.perf_counter() - t_start
    sps_total = (samples - samples_start) / elapsed if elapsed > 0 else float("nan")
    skipped = {**skipped_before, **_skip_dict(batches.skipped)}
    n_skipped_read = len(dataset.report.skipped_on_read)
    if skipped or n_skipped_read:
        log.warning("training data: %d records skipped when read, %d failed to load (ids in the model card)",
                    n_skipped_read, len(skipped))
    result = TrainResult(out_dir, step, losses, samples, skipped, None, sps_total)
    if step >= total_steps and export:
        unwrapped = accelerator.unwrap_model(model).model
        if cfg.data.val and tc.val_loss_limit >= 0:
            result.val_loss = validation_loss(unwrapped, processor, cfg, accelerator)
        if is_main:
            result.export_dir = export_model(unwrapped, processor, cfg, result, dataset)
        accelerator.wait_for_everyone()
    if writer:
        writer.close()
    accelerator.end_training()
    return result


def _skip_dict(skipped: list[SkippedSample]) -> dict[str, str]:
    return {s.record_id: s.reason for s in skipped}


def _checkpoint(accelerator, out_dir, model, optimizer, scheduler, cursor, step, samples, total_steps, skipped, cfg,
                keep_last):
    import torch.distributed as dist

    cur = [cursor.epoch, cursor.pos]
    if accelerator.num_processes > 1:
        gathered = [None] * accelerator.num_processes
        dist.all_gather_object(gathered, cur)  # small JSON-able lists, between our own processes
        cursors = gathered
    else:
        cursors = [cur]
    path = out_dir / CHECKPOINT_DIR / f"step_{step:08d}"
    unwrapped = accelerator.unwrap_model(model)
    inner_opt = getattr(optimizer, "optimizer", optimizer)
    state = {"step": step, "samples": samples, "total_steps": total_steps, "cursors": cursors, "skipped": skipped,
             "config": cfg.to_dict()}
    accelerator.wait_for_everyone()
    save_checkpoint(path, unwrapped, inner_opt, scheduler, state, accelerator.process_index,
                    accelerator.num_processes, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and keep_last:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def validation_loss(model, processor, cfg: RunConfig, accelerator=None) -> float | None:
    """Mean teacher-forced loss over val_loss_limit records of data.val spread evenly over the file (so over every
    validation kitchen, not the first one), or all of them (0)."""
    try:
        ds = READataset(cfg.data.val, processor, dataclasses.replace(cfg.data, limit=0))
    except DataError as e:
        log.warning("validation loss skipped: %s", e)
        return None
    limit = cfg.train.val_loss_limit
    indices = range(len(ds)) if limit <= 0 or limit >= len(ds) else \
        sorted(set(np.linspace(0, len(ds) - 1, limit).round().astype(int).tolist()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in indices:
        item = ds[i]
        if isinstance(item, SkippedSample):
            continue
        ctx = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            total += float(model(item.to(device)).loss)
        n += 1
    model.train(was_training)
    return total / n if n else None


def export_model(model, processor, cfg: RunConfig, result: TrainResult, dataset: READataset) -> Path:
    """Write <out>/model: save_pretrained (LoRA merged) + README.md model card."""
    from stllm_core.model import save_pretrained

    export_dir = Path(cfg.out_dir) / EXPORT_DIR
    trained = list(model.config.trainable) + (["language_model (LoRA, merged)"] if cfg.lora.enabled else [])
    lm = model.language_model
    if cfg.lora.enabled and hasattr(lm, "merge_and_unload"):
        model.language_model = lm.merge_and_unload()
        # The merged LM differs from its base: make save_pretrained write it.
        if "language_model" not in model.config.trainable:
            model.config = model.config.replace(trainable=tuple(model.config.trainable) + ("language_model",))
    save_pretrained(model, processor, export_dir)
    counts = model.num_parameters_per_part()
    card = _model_card(cfg, result, dataset, counts, trained)
    (export_dir / "README.md").write_text(card)
    (export_dir / "training.json").write_text(json.dumps({
        "steps": result.steps, "samples": result.samples, "final_loss": result.losses[-1] if result.losses else None,
        "val_loss": result.val_loss, "data": dataset.report.as_dict(), "skipped_on_load": result.skipped,
        "config": cfg.to_dict()}, indent=1))
    log.info("exported %s", export_dir)
    return export_dir


def _model_card(cfg: RunConfig, result: TrainResult, dataset: READataset, counts: dict[str, int],
                trained: list[str]) -> str:
    tc = cfg.train
    trainable = ", ".join(trained)
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    first = f"{result.losses[0]:.4f}" if result.losses else "n/a"
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "not computed"
    overrides = f" with overrides {json.dumps(cfg.model.overrides)}" if cfg.model.overrides else ""
    lora = (f"r={cfg.lora.r} alpha={cfg.lora.alpha} on {','.join(cfg.lora.target_modules)}" if cfg.lora.enabled
            else "no")
    lines = [
        "# ST-LLM fine-tuned checkpoint",
        "",
        f"Base: `{cfg.model.base}`{overrides}."
        " Load with `stllm_core.model.load_pretrained(<this dir>)` or `AnswerPipeline.load(model=<this dir>)`.",
        "",
        "## Data",
        f"- train: `{cfg.data.train}`: {dataset.report.num_records} usable records, "
        f"{len(dataset.report.skipped_on_read)} skipped when read, {len(result.skipped)} failed to load",
        f"- val: `{cfg.data.val or '-'}`",
        f"- frames per clip: {dataset.num_frames} (uniform over the query span)",
        "",
        "## Training",
        f"- optimizer steps: {result.steps}, samples: {result.samples}",
        f"- trained parts: {trainable}; LoRA: {lora}",
        f"- AdamW lr {tc.lr}, cosine with {tc.warmup_ratio:.0%} warm-up, batch {tc.batch_size} x accum {tc.grad_accum},"
        f" precision {tc.precision}, gradient checkpointing {tc.gradient_checkpointing}",
        f"- parameters per part: {json.dumps(counts)}",
        "",
        "## Metrics",
        f"- train loss: first step {first}, last step {final}",
        f"- validation loss: {val}",
        f"- throughput: {result.samples_per_s:.2f} samples/s (last session)",
        "",
        "Generation metrics: run `stllm-eval --model <this dir> --data <val.json> --out results.json`.",
        "",
    ]
    return "\n".join(lines)


def _to_yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


# --------------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stllm-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="training YAML (see training/configs/)")
    p.add_argument("--out", help="output directory (overrides out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output directory")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (overrides train.max_steps / epochs)")
    p.add_argument("--batch-size", type=int,
                   help="per-device batch size (overrides train.batch_size; a resumed run continues at the same "
                        "sample position with the new size)")
    p.add_argument("--stop-after", type=int, help="stop after this many total steps (schedule unchanged)")
    p.add_argument("--train-data", help="REA JSON to train on (overrides data.train)")
    p.add_argument("--val-data", help="REA JSON for the validation loss (overrides data.val)")
    p.add_argument("--base", help="preset or model directory to start from (overrides model.base)")
    p.add_argument("--ablation", choices=ABLATIONS, help="inputs removed from every training sample (overrides "
                                                          "data.ablation; blind = the question-only baseline)")
    p.add_argument("--no-export", action="store_true", help="do not write <out>/model at the end (benchmarks)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = RunConfig.load(args.config)
        if args.out:
            cfg.out_dir = args.out
        if args.max_steps is not None:
            cfg.train.max_steps = args.max_steps
        if args.batch_size is not None:
            cfg.train.batch_size = args.batch_size
        cfg.train.__post_init__()
        if args.train_data:
            cfg.data.train = args.train_data
        if args.val_data:
            cfg.data.val = args.val_data
        if args.base:
            cfg.model.base = args.base
        if args.ablation:
            cfg.data.ablation = args.ablation
        res = train(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                    export=not args.no_export)
    except STLLMError as e:
        print(f"stllm-train: error: {e}", file=sys.stderr)
        return 2
    msg = f"done: {res.steps} steps, {res.samples_per_s:.2f} samples/s"
    msg += f", last loss {res.losses[-1]:.4f}" if res.losses else ""
    if res.export_dir:
        msg += f", model exported to {res.export_dir}"
    print(msg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
