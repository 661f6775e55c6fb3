"""STLLMForConditionalGeneration: vision tower + point encoder + ray encodings + Q-Former aligner + causal LM.

    pixels (B,T,3,S,S) -> vision_tower -> vision_projector -> 2x2 pool -> (B,T,s,s,D_lm) --+
    patch rays (B,T,s,s,6) -> ray_encoders["image"] ---------------------------------------+
    question ids (B,Q) -> LM input embeddings ---------------------------------------------+--> aligner -> (B,Nq,D_lm)
    points (B,P,6) -> point_encoder, point rays (B,P,6) -> ray_encoders["point"] ----------+
    prompt ids (B,L) with Nq placeholder tokens -> LM embeddings, placeholders <- prefix -> language_model
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stllm_core.errors import InputError
from stllm_core.model.aligner import QFormerAligner
from stllm_core.model.configuration import BACKBONES, PARTS, STLLMConfig
from stllm_core.model.point_encoder import PointEncoder
from stllm_core.model.processing import ModelInputs
from stllm_core.model.prompt import IGNORE_INDEX
from stllm_core.model.rays import RayEncoder


class VisionProjector(nn.Module):
    """LLaVA's mlp2x_gelu projector (names match HF LLaVA's multi_modal_projector: linear_1, linear_2)."""

    def __init__(self, vision_hidden: int, lm_hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, lm_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(lm_hidden, lm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


@dataclass
class STLLMOutput:
    logits: torch.Tensor  # (B, L, vocab) without labels; (N, vocab) at the N predicted answer tokens with labels
    loss: torch.Tensor | None = None


class STLLMForConditionalGeneration(nn.Module):
    """The ST-LLM model. Build it with loading.build_model (backbones from config dicts, paths or wheels)."""

    def __init__(self, config: STLLMConfig, vision_tower: nn.Module, language_model: nn.Module):
        super().__init__()
        self.config = config
        vision_hidden = vision_tower.config.hidden_size
        lm_hidden = language_model.config.get_text_config().hidden_size
        self.patch_size = int(vision_tower.config.patch_size)
        grid = config.image_size // self.patch_size
        self.pooled_grid = -(-grid // config.pool)
        self.vision_tower = vision_tower
        self.vision_projector = VisionProjector(vision_hidden, lm_hidden)
        self.point_encoder = PointEncoder(config.point_width, config.point_layers, config.point_knn,
                                          config.aligner_hidden)
        self.ray_encoders = nn.ModuleDict({
            name: RayEncoder(config.ray_num_freqs, config.ray_max_freq, config.aligner_hidden, config.ray_encoding,
                             config.position_scale)
            for name in ("image", "point")
        })
        self.aligner = QFormerAligner(lm_hidden, config.aligner_hidden, config.aligner_layers, config.aligner_heads,
                                      config.aligner_mlp_ratio, config.num_queries, config.num_frames,
                                      config.aligner_max_question_tokens)
        self.language_model = language_model
        for name in PARTS:
            if name not in BACKBONES:
                self.part(name).apply(self._init_weights)
        self.match_prefix_scale()
        self.apply_trainable()

    # --- initialisation: the one convention for every part this project defines ------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        """Linear and Embedding weights ~ N(0, initializer_range), biases 0, LayerNorm gain 1 / bias 0; the aligner's
        queries and null memory ~ N(0, 1): unit scale, as the layer-normalised streams they sit beside, and far
        larger than the embeddings added to them (so the queries start distinct). The backbones (vision tower,
        language model) keep their own initialisation or pretrained weights."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, QFormerAligner):
            nn.init.normal_(module.queries, std=1.0)
            nn.init.normal_(module.null_memory, std=1.0)

    @torch.no_grad()
    def match_prefix_scale(self, embedding_weight: torch.Tensor | None = None) -> float | None:
        """Set the prefix output gain to the RMS of the LM's input embeddings (`embedding_weight`, default the LM's
        own; skipped while it is on the meta device), so prefix tokens have the norm of real token embeddings."""
        w = self.language_model.get_input_embeddings().weight if embedding_weight is None else embedding_weight
        if w.is_meta:
            return None
        rms = float(w.float().pow(2).mean().sqrt())
        self.aligner.prefix_norm.weight.fill_(rms)
        return rms

    # --- parts -------------------------------------------------------------------------------------------------
    def part(self, name: str) -> nn.Module:
        return getattr(self, name)

    def apply_trainable(self, trainable: tuple[str, ...] | None = None) -> None:
        """requires_grad=True for the parts in `trainable` (default: config.trainable), False for the rest."""
        trainable = self.config.trainable if trainable is None else tuple(trainable)
        for name in PARTS:
            for p in self.part(name).parameters():
                p.requires_grad_(name in trainable)

    def num_parameters_per_part(self) -> dict[str, int]:
        """Unique parameter counts per named part (tied LM weights counted once)."""
        counts = {}
        for name in PARTS:
            seen = {}
            for p in self.part(name).parameters():
                seen[id(p)] = p.numel()
            counts[name] = sum(seen.values())
        return counts

    @property
    def device(self) -> torch.device:
        return self.aligner.queries.device

    @property
    def dtype(self) -> torch.dtype:
        return self.aligner.queries.dtype

    # --- step 1: encoders ----------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) normalised pixels -> (B, T, s, s, D_lm) pooled, projected patch features."""
        B, T = pixel_values.shape[:2]
        vt = self.vision_tower
        x = pixel_values.flatten(0, 1).to(vt.embeddings.patch_embedding.weight.dtype)  # (B*T, 3, S, S)
        h = vt.encoder(inputs_embeds=vt.embeddings(x)).last_hidden_state  # (B*T, g*g, Dv) at config.feature_layer
        h = self.vision_projector(h)  # (B*T, g*g, D)
        g = int(round(h.shape[1] ** 0.5))
        h = h.transpose(1, 2).reshape(B * T, -1, g, g)  # (B*T, D, g, g)
        h = F.adaptive_avg_pool2d(h, self.pooled_grid)  # (B*T, D, s, s)
        return h.permute(0, 2, 3, 1).reshape(B, T, self.pooled_grid, self.pooled_grid, -1)

    def get_point_features(self, points: torch.Tensor, point_mask: torch.Tensor) -> torch.Tensor:
        """(B, P, 6) points, (B, P) mask -> (B, P, aligner_hidden) point encoder features (zeros where masked)."""
        return self.point_encoder(points, point_mask)

    def get_prefix_embeds(self, inputs: ModelInputs) -> torch.Tensor:
        """Step 1: all encoders + aligner -> (B, num_queries, D_lm) prefix embeddings."""
        img = self.get_image_features(inputs.pixel_values)  # (B, T, s, s, D)
        B, T, s = img.shape[:3]
        img = img.reshape(B, T, s * s, -1)  # (B, T, S, D)
        img_pe = self.ray_encoders["image"](inputs.patch_rays.reshape(B, T, s * s, -1))  # (B, T, S, C)
        pts = self.get_point_features(inputs.points, inputs.point_mask)  # (B, P, C)
        pts_pe = self.ray_encoders["point"](inputs.point_rays)  # (B, P, C)
        q = self.language_model.get_input_embeddings()(inputs.question_ids)  # (B, Q, D)
        prefix = self.aligner(img, img_pe, inputs.frame_mask, q, inputs.question_mask, pts, pts_pe, inputs.point_mask)
        return prefix.to(self.language_model.get_input_embeddings().weight.dtype)

    # --- step 2: prompt ----------------------------------------------------------------------------------------
    def embed_prompt(self, inputs: ModelInputs, prefix: torch.Tensor) -> torch.Tensor:
        """Step 2: (B, L, D_lm) prompt embeddings with the prefix scattered into the placeholder positions."""
        ids, where = inputs.input_ids, inputs.prefix_mask.bool()  # (B, L)
        counts = where.sum(dim=1).tolist()
        n = prefix.shape[1]
        if any(c != n for c in counts):
            raise InputError(
                f"Prompt has {counts} prefix placeholder token(s) per row but the prefix has {n} tokens; "
                "build inputs with the STLLMProcessor of this model."
            )
        emb = self.language_model.get_input_embeddings()(ids.masked_fill(where, 0))  # (B, L, D)
        return emb.masked_scatter(where[..., None], prefix.to(emb.dtype))

    # --- step 3: language model ------------------------------------------------------------------------------
    def forward(self, inputs: ModelInputs, prefix: torch.Tensor | None = None) -> STLLMOutput:
        """Logits over the whole prompt; with labels, the mean cross-entropy of the answer tokens, and the vocabulary
        projection computed only where a label is predicted (the prompt's logits are never needed for the loss: on a
        small LM with a large vocabulary they are a fifth of the step). `prefix`: get_prefix_embeds(inputs) when the
        caller has it already."""
        prefix = self.get_prefix_embeds(inputs) if prefix is None else prefix  # (B, Nq, D)
        embeds = self.embed_prompt(inputs, prefix)  # (B, L, D)
        lm = self.language_model
        if inputs.labels is None or getattr(lm.config.get_text_config(), "final_logit_softcapping", None):
            out = lm(inputs_embeds=embeds, attention_mask=inputs.attention_mask, labels=inputs.labels, use_cache=False)
            return STLLMOutput(logits=out.logits, loss=out.loss)
        hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=inputs.attention_mask,
                                  use_cache=False).last_hidden_state  # (B, L, D)
        targets = inputs.labels[:, 1:]  # position t predicts token t + 1
        where = targets != IGNORE_INDEX  # (B, L - 1)
        logits = lm.get_output_embeddings()(hidden[:, :-1][where])  # (N, vocab)
        return STLLMOutput(logits=logits, loss=F.cross_entropy(logits.float(), targets[where]))
