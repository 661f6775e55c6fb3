"""A tiny random ST-LLM (seconds on CPU, no download) and random clips, for tests and demos.

build_tiny(seed) -> (model, processor): tiny SigLIP (hidden 32, 2 layers, patch 8, image 32) + tiny Llama (hidden 32,
2 layers, 4 heads) + a byte-level BPE tokenizer trained in-process on a fixed corpus (ChatML template, eos <|im_end|>).
"""

from __future__ import annotations

import numpy as np
import torch

from stllm_core.model.configuration import config_preset
from stllm_core.model.prompt import PREFIX_TOKEN
from stllm_core.types import Clip, Frame, Scene

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", PREFIX_TOKEN)

_CORPUS = [
    "The video lasts for 12.50 seconds, and 32 frames are uniformly sampled from it.",
    "These frames are located at 0.00s,0.40s,0.81s,1.21s,1.61s,2.02s,2.42s,2.83s,3.23s,3.63s.",
    "Where did I leave the mug? The mug is on the counter to the left of the sink.",
    "Is the fridge to my left or to my right? The fridge is behind you, to the right.",
    "Did I move closer to the oven? You moved closer to the oven while washing the plate.",
    "Which object will I use next: hob, microwave, dishwasher, freezer or tv? You will open the microwave.",
    "What should I do next to make tea? Fill the kettle at the sink, then put it on the hob.",
    "left right front back closer farther same place unclear about the same yes no",
    "put down plate, pick up knife, open drawer, close cupboard, wash hands, turn on tap",
    "user assistant system question answer seconds frames located sampled uniformly",
]


def train_tiny_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on a fixed corpus (deterministic, ~0.02 s), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    fast.add_tokens([t for t in SPECIAL_TOKENS], special_tokens=True)
    return fast


def build_tiny(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, processor) of the "tiny" preset with random weights, deterministic for a given seed."""
    from stllm_core.model.loading import build_model

    tokenizer = train_tiny_tokenizer()
    config = config_preset("tiny")
    llm = dict(config.llm)
    llm.update(vocab_size=max(llm["vocab_size"], len(tokenizer)), eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = config.replace(llm=llm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = build_model(config, tokenizer, device=device, dtype=dtype)
    return model, processor


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """World-from-camera (4, 4) of an OpenCV optical frame at `eye` looking at `target` (z forward, y down)."""
    z = np.asarray(target, float) - np.asarray(eye, float)
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, y, z], axis=1)
    T[:3, 3] = eye
    return T


def random_clip(num_frames: int = 4, seed: int = 0, num_points: int = 300, size: tuple[int, int] = (48, 40),
                fps: float = 2.0) -> Clip:
    """A Clip of random RGB frames (size=(width, height)) from a camera moving on an arc around a random cloud."""
    rng = np.random.default_rng(seed)
    w, h = size
    K = np.array([[0.9 * w, 0.0, (w - 1) / 2], [0.0, 0.9 * w, (h - 1) / 2], [0.0, 0.0, 1.0]])
    frames = []
    for i in range(num_frames):
        a = 0.3 * i + rng.uniform(-0.05, 0.05)
        eye = np.array([2.0 * np.cos(a), 2.0 * np.sin(a), 1.4])
        T = look_at(eye, np.array([0.0, 0.0, 0.7]))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        frames.append(Frame(stamp=100.0 + i / fps, image=image, K=K.copy(), T_world_cam=T))
    pts = rng.uniform((-1.5, -1.5, 0.0), (1.5, 1.5, 1.5), (num_points, 3)).astype(np.float32)
    cols = rng.integers(0, 256, (num_points, 3), dtype=np.uint8)
    return Clip(frames=tuple(frames), scene=Scene(points=pts, colors=cols, stamp=100.0))
