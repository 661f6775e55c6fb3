"""The Q-Former-style aligner: learnable queries that read image, question and point tokens.

Sequence (self-attention):  [queries (Nq) | image tokens (T*S) | question tokens (Q)]
Memory (cross-attention):   [a learned "null" token | point tokens (P)]   (the null token keeps the softmax defined
                            when the cloud is empty: an empty cloud simply means the queries read nothing)
Only the queries cross-attend to the memory (as BLIP-2's Q-Former queries read the image; the official ST-LLM lets
the whole sequence do it): image and question tokens reach the points through the queries. The memory is projected
to keys and values once, and every layer reads the same ones. Both keep the thousands of point tokens cheap.

Every stream's content is layer-normalised before its encodings are added, so that no stream drowns another:
    image token    = LN(image_in(patch feature)) + ray encoding (itself layer-normalised) + frame + type embedding
    question token = LN(text_in(LM input embedding)) + text position + type embedding
    point token    = LN(point feature) + ray encoding (layer-normalised)
    query          = a learned vector at unit scale + type embedding
The frame, type and text-position embeddings start small (initializer_range) and the queries at unit scale, so the
queries are distinct from the first step (a large shared embedding added to small queries would make them one token
after the first LayerNorm). The first Nq outputs are projected to the language model's width and layer-normalised
with a gain initialised to the RMS of the LM's input embeddings (`prefix_norm`): the prefix enters the LM at the scale
of its own token embeddings. Initial values are set by STLLMForConditionalGeneration._init_weights (one place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, heads: int, hidden: int) -> torch.Tensor:
    """(B, M, n * hidden) -> n x (B, heads, M, hidden / heads)."""
    B, M, _ = x.shape
    return x.view(B, M, -1, heads, hidden // heads).permute(2, 0, 3, 1, 4)


class Attention(nn.Module):
    """Multi-head attention of x over keys/values (self-attention: `kv` projects x itself; cross-attention: the
    aligner projects the point memory once and every layer reads the same keys and values)."""

    def __init__(self, hidden: int, heads: int, own_kv: bool = True):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden) if own_kv else None
        self.o = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q = split_heads(self.q(x), self.heads, C)[0]  # (B, h, L, c)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, h, L, c)
        return self.o(y.transpose(1, 2).reshape(B, L, C))

    def self_attention(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        k, v = split_heads(self.kv(x), self.heads, x.shape[-1])
        return self(x, k, v, mask)


class AlignerLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.self_attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.cross_attn = Attention(hidden, heads, own_kv=False)
        self.norm3 = nn.LayerNorm(hidden)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor,
                mem_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
        x = x + self.self_attn.self_attention(self.norm1(x), x_mask)
        q = x[:, :num_queries]  # only the queries read the points (as BLIP-2's Q-Former reads the image)
        q = q + self.cross_attn(self.norm2(q), mem_k, mem_v, mem_mask)
        x = torch.cat([q, x[:, num_queries:]], dim=1)
        return x + self.mlp(self.norm3(x))


class QFormerAligner(nn.Module):
    """Queries + image/question/point tokens -> (B, num_queries, lm_hidden) prefix embeddings."""

    def __init__(self, lm_hidden: int, hidden: int, layers: int, heads: int, mlp_ratio: float, num_queries: int,
                 max_frames: int, max_question_tokens: int):
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.empty(num_queries, hidden))
        self.image_in = nn.Linear(lm_hidden, hidden)
        self.image_norm = nn.LayerNorm(hidden)
        self.text_in = nn.Linear(lm_hidden, hidden)
        self.text_norm = nn.LayerNorm(hidden)
        self.point_norm = nn.LayerNorm(hidden)
        self.frame_embed = nn.Embedding(max_frames, hidden)
        self.text_pos = nn.Embedding(max_question_tokens, hidden)
        self.type_embed = nn.Embedding(3, hidden)  # 0 query, 1 image, 2 question
        self.null_memory = nn.Parameter(torch.empty(1, hidden))
        self.memory_kv = nn.Linear(hidden, 2 * hidden)  # point memory -> keys/values, once for every layer
        self.heads = heads
        self.layers = nn.ModuleList(AlignerLayer(hidden, heads, mlp_ratio) for _ in range(layers))
        self.out_proj = nn.Linear(hidden, lm_hidden)
        self.prefix_norm = nn.LayerNorm(lm_hidden)  # gain = the LM's input-embedding RMS (set by _init_weights)

    def forward(
        self,
        image_feats: torch.Tensor,  # (B, T, S, lm_hidden) pooled patch features
        image_pe: torch.Tensor,  # (B, T, S, hidden) ray encodings of the patches
        frame_mask: torch.Tensor,  # (B, T) bool
        question_embeds: torch.Tensor,  # (B, Q, lm_hidden) LM input embeddings of the question
        question_mask: torch.Tensor,  # (B, Q) bool
        point_feats: torch.Tensor,  # (B, P, hidden) point encoder features
        point_pe: torch.Tensor,  # (B, P, hidden) ray encodings of the points
        point_mask: torch.Tensor,  # (B, P) bool
    ) -> torch.Tensor:
        B, T, S, _ = image_feats.shape
        Q = question_embeds.shape[1]
        dtype = self.queries.dtype
        frame_ids = torch.arange(T, device=image_feats.device)
        img = self.image_norm(self.image_in(image_feats.to(dtype))) + image_pe.to(dtype)  # (B, T, S, C)
        img = img + (self.frame_embed(frame_ids)[:, None] + self.type_embed.weight[1])[None]
        img = img.reshape(B, T * S, -1)  # (B, T*S, C)
        txt = self.text_norm(self.text_in(question_embeds.to(dtype)))
        txt = txt + self.text_pos(torch.arange(Q, device=img.device)) + self.type_embed.weight[2]  # (B, Q, C)
        qry = (self.queries + self.type_embed.weight[0]).expand(B, -1, -1)  # (B, Nq, C)
        x = torch.cat([qry, img, txt], dim=1)  # (B, Nq + T*S + Q, C)
        x_mask = torch.cat([
            torch.ones(B, self.num_queries, dtype=torch.bool, device=x.device),
            frame_mask.bool()[:, :, None].expand(B, T, S).reshape(B, T * S),
            question_mask.bool(),
        ], dim=1)
        pts = (self.point_norm(point_feats.to(dtype)) + point_pe.to(dtype)) * point_mask[..., None].to(dtype)
        mem = torch.cat([self.null_memory.expand(B, -1, -1), pts], dim=1)  # (B, 1 + P, C)
        mem_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), point_mask.bool()], dim=1)
        mem_k, mem_v = split_heads(self.memory_kv(mem), self.heads, mem.shape[-1])  # 2 x (B, h, 1 + P, c)
        for layer in self.layers:
            x = layer(x, x_mask, mem_k, mem_v, mem_mask, self.num_queries)
        return self.prefix_norm(self.out_proj(x[:, : self.num_queries]))  # (B, Nq, lm_hidden)
