"""Ray positional encoding: Fourier features with FLOAT frequencies, a linear projection, then a LayerNorm.

Each ray is 6 numbers in the frame-0 camera frame (stllm_core.model.processing builds them):
    patch ray: [unit direction of the patch, centre of the camera that saw it (metres)]
    point ray: [unit direction from the camera-0 centre to the point, the point itself (metres)]
`mode` decides what is encoded:
    "direction"           the paper's encoding: the direction alone (where the camera stood is never given);
    "direction+position"  the direction and the position (divided by `position_scale` metres), so that a patch also
                          says where the camera was and a point where it is.
The official ST-LLM code computes frequencies 2**k for k = 0..126 in int64, which overflows for k >= 63 (63 of the
127 frequencies become 0 and one negative), and in bf16 frequencies far above 2^8 are noise. Here the frequencies are
float32, log-spaced from 1 to `max_freq`, and the features are always computed in float32 whatever the model dtype.
The output is layer-normalised, so the encoding enters the aligner at the scale of the (normalised) content it is
added to.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stllm_core.model.configuration import RAY_ENCODINGS


def fourier_frequencies(num_freqs: int, max_freq: float) -> torch.Tensor:
    """(num_freqs,) float32 frequencies log-spaced in [1, max_freq]; one frequency is 1.0.

    Example: fourier_frequencies(4, 8.0) -> [1, 2, 4, 8].
    """
    if num_freqs == 1:
        return torch.ones(1, dtype=torch.float32, device="cpu")
    return torch.logspace(0.0, math.log2(max_freq), num_freqs, base=2.0, dtype=torch.float64, device="cpu").float()


def fourier_features(d: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """[d, sin(f d), cos(f d)] for d (..., n) -> (..., n + 2 n F), computed in float32."""
    d = d.float()
    x = d[..., :, None] * freqs.to(d.device)  # (..., n, F)
    x = x.flatten(-2)  # (..., nF)
    return torch.cat([d, torch.sin(x), torch.cos(x)], dim=-1)


class RayEncoder(nn.Module):
    """Rays (..., 6) in the frame-0 camera frame -> (..., out_dim) layer-normalised positional encodings."""

    def __init__(self, num_freqs: int, max_freq: float, out_dim: int, mode: str = "direction",
                 position_scale: float = 4.0):
        super().__init__()
        if mode not in RAY_ENCODINGS:
            raise ValueError(f"Got {mode!r} for the ray encoding; expected one of {RAY_ENCODINGS}.")
        # Plain floats, not a buffer: module.to(bfloat16) must not round the frequencies (the official defect).
        self.freq_values = tuple(float(f) for f in fourier_frequencies(num_freqs, max_freq))
        self.mode = mode
        self.position_scale = float(position_scale)
        self.num_inputs = 3 if mode == "direction" else 6
        self.in_dim = self.num_inputs * (1 + 2 * num_freqs)
        self.proj = nn.Linear(self.in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    @property
    def freqs(self) -> torch.Tensor:
        return torch.tensor(self.freq_values, dtype=torch.float32, device="cpu")

    def forward(self, rays: torch.Tensor) -> torch.Tensor:
        freqs = torch.tensor(self.freq_values, dtype=torch.float32, device=rays.device)
        x = rays[..., :3].float()
        if self.mode == "direction+position":
            x = torch.cat([x, rays[..., 3:6].float() / self.position_scale], dim=-1)
        feats = fourier_features(x, freqs)  # (..., in_dim) float32
        return self.norm(self.proj(feats.to(self.proj.weight.dtype)))  # (..., out_dim)
