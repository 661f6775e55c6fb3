"""Export of the encoder stack (vision tower + point encoder + ray encodings + aligner) to torch.export and ONNX.

The encoder stack is everything before the language model: `model.get_prefix_embeds(inputs)`, wrapped in
`EncoderStack` so that it takes plain tensors (in ENCODER_INPUTS order) and returns the prefix (B, num_queries, D_lm).

Exported graphs, ONNX files and TensorRT engines have FIXED input shapes. `pad_encoder_inputs` pads a processor output
to the model's maxima (num_frames, max_points, aligner_max_question_tokens) with masked entries, so one graph serves
every clip; masked frames/points/question tokens do not change the prefix (tested).

    stack = EncoderStack(model)
    args = encoder_args(pad_encoder_inputs(inputs, model.config))
    program = export_encoder(model, args)                   # torch.export.ExportedProgram
    path = export_onnx(model, args, "encoder.onnx")         # ONNX (dynamo exporter, opset 18+)
    err = onnx_max_abs_error(path, model, args)             # onnxruntime CPU vs eager
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from stllm_core.errors import InputError

logger = logging.getLogger(__name__)

ENCODER_INPUTS = (
    "pixel_values",  # (B, T, 3, S, S) float
    "frame_mask",  # (B, T) bool
    "patch_rays",  # (B, T, s, s, 6) float
    "points",  # (B, P, 6) float
    "point_rays",  # (B, P, 6) float
    "point_mask",  # (B, P) bool
    "question_ids",  # (B, Q) long
    "question_mask",  # (B, Q) bool
)


class EncoderStack(nn.Module):
    """`model.get_prefix_embeds` as a module of plain tensors: (ENCODER_INPUTS...) -> (B, num_queries, D_lm)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values: torch.Tensor,
        frame_mask: torch.Tensor,
        patch_rays: torch.Tensor,
        points: torch.Tensor,
        point_rays: torch.Tensor,
        point_mask: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> torch.Tensor:
        inputs = SimpleNamespace(
            pixel_values=pixel_values,
            frame_mask=frame_mask,
            patch_rays=patch_rays,
            points=points,
            point_rays=point_rays,
            point_mask=point_mask,
            question_ids=question_ids,
            question_mask=question_mask,
        )
        return self.model.get_prefix_embeds(inputs)


def encoder_args(inputs) -> tuple[torch.Tensor, ...]:
    """The encoder tensors of a ModelInputs, in ENCODER_INPUTS order."""
    return tuple(getattr(inputs, name) for name in ENCODER_INPUTS)


def _pad_dim1(t: torch.Tensor, n: int, value) -> torch.Tensor:
    if t.shape[1] > n:
        raise InputError(f"cannot pad a tensor of shape {tuple(t.shape)} down to {n} along dim 1.")
    if t.shape[1] == n:
        return t
    shape = list(t.shape)
    shape[1] = n - t.shape[1]
    return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], dim=1)


def pad_encoder_inputs(inputs, config):
    """Pad frames to config.num_frames, points to max(config.max_points, P) and question tokens to
    config.aligner_max_question_tokens, all masked, so the encoder always sees the same shapes.

    Returns a copy of `inputs` (same dataclass) with the encoder fields padded; prompt fields are untouched.
    """
    T = max(int(config.num_frames), inputs.pixel_values.shape[1])
    P = max(int(config.max_points), inputs.points.shape[1])
    Q = max(int(config.aligner_max_question_tokens), inputs.question_ids.shape[1])
    padded = {
        "pixel_values": _pad_dim1(inputs.pixel_values, T, 0.0),
        "frame_mask": _pad_dim1(inputs.frame_mask, T, False),
        "patch_rays": _pad_dim1(inputs.patch_rays, T, 0.0),
        "points": _pad_dim1(inputs.points, P, 0.0),
        "point_rays": _pad_dim1(inputs.point_rays, P, 0.0),
        "point_mask": _pad_dim1(inputs.point_mask, P, False),
        "question_ids": _pad_dim1(inputs.question_ids, Q, 0),
        "question_mask": _pad_dim1(inputs.question_mask, Q, False),
    }
    return dataclasses.replace(inputs, **padded)


