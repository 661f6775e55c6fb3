"""The model reads the scene: a tiny ST-LLM learns, in seconds on a CPU, three tasks whose answers are ONLY in the
scene, and the same model trained on the same questions without the scene stays near chance.

- colour: "What colour are the frames?" -> red / green / blue     (only the pixels say it)
- side:   "Is the cloud to my left or to my right?" -> left / right  (only the points say it; frames are grey)
- moved:  "Did I walk forward or backward?" -> forward / backward    (only the camera positions say it: the camera
                                                                       keeps its orientation, frames are grey)
Answers are read from greedy generation through the robot's AnswerPipeline, on clips never seen in training.
"""

from __future__ import annotations

import numpy as np
import torch

from stllm_core.model import PARTS, build_tiny, collate
from stllm_core.reasoning.pipeline import AnswerPipeline
from stllm_core.types import Clip, Frame, Scene
from training.data import ablate

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220)}
QUESTIONS = {"colour": "What colour are the frames?", "side": "Is the cloud to my left or to my right?",
             "moved": "Did I walk forward or backward?"}
ANSWERS = {"colour": list(COLOURS), "side": ["left", "right"], "moved": ["forward", "backward"]}
K = np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]])


def make_example(task: str, rng: np.random.Generator) -> tuple[str, Clip, str]:
    answer = ANSWERS[task][int(rng.integers(len(ANSWERS[task])))]
    T = np.eye(4)
    T[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # optical frame looking along world +x (REP-103 camera)
    T[:3, 3] = rng.uniform(-1, 1, 3)
    step = {"forward": 0.5, "backward": -0.5}.get(answer, float(rng.uniform(-0.5, 0.5)))
    frames = []
    for i in range(4):
        Ti = T.copy()
        Ti[:3, 3] += Ti[:3, 2] * step * i  # along the optical axis
        if task == "colour":
            img = np.clip(np.array(COLOURS[answer]) + rng.integers(-25, 26, (24, 32, 3)), 0, 255).astype(np.uint8)
        else:
            img = np.full((24, 32, 3), 128, np.uint8)
        frames.append(Frame(stamp=float(i), image=img, K=K, T_world_cam=Ti))
    n = 80
    local = rng.normal(0, 0.3, (n, 3)) + [0.0, 0.0, 2.0]  # in front of camera 0 (optical frame)
    if task == "side":
        local[:, 0] += 1.5 if answer == "right" else -1.5  # optical x points right
    else:
        local[:, 0] += rng.uniform(-1.5, 1.5)
    pts = local @ T[:3, :3].T + T[:3, 3]
    cols = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    return QUESTIONS[task], Clip(tuple(frames), Scene(pts.astype(np.float32), cols)), answer


def train_and_score(blind: bool, steps: int = 600, batch: int = 8, seed: int = 0, lr: float = 5e-4) -> dict[str, float]:
    """Train every part of a tiny model (its random LM too: a frozen random LM cannot put out words) on the three
    tasks, then the share of greedy answers that start with the right word, per task, on 30 new clips each."""
    torch.manual_seed(seed)
    model, processor = build_tiny(seed=seed)
    model.apply_trainable(PARTS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(seed)
    tasks = list(QUESTIONS)
    for _ in range(steps):
        items = []
        for _ in range(batch):
            q, clip, a = make_example(tasks[int(rng.integers(len(tasks)))], rng)
            items.append(processor(q, ablate(clip, "blind") if blind else clip, answer=a))
        loss = model(collate(items, processor.pad_token_id)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pipe = AnswerPipeline(model.eval(), processor)
    test_rng = np.random.default_rng(seed + 1000)
    scores = {}
    for task in tasks:
        hits = 0
        for _ in range(30):
            q, clip, a = make_example(task, test_rng)
            text = pipe.answer(q, ablate(clip, "blind") if blind else clip, max_new_tokens=8).text
            hits += text.strip().lower().startswith(a)
        scores[task] = hits / 30
    return scores


def test_tiny_model_learns_what_only_the_scene_says():
    seeing = train_and_score(blind=False)
    blind = train_and_score(blind=True)
    print(f"\naccuracy with the scene {seeing}, blind {blind}")
    for task, acc in seeing.items():
        assert acc >= 0.9, (task, seeing)
    chance = {task: 1 / len(ANSWERS[task]) for task in QUESTIONS}
    for task, acc in blind.items():
        assert acc <= chance[task] + 0.25, (task, blind)
