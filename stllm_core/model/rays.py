"""Ray positional encoding: Fourier features of unit directions with FLOAT frequencies, then a linear projection.

The official ST-LLM code computes frequencies 2**k for k = 0..126 in int64, which overflows for k >= 63 (63 of the
127 frequencies become 0 and one negative), and in bf16 frequencies far above 2^8 are noise. Here the frequencies are
float32, log-spaced from 1 to `max_freq`, and the features are always computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def fourier_frequencies(num_freqs: int, max_freq: float) -> torch.Tensor:
    """(num_freqs,) float32 frequencies log-spaced in [1, max_freq]; one frequency is 1.0.

    Example: fourier_frequencies(4, 8.0) -> [1, 2, 4, 8].
    """
    if num_freqs == 1:
        return torch.ones(1, dtype=torch.float32, device="cpu")
    return torch.logspace(0.0, math.log2(max_freq), num_freqs, base=2.0, dtype=torch.float64, device="cpu").float()


def fourier_features(d: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """[d, sin(f d), cos(f d)] for d (..., 3) -> (..., 3 + 6 F), computed in float32."""
    d = d.float()
    x = d[..., :, None] * freqs.to(d.device)  # (..., 3, F)
    x = x.flatten(-2)  # (..., 3F)
    return torch.cat([d, torch.sin(x), torch.cos(x)], dim=-1)


class RayEncoder(nn.Module):
    """Unit ray directions (..., 3) in the frame-0 camera frame -> (..., out_dim) positional encodings."""

    def __init__(self, num_freqs: int, max_freq: float, out_dim: int):
        super().__init__()
        # Plain floats, not a buffer: module.to(bfloat16) must not round the frequencies (the official defect).
        self.freq_values = tuple(float(f) for f in fourier_frequencies(num_freqs, max_freq))
        self.in_dim = 3 + 6 * num_freqs
        self.proj = nn.Linear(self.in_dim, out_dim)

    @property
    def freqs(self) -> torch.Tensor:
        return torch.tensor(self.freq_values, dtype=torch.float32, device="cpu")

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        freqs = torch.tensor(self.freq_values, dtype=torch.float32, device=directions.device)
        feats = fourier_features(directions, freqs)  # (..., 3 + 6F) float32
        return self.proj(feats.to(self.proj.weight.dtype))  # (..., out_dim)
