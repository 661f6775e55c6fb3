"""Point encoder: a PointNet/EdgeConv-style network over a voxelized RGB point cloud, in plain PyTorch.

Input per point: xyz in the frame-0 camera frame (metres) and rgb / 127.5 - 1, i.e. (B, P, 6), with a (B, P) bool mask
(padding and the "no points" case are masked points). No sparse convolution and no CUDA-only extension: it runs on
CPU, exports with torch.export, and is fp32-safe (distances are computed in float32).

Each layer does a local step and a global step, both residual. Local (EdgeConv-style): u = A [h, xyz] per point, then
Linear(max over the k nearest valid neighbours j of GELU(u_j - u_i)); since u_j - u_i = A [h_j - h_i, x_j - x_i], this
is an edge MLP on relative features and positions, with the dense layer run per point (P rows) rather than per edge
(P*k rows), k times cheaper. Global: an MLP on [h_i, masked max over all points]. Masked points output zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NEG = -1e4  # "minus infinity" that stays finite in bf16/fp16


class _Mlp(nn.Sequential):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class PointLayer(nn.Module):
    def __init__(self, width: int, knn: int):
        super().__init__()
        self.knn = knn
        self.norm_local = nn.LayerNorm(width)
        self.local_in = nn.Linear(width + 3, width) if knn > 0 else None
        self.local_out = nn.Linear(width, width) if knn > 0 else None
        self.norm_global = nn.LayerNorm(width)
        self.glob = _Mlp(2 * width, width, width)

    def forward(self, h: torch.Tensor, xyz: torch.Tensor, mask: torch.Tensor, nbr: torch.Tensor | None) -> torch.Tensor:
        B, P, C = h.shape
        m = mask[..., None]  # (B, P, 1)
        if self.local_in is not None and nbr is not None:
            x = self.norm_local(h)
            u = self.local_in(torch.cat([x, xyz.to(x.dtype)], dim=-1))  # (B, P, C)
            k = nbr.shape[-1]
            flat = (nbr + torch.arange(B, device=h.device)[:, None, None] * P).reshape(-1)  # (B*P*k,)
            u_j = u.reshape(B * P, C)[flat].reshape(B, P, k, C)
            e = F.gelu(u_j - u[:, :, None])  # (B, P, k, C): edge features of relative features and positions
            valid_j = mask.reshape(B * P)[flat].reshape(B, P, k, 1)
            e = self.local_out(e.masked_fill(~valid_j, NEG).amax(dim=2))  # (B, P, C)
            h = h + torch.where(m, e, torch.zeros_like(e))
        x = self.norm_global(h)
        g = x.masked_fill(~m, NEG).amax(dim=1, keepdim=True)  # (B, 1, C)
        g = torch.where(mask.any(dim=1)[:, None, None], g, torch.zeros_like(g))
        h = h + self.glob(torch.cat([x, g.expand(-1, P, -1)], dim=-1))
        return h * m.to(h.dtype)


class PointEncoder(nn.Module):
    """(B, P, 6) points [xyz (frame 0, m), rgb in [-1, 1]] + (B, P) mask -> (B, P, out_dim) features."""

    def __init__(self, width: int, layers: int, knn: int, out_dim: int):
        super().__init__()
        self.knn = knn
        self.stem = _Mlp(6, width, width)
        self.layers = nn.ModuleList(PointLayer(width, knn) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    def neighbours(self, xyz: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """(B, P, k) indices of the k nearest valid points of each point (itself included), fp32 distances."""
        if self.knn <= 0:
            return None
        P = xyz.shape[1]
        k = min(self.knn, P)
        d = torch.cdist(xyz.float(), xyz.float())  # (B, P, P)
        d = d.masked_fill(~mask[:, None, :], float("inf"))
        return d.topk(k, dim=-1, largest=False).indices

    def forward(self, points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()
        xyz = points[..., :3]
        nbr = self.neighbours(xyz, mask)
        h = self.stem(points.to(self.stem[0].weight.dtype))  # (B, P, W)
        for layer in self.layers:
            h = layer(h, xyz, mask, nbr)
        out = self.out(self.norm(h))  # (B, P, out_dim)
        return out * mask[..., None].to(out.dtype)
