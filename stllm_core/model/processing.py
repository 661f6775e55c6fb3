"""STLLMProcessor: (question, Clip[, answer]) -> ModelInputs tensors, with every input checked.

Frames: RGB uint8 (H, W, 3) of any size, resized to image_size x image_size (cv2, INTER_AREA when shrinking) and
normalised with the config's mean/std; each frame's K is rescaled with its resize. If the clip has more frames than
config.num_frames, num_frames are picked uniformly (np.linspace, rounded); if it has fewer, all of them are used (at
least 1): no padding, the time instruction states the real count.
Poses: validated (finite, rigid) and re-expressed relative to the first selected frame. Each pooled patch gets a
6-number ray: its unit direction and the centre of its camera, both in the frame-0 camera frame (metres).
Points: non-finite points are dropped; the rest are moved into the frame-0 camera frame, averaged per voxel_size voxel,
and capped at max_points by a deterministic hash-priority subsample (spatially uniform, invariant to a global rigid
transform). The tensor is padded (masked) to at least max(1, point_knn) points, so an empty cloud is a fully masked
cloud; it is an InputError only when config.require_points is set. Each point gets a 6-number ray: its unit
direction from the camera-0 centre and its position, in frame 0 (what the model encodes of them is
config.ray_encoding).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from stllm_core.errors import InputError
from stllm_core.geometry import rays
from stllm_core.model import prompt as prompt_lib
from stllm_core.types import Clip

log = logging.getLogger(__name__)


@dataclass
class ModelInputs:
    """A batch of model inputs (all tensors; B = batch, L = prompt, T = frames, P = points, Q = question tokens)."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 = real token
    prefix_mask: torch.Tensor  # (B, L) bool, True at the num_queries placeholder positions
    pixel_values: torch.Tensor  # (B, T, 3, S, S) float, normalised
    frame_mask: torch.Tensor  # (B, T) bool
    patch_rays: torch.Tensor  # (B, T, s, s, 6) float: unit ray of each pooled patch + its camera centre (frame 0)
    points: torch.Tensor  # (B, P, 6) float: xyz (frame 0, metres), rgb / 127.5 - 1
    point_rays: torch.Tensor  # (B, P, 6) float: unit direction from the camera-0 centre + xyz (frame 0)
    point_mask: torch.Tensor  # (B, P) bool
    question_ids: torch.Tensor  # (B, Q) long, the cleaned question alone (for the aligner)
    question_mask: torch.Tensor  # (B, Q) bool
    labels: torch.Tensor | None = None  # (B, L) long, -100 except the answer + end-of-turn

    @property
    def num_frames(self) -> int:
        """Real frames in the first row."""
        return int(self.frame_mask[0].sum())

    @property
    def num_points(self) -> int:
        """Real (voxelized) points in the first row."""
        return int(self.point_mask[0].sum())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelInputs:
        """Move every tensor to `device`; float tensors are also cast to `dtype` if given."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
            out[f.name] = v
        return ModelInputs(**out)


def _pad(tensors: list[torch.Tensor], dim: int, value) -> torch.Tensor:
    n = max(t.shape[dim] for t in tensors)
    out = []
    for t in tensors:
        pad_shape = list(t.shape)
        pad_shape[dim] = n - t.shape[dim]
        out.append(torch.cat([t, torch.full(pad_shape, value, dtype=t.dtype)], dim=dim))
    return torch.cat(out, dim=0)


def collate(batch: list[ModelInputs], pad_token_id: int = 0) -> ModelInputs:
    """Right-pad and stack batch-of-1 (or larger) ModelInputs into one batch (masks mark padding)."""
    if not batch:
        raise InputError("collate() got an empty list of ModelInputs.")
    has_labels = [b.labels is not None for b in batch]
    if any(has_labels) and not all(has_labels):
        raise InputError("collate(): some examples have labels and some do not.")
    return ModelInputs(
        input_ids=_pad([b.input_ids for b in batch], 1, pad_token_id),
        attention_mask=_pad([b.attention_mask for b in batch], 1, 0),
        prefix_mask=_pad([b.prefix_mask for b in batch], 1, False),
        pixel_values=_pad([b.pixel_values for b in batch], 1, 0.0),
        frame_mask=_pad([b.frame_mask for b in batch], 1, False),
        patch_rays=_pad([b.patch_rays for b in batch], 1, 0.0),
        points=_pad([b.points for b in batch], 1, 0.0),
        point_rays=_pad([b.point_rays for b in batch], 1, 0.0),
        point_mask=_pad([b.point_mask for b in batch], 1, False),
        question_ids=_pad([b.question_ids for b in batch], 1, pad_token_id),
        question_mask=_pad([b.question_mask for b in batch], 1, False),
        labels=_pad([b.labels for b in batch], 1, prompt_lib.IGNORE_INDEX) if all(has_labels) else None,
    )


def voxelize(xyz: np.ndarray, rgb: np.ndarray, voxel_size: float, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean xyz and mean rgb per voxel of side voxel_size (metres); at most max_points voxels.

    Above max_points, voxels are kept by a hash of their integer coordinates (the smallest hashes win): deterministic,
    spatially uniform, and the same voxels whatever the input order. Returns (M, 3) float32 xyz, (M, 3) float32 rgb.
    """
    if len(xyz) == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)
    keys = np.floor(xyz / voxel_size).astype(np.int64)  # (N, 3)
    lo = keys.min(axis=0)
    span = keys.max(axis=0) - lo + 1
    if np.prod(span.astype(np.float64)) < 2**62:  # pack the 3 integer coordinates into one int64 (fast 1-D unique)
        packed = ((keys[:, 0] - lo[0]) * span[1] + (keys[:, 1] - lo[1])) * span[2] + (keys[:, 2] - lo[2])
        _, first, inverse, counts = np.unique(packed, return_index=True, return_inverse=True, return_counts=True)
        uniq = keys[first]
    else:
        uniq, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    feats = np.concatenate([xyz, rgb], axis=1)
    sums = np.stack([np.bincount(inverse, weights=feats[:, c], minlength=len(uniq)) for c in range(6)], axis=1)
    means = sums / counts[:, None]
    if len(uniq) > max_points:
        u = uniq.astype(np.uint64)
        with np.errstate(over="ignore"):
            h = (u[:, 0] * np.uint64(73856093)) ^ (u[:, 1] * np.uint64(19349663)) ^ (u[:, 2] * np.uint64(83492791))
            h = (h ^ (h >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
            h = h ^ (h >> np.uint64(32))
        keep = np.sort(np.argsort(h, kind="stable")[:max_points])
        means = means[keep]
    return means[:, :3].astype(np.float32), means[:, 3:].astype(np.float32)


def select_frame_indices(n: int, num_frames: int) -> np.ndarray:
    """Indices of the frames used: all if n <= num_frames, else num_frames uniformly spaced (np.linspace, rounded).

    Example: select_frame_indices(10, 4) -> [0, 3, 6, 9].
    """
    if n <= num_frames:
        return np.arange(n)
    return np.linspace(0, n - 1, num_frames).round().astype(np.int64)


class STLLMProcessor:
    """Turns (question, Clip[, answer]) into ModelInputs for one STLLMConfig and one tokenizer."""

    def __init__(self, config, tokenizer, patch_size: int | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.prefix_token_id = prompt_lib.ensure_prefix_token(tokenizer)
        self.patch_size = int(patch_size or config.patch_size)
        grid = config.image_size // self.patch_size
        self.pooled_grid = -(-grid // config.pool)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    @property
    def stop_token_ids(self) -> list[int]:
        return prompt_lib.stop_token_ids(self.tokenizer)

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    # --- validation --------------------------------------------------------------------------------------------
    @staticmethod
    def _check_frames(clip: Clip) -> None:
        if not isinstance(clip, Clip):
            raise InputError(f"Expected a stllm_core.types.Clip, got {type(clip).__name__}.")
        if len(clip.frames) == 0:
            raise InputError("The clip has 0 frames; at least 1 frame is needed.")
        stamps = np.array([f.stamp for f in clip.frames], np.float64)
        if not np.all(np.isfinite(stamps)):
            raise InputError(f"Frame stamps must be finite; got {stamps.tolist()}.")
        if np.any(np.diff(stamps) < 0):
            i = int(np.argmax(np.diff(stamps) < 0))
            raise InputError(f"Frames are not in time order: frame {i + 1} (t={stamps[i + 1]:.3f}) comes after "
                             f"t={stamps[i]:.3f}.")

    @staticmethod
    def _check_image(i: int, image: np.ndarray) -> None:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            desc = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise InputError(f"Frame {i}: expected an RGB uint8 image of shape (H, W, 3), got {desc}.")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise InputError(f"Frame {i}: empty image of shape {image.shape}.")

    def _check_scene(self, clip: Clip) -> tuple[np.ndarray, np.ndarray]:
        pts = np.asarray(clip.scene.points)
        cols = np.asarray(clip.scene.colors)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise InputError(f"Scene points must have shape (N, 3), got {pts.shape}.")
        if cols.shape != pts.shape:
            raise InputError(f"Scene colors must have the points' shape {pts.shape}, got {cols.shape}.")
        finite = np.all(np.isfinite(pts), axis=1)
        if not finite.all():
            log.warning("Dropping %d non-finite scene points of %d.", int((~finite).sum()), len(pts))
            pts, cols = pts[finite], cols[finite]
        if len(pts) == 0 and self.config.require_points:
            raise InputError("The scene point cloud is empty, and this model requires points (require_points=True).")
        return pts.astype(np.float64), cols.astype(np.float64)

    # --- parts -------------------------------------------------------------------------------------------------
    def prepare_visual(self, clip: Clip) -> dict[str, torch.Tensor | list[float]]:
        """Frames, rays and points of a clip as batch-of-1 tensors, plus the frame times used in the prompt."""
        cfg = self.config
        self._check_frames(clip)
        idx = select_frame_indices(len(clip.frames), cfg.num_frames)
        frames = [clip.frames[i] for i in idx]
        for i, f in zip(idx, frames):
            self._check_image(int(i), f.image)
        poses = rays.validate_poses(np.stack([np.asarray(f.T_world_cam, np.float64) for f in frames]),
                                    what="T_world_cam of frame")
        rel = rays.relative_poses(poses)  # (T, 4, 4) T_cam0_cami
        S = cfg.image_size
        mean = np.asarray(cfg.image_mean, np.float32)
        std = np.asarray(cfg.image_std, np.float32)
        pix, patch_rays = [], []
        for i, f, T_rel in zip(idx, frames, rel):
            H, W = f.image.shape[:2]
            K = rays.validate_intrinsics(f.K, W, H, what=f"K of frame {int(i)}")
            interp = cv2.INTER_AREA if (W > S or H > S) else cv2.INTER_LINEAR
            img = cv2.resize(f.image, (S, S), interpolation=interp).astype(np.float32) / 255.0
            pix.append(((img - mean) / std).transpose(2, 0, 1))  # (3, S, S)
            K_s = rays.rescale_intrinsics(K, (W, H), (S, S))
            d = rays.patch_ray_directions(K_s, T_rel[:3, :3], S, self.patch_size, self.pooled_grid)  # (s, s, 3)
            patch_rays.append(np.concatenate([d, np.broadcast_to(T_rel[:3, 3], d.shape)], axis=-1))  # (s, s, 6)
        pts, cols = self._check_scene(clip)
        p0 = rays.points_in_frame0(pts, poses[0])
        xyz, rgb = voxelize(p0, cols, cfg.voxel_size, cfg.max_points)
        pdirs = rays.point_ray_directions(xyz)
        n = len(xyz)
        P = max(n, cfg.point_knn, 1)
        points = np.zeros((P, 6), np.float32)
        points[:n, :3] = xyz
        points[:n, 3:] = rgb / 127.5 - 1.0
        point_rays = np.zeros((P, 6), np.float32)
        point_rays[:n, :3] = pdirs
        point_rays[:n, 3:] = xyz
        t0 = clip.frames[0].stamp
        return {
            "pixel_values": torch.from_numpy(np.stack(pix))[None],  # (1, T, 3, S, S)
            "frame_mask": torch.ones(1, len(frames), dtype=torch.bool),
            "patch_rays": torch.from_numpy(np.stack(patch_rays).astype(np.float32))[None],  # (1, T, s, s, 6)
            "points": torch.from_numpy(points)[None],  # (1, P, 6)
            "point_rays": torch.from_numpy(point_rays)[None],  # (1, P, 6)
            "point_mask": (torch.arange(P) < n)[None],  # (1, P)
            "frame_times": [float(f.stamp - t0) for f in frames],
            "duration": float(clip.duration),
        }

    def clean_question(self, question: str) -> str:
        return prompt_lib.clean_text(question, self.tokenizer, self.config.max_question_chars, "question")

    def __call__(self, question: str, clip: Clip, answer: str | None = None) -> ModelInputs:
        q = self.clean_question(question)
        a = None
        if answer is not None:
            a = prompt_lib.clean_text(answer, self.tokenizer, None, "answer")
        vis = self.prepare_visual(clip)
        ids, labels = prompt_lib.encode_example(self.tokenizer, q, vis["duration"], vis["frame_times"],
                                                self.config.num_queries, a, style=self.config.prompt_style)
        input_ids = torch.tensor([ids], dtype=torch.long)
        prefix_mask = input_ids == self.prefix_token_id
        if int(prefix_mask.sum()) != self.config.num_queries:
            raise InputError(f"The prompt tokenized to {int(prefix_mask.sum())} prefix placeholders instead of "
                             f"{self.config.num_queries}; the tokenizer splits {prompt_lib.PREFIX_TOKEN!r}.")
        qids = self.tokenizer(q, add_special_tokens=False)["input_ids"][: self.config.aligner_max_question_tokens]
        return ModelInputs(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            prefix_mask=prefix_mask,
            pixel_values=vis["pixel_values"],
            frame_mask=vis["frame_mask"],
            patch_rays=vis["patch_rays"],
            points=vis["points"],
            point_rays=vis["point_rays"],
            point_mask=vis["point_mask"],
            question_ids=torch.tensor([qids], dtype=torch.long),
            question_mask=torch.ones(1, len(qids), dtype=torch.bool),
            labels=None if labels is None else torch.tensor([labels], dtype=torch.long),
        )
