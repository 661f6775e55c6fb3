"""benchmarks/bench_model.py keeps working: floor arithmetic by hand, and one tiny run beside HF generate().

No timing is asserted; the run only has to complete and print every row (HF's generate() itself checks that the
video-token count the benchmark computes matches the features, so the HF prompt is the equivalent one).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_model  # noqa: E402


def test_decoder_bytes_per_token_by_hand():
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    lm = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in lm.parameters()) * 4
    kv = 2 * 2 * 2 * 4 * 10 * 4  # k+v, layers, kv heads, head_dim, positions, fp32 bytes
    assert bench_model.decoder_bytes_per_token(lm, 10) == total - 100 * 16 * 4 + kv  # untied: skip the input table
    tied = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "tie_word_embeddings": True}))
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert bench_model.decoder_bytes_per_token(tied, 10) == sum(p.numel() for p in tied.parameters()) * 4 + kv


def test_tiny_benchmark_runs_beside_hf_generate(capsys, tmp_path):
    torch.manual_seed(0)
    rc = bench_model.main(["--frames", "4", "--image-size", "64", "--points", "500", "--new-tokens", "4",
                           "--repeats", "1", "--compare-hf", "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0
    assert "stllm eager" in out and "HF LlavaOnevision generate()" in out and "floors" in out
    assert (tmp_path / "out.json").stat().st_size > 100
