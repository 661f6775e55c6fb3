"""Export of the encoder stack (tiny random model, CPU, fp32): torch.export exact, ONNX Runtime within 1e-4.

The program is exported once, by the CLI (`python -m stllm_core.engine.export`, tiny-random seed 0, its own example
clip); the tests then run it on OTHER clips of the same (padded) shapes against an eager model with the same weights.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from stllm_core.engine.export import (
    ENCODER_INPUTS,
    EncoderStack,
    encoder_args,
    export_onnx,
    main,
    onnx_max_abs_error,
    onnx_run,
    pad_encoder_inputs,
)
from stllm_core.model import build_tiny, random_clip


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(seed=0)  # the weights of the CLI's "tiny-random" (seed 0)
    inputs = processor("Where did I leave the mug?", random_clip(3, seed=1, num_points=120))
    return model.eval(), inputs, processor


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "encoder.pt2"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["--model", "tiny-random", "--out", str(out), "--check"])
    return rc, printed.getvalue(), out


def test_padding_to_fixed_shapes_keeps_the_prefix(tiny):
    model, inputs, processor = tiny
    padded = pad_encoder_inputs(inputs, model.config)
    shapes = {n: tuple(a.shape) for n, a in zip(ENCODER_INPUTS, encoder_args(padded))}
    cfg = model.config
    assert shapes["pixel_values"][1] == cfg.num_frames > inputs.pixel_values.shape[1]
    assert shapes["points"][1] == cfg.max_points > inputs.points.shape[1]
    assert shapes["question_ids"][1] == cfg.aligner_max_question_tokens
    assert int(padded.point_mask.sum()) == int(inputs.point_mask.sum())
    with torch.no_grad():
        ref = model.get_prefix_embeds(inputs)
        got = EncoderStack(model)(*encoder_args(padded))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # More points than max_points (not produced by the processor) are kept, never cut: the shape grows instead.
    assert pad_encoder_inputs(padded, cfg.replace(max_points=8)).points.shape[1] == cfg.max_points


def test_cli_torch_export_matches_eager_on_other_clips(tiny, exported):
    model, inputs, processor = tiny
    rc, printed, out = exported
    assert rc == 0, printed
    assert "points (1, 256, 6)" in printed
    assert float(re.search(r"max abs error vs eager: (\S+) ", printed).group(1)) <= 1e-6
    program = torch.export.load(str(out))
    assert isinstance(program, torch.export.ExportedProgram)
    for clip_inputs in (inputs, processor("Is the fridge left?", random_clip(4, 7))):
        args = encoder_args(pad_encoder_inputs(clip_inputs, model.config))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*args), EncoderStack(model)(*args), rtol=0, atol=1e-6)


def test_cli_refuses_unknown_output_format(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "encoder.bin")])
    assert "must end in .onnx or .pt2" in capsys.readouterr().err


def test_onnx_export_matches_eager_on_onnxruntime(tiny, exported, tmp_path):
    pytest.importorskip("onnxruntime")
    model, inputs, _ = tiny
    args = encoder_args(pad_encoder_inputs(inputs, model.config))
    program = torch.export.load(str(exported[2]))
    path = export_onnx(model, args, tmp_path / "encoder.onnx", program=program)
    assert path.is_file() and path.stat().st_size > 10_000
    err = onnx_max_abs_error(path, model, args)
    print(f"ONNX Runtime vs eager encoder stack, max abs error (fp32): {err:.2e}")
    assert err < 1e-4
    assert tuple(onnx_run(path, args).shape) == (1, model.config.num_queries, 32)
