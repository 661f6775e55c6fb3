"""An auxiliary loss on the prefix: linear read-outs of the answer's key terms from the prefix tokens.

The key terms of an answer are those the REA-Sim scorer checks (stllm_core.data.reasim.score): its yes/no polarity,
its first and second direction words, its distance word, the first furniture, the first item and the first verb it
names ("none" where it has none). They come from the answer TEXT, so any short-answer REA-format data provides them.
The head is a linear map from the flattened prefix (num_queries x D_lm) to one softmax per slot: the loss makes the
prefix that the language model reads carry the answer's facts. Without the language model a step costs a tenth of a
full one, so most of the aligner's training can happen here (train.lm_loss: false), the language-model loss then
teaching the words. The head is used in training only; it is never exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stllm_core.data.reasim.score import TERMS, extract, normalize
from stllm_core.model.prompt import IGNORE_INDEX

SLOTS: dict[str, tuple[str, ...]] = {
    "polarity": ("yes", "no"),
    "direction": tuple(TERMS["direction"]),
    "direction2": tuple(TERMS["direction"]),
    "distance": tuple(TERMS["distance"]),
    "furniture": tuple(TERMS["furniture"]),
    "item": tuple(TERMS["item"]),
    "verb": tuple(TERMS["verb"]),
}


def key_terms(answer: str) -> list[int]:
    """Class index per slot (0 = none, k = the k-th value of SLOTS[slot] + 1)."""
    words = normalize(answer).split()
    found = {
        "polarity": [words[0]] if words and words[0] in ("yes", "no") else [],
        "direction": extract(answer, "direction")[:1],
        "direction2": extract(answer, "direction")[1:2],
        "distance": extract(answer, "distance")[:1],
        "furniture": extract(answer, "furniture")[:1],
        "item": extract(answer, "item")[:1],
        "verb": extract(answer, "verb")[:1],
    }
    return [SLOTS[s].index(found[s][0]) + 1 if found[s] else 0 for s in SLOTS]


def answer_texts(tokenizer, labels: torch.Tensor) -> list[str]:
    """The answer of each row of a label tensor (the tokens that are not IGNORE_INDEX)."""
    return [tokenizer.decode([int(t) for t in row if t != IGNORE_INDEX], skip_special_tokens=True) for row in labels]


class KeyTermHead(nn.Module):
    """(B, Nq, D) prefix -> per-slot logits; `loss` = mean cross-entropy over the slots."""

    def __init__(self, num_queries: int, hidden: int, std: float):
        super().__init__()
        self.sizes = [len(v) + 1 for v in SLOTS.values()]
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(num_queries * hidden, sum(self.sizes))
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, prefix: torch.Tensor) -> list[torch.Tensor]:
        logits = self.proj(self.norm(prefix.float()).flatten(1))  # (B, sum(sizes))
        return list(logits.split(self.sizes, dim=-1))

    def loss(self, prefix: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, (B, slots) bool: slot predicted right) for targets (B, slots) from key_terms."""
        logits = self(prefix)
        losses = [F.cross_entropy(lg, targets[:, i]) for i, lg in enumerate(logits)]
        right = torch.stack([lg.argmax(-1) == targets[:, i] for i, lg in enumerate(logits)], dim=1)
        return torch.stack(losses).mean(), right
