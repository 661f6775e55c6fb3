"""The Q-Former-style aligner: learnable queries that read image, question and point tokens.

Sequence (self-attention):  [queries (Nq) | image tokens (T*S) + ray PE + frame embedding | question tokens (Q)]
Memory (cross-attention):   [a learned "null" token | point features + ray PE]   (the null token keeps the softmax
                            defined when the cloud is empty: an empty cloud simply means the queries read nothing)
The first Nq outputs are normalised and projected to the language model's width: the prefix tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.o = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, mem_mask: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        M = mem.shape[1]
        q = self.q(x).view(B, L, self.heads, C // self.heads).transpose(1, 2)  # (B, h, L, c)
        k, v = self.kv(mem).view(B, M, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 2 x (B, h, M, c)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mem_mask[:, None, None, :])  # (B, h, L, c)
        return self.o(y.transpose(1, 2).reshape(B, L, C))


class AlignerLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.self_attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.cross_attn = Attention(hidden, heads)
        self.norm3 = nn.LayerNorm(hidden)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, mem: torch.Tensor, mem_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, x_mask)
        x = x + self.cross_attn(self.norm2(x), mem, mem_mask)
        return x + self.mlp(self.norm3(x))


class QFormerAligner(nn.Module):
    """Queries + image/question/point tokens -> (B, num_queries, lm_hidden) prefix embeddings."""

    def __init__(self, lm_hidden: int, hidden: int, layers: int, heads: int, mlp_ratio: float, num_queries: int,
                 max_frames: int, max_question_tokens: int):
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * 0.02)
        self.image_in = nn.Linear(lm_hidden, hidden)
        self.text_in = nn.Linear(lm_hidden, hidden)
        self.frame_embed = nn.Embedding(max_frames, hidden)
        self.text_pos = nn.Embedding(max_question_tokens, hidden)
        self.type_embed = nn.Embedding(3, hidden)  # 0 query, 1 image, 2 question
        self.null_memory = nn.Parameter(torch.randn(1, hidden) * 0.02)
        self.layers = nn.ModuleList(AlignerLayer(hidden, heads, mlp_ratio) for _ in range(layers))
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, lm_hidden)

    def forward(
        self,
        image_feats: torch.Tensor,  # (B, T, S, lm_hidden) pooled patch features
        image_pe: torch.Tensor,  # (B, T, S, hidden) ray encodings of the patches
        frame_mask: torch.Tensor,  # (B, T) bool
        question_embeds: torch.Tensor,  # (B, Q, lm_hidden) LM input embeddings of the question
        question_mask: torch.Tensor,  # (B, Q) bool
        point_feats: torch.Tensor,  # (B, P, hidden) point features + ray encodings
        point_mask: torch.Tensor,  # (B, P) bool
    ) -> torch.Tensor:
        B, T, S, _ = image_feats.shape
        Q = question_embeds.shape[1]
        dtype = self.queries.dtype
        frame_ids = torch.arange(T, device=image_feats.device)
        img = self.image_in(image_feats.to(dtype)) + image_pe.to(dtype)  # (B, T, S, C)
        img = img + (self.frame_embed(frame_ids)[:, None] + self.type_embed.weight[1])[None]
        img = img.reshape(B, T * S, -1)  # (B, T*S, C)
        txt = self.text_in(question_embeds.to(dtype)) + self.text_pos(torch.arange(Q, device=img.device))
        txt = txt + self.type_embed.weight[2]  # (B, Q, C)
        qry = (self.queries + self.type_embed.weight[0]).expand(B, -1, -1)  # (B, Nq, C)
        x = torch.cat([qry, img, txt], dim=1)  # (B, Nq + T*S + Q, C)
        x_mask = torch.cat([
            torch.ones(B, self.num_queries, dtype=torch.bool, device=x.device),
            frame_mask.bool()[:, :, None].expand(B, T, S).reshape(B, T * S),
            question_mask.bool(),
        ], dim=1)
        mem = torch.cat([self.null_memory.expand(B, -1, -1), point_feats.to(dtype)], dim=1)  # (B, 1 + P, C)
        mem_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), point_mask.bool()], dim=1)
        for layer in self.layers:
            x = layer(x, x_mask, mem, mem_mask)
        return self.out_proj(self.out_norm(x[:, : self.num_queries]))  # (B, Nq, lm_hidden)