def export_encoder(model: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export of the encoder stack for the shapes of `args` (strict=False: traces the Python as it runs)."""
    with torch.no_grad():
        return torch.export.export(EncoderStack(model).eval(), args, strict=False)


def export_onnx(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    opset: int = 18,
    program: torch.export.ExportedProgram | None = None,
) -> Path:
    """Write the encoder stack as ONNX (torch's dynamo exporter via torch.export; weights inside the file).

    `program`: an ExportedProgram of the same model and shapes from `export_encoder`, to skip exporting it again.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if program is None:
        program = export_encoder(model, args)
    with torch.no_grad():
        onnx_program = torch.onnx.export(
            program,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(ENCODER_INPUTS),
            output_names=["prefix_embeds"],
            external_data=False,
            verbose=False,
        )
    onnx_program.save(str(path))
    logger.info("wrote ONNX encoder stack %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def onnx_run(path: str | os.PathLike, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Run an exported encoder with onnxruntime on the CPU; returns the prefix as a torch tensor."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: a.detach().cpu().numpy() for name, a in zip(ENCODER_INPUTS, args, strict=True) if name in names}
    missing = sorted(set(names) - set(feeds))
    if missing:
        raise InputError(f"ONNX model {path} expects inputs {missing} that are not encoder inputs {ENCODER_INPUTS}.")
    (out,) = session.run(["prefix_embeds"], feeds)
    return torch.from_numpy(out)


def onnx_max_abs_error(path: str | os.PathLike, model: nn.Module, args: tuple[torch.Tensor, ...]) -> float:
    """max |onnxruntime(path) - eager encoder stack| over the prefix, for the same inputs."""
    with torch.no_grad():
        ref = EncoderStack(model).eval()(*args).float().cpu()
    return float((onnx_run(path, args).float() - ref).abs().max())


def main(argv: list[str] | None = None) -> int:
    """python -m stllm_core.engine.export --model <dir>|tiny-random --out encoder.onnx|encoder.pt2 [--check]

    Exports the encoder stack at the model's fixed shapes (num_frames, max_points, aligner_max_question_tokens) for a
    random example clip. `.onnx` -> ONNX (for onnxruntime or TensorRT's trtexec); `.pt2` -> torch.export.save.
    --check compares the export with eager on the example and fails above --tolerance.
    """
    import argparse

    from stllm_core.model import random_clip
    from stllm_core.reasoning.pipeline import AnswerPipeline

    ap = argparse.ArgumentParser(
        prog="python -m stllm_core.engine.export",
        description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="tiny-random", help="a saved model directory, or tiny-random")
    ap.add_argument("--out", required=True, help="output file: *.onnx or *.pt2")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--check", action="store_true", help="compare with eager (onnxruntime for .onnx)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max abs error accepted by --check")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.suffix not in (".onnx", ".pt2"):
        ap.error(f"--out must end in .onnx or .pt2, got {out.name!r}")

    pipe = AnswerPipeline.load(args.model, device="cpu", dtype=args.dtype)
    model, cfg = pipe.model, pipe.model.config
    clip = random_clip(cfg.num_frames, seed=0, num_points=min(int(cfg.max_points) * 4, 50_000))
    args_t = encoder_args(pad_encoder_inputs(pipe.processor("Where is the mug?", clip), cfg))
    program = export_encoder(model, args_t)
    if out.suffix == ".pt2":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(out))
    else:
        export_onnx(model, args_t, out, program=program)
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); inputs: "
        + ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(ENCODER_INPUTS, args_t, strict=True))
    )
    if args.check:
        with torch.no_grad():
            ref = EncoderStack(model).eval()(*args_t).float()
            if out.suffix == ".pt2":
                got = torch.export.load(str(out)).module()(*args_t).float()
            else:
                got = onnx_run(out, args_t).float()
        err = float((got - ref).abs().max())
        print(f"max abs error vs eager: {err:.2e} (tolerance {args.tolerance:.0e})")
        if not err <= args.tolerance:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
