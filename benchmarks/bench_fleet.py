"""K robots asking at once: through one language-model server (llm_url) vs each with its own local model.

    stllm-serve --model stllm-smol --port 8000 &        # once; wait for "serving stllm-smol at ..."
    python benchmarks/bench_fleet.py --llm-url http://127.0.0.1:8000 --robots 1 2 4 8 --questions 4 \
        --out runs/bench_fleet.json

Each robot is its own process (as on a fleet: its own encoders; 1 torch thread each) with an AnswerPipeline of the
model; all start together after loading, then ask `--questions` REA-Sim questions one after another (greedy, the
same records in both modes). Reported per K and mode: answers/s over the wall time, p50/p95 latency per answer,
generated tokens/s, and that rate as a ratio to the single-stream decode floor measured in the same run (memory
copy bandwidth / bytes of the language model's weights: one weight read per token; a batching server can pass it).
On one machine the K local robots share its cores with each other, the server robots share them with the server:
the comparison is of the same hardware used two ways.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _clips(n: int, num_frames: int):
    """n REA-Sim questions: the smol set's validation split, or a small set generated once under runs/."""
    from stllm_core.data import read_rea_json, record_to_clip

    val = ROOT / "data" / "reasim-smol" / "val.json"
    if not val.is_file():
        val = ROOT / "runs" / "bench_fleet_reasim" / "val.json"
    recs = list(read_rea_json(val))[:n]
    return [(r.question, record_to_clip(r, num_frames=num_frames)) for r in recs]


def _ensure_records() -> None:
    from stllm_core.data.reasim.generate import generate_reasim

    out = ROOT / "runs" / "bench_fleet_reasim"
    if not (ROOT / "data" / "reasim-smol" / "val.json").is_file() and not (out / "val.json").is_file():
        generate_reasim(out, scenes=2, clips_per_scene=1, frames=12, size=(128, 96), questions_per_type=4, seed=7,
                        val_fraction=0.5, write_depth=False, workers=1, progress=False)


def robot(mode: str, url: str, model: str, n: int, barrier, out) -> None:
    import torch

    torch.set_num_threads(1)
    from stllm_core.reasoning.pipeline import AnswerPipeline

    pipe = AnswerPipeline.load(model, max_new_tokens=32, llm_url=url if mode == "server" else "")
    work = _clips(n, pipe.num_frames)
    pipe.answer(*work[0])  # warm (first-call allocations), not timed
    barrier.wait()
    rows = []
    for q, clip in work:
        t = time.perf_counter()
        ans = pipe.answer(q, clip)
        rows.append({"latency_ms": (time.perf_counter() - t) * 1e3, "tokens": ans.num_tokens,
                     "encode_ms": ans.encode_ms, "prefill_ms": ans.prefill_ms, "decode_ms": ans.decode_ms})
    out.put(rows)


def run(mode: str, k: int, args) -> dict:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(k + 1), ctx.Queue()
    procs = [ctx.Process(target=robot, args=(mode, args.llm_url, args.model, args.questions, barrier, out))
             for _ in range(k)]
    for p in procs:
        p.start()
    barrier.wait(timeout=900)
    t0 = time.perf_counter()
    rows = [r for _ in procs for r in out.get(timeout=1800)]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(60)
    lat = sorted(r["latency_ms"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return {"mode": mode, "robots": k, "answers": len(rows), "wall_s": round(wall, 2),
            "answers_per_s": round(len(rows) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "p50_ms": round(statistics.median(lat), 1),
            "p95_ms": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1),
            "mean_tokens": round(tokens / len(rows), 1),
            "mean_encode_ms": round(statistics.mean(r["encode_ms"] for r in rows), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm-url", required=True, help="a running stllm-serve / vLLM server for --model")
    ap.add_argument("--model", default="stllm-smol")
    ap.add_argument("--robots", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--questions", type=int, default=4, help="questions per robot")
    ap.add_argument("--out", default="runs/bench_fleet.json")
    args = ap.parse_args()
    import torch

    from benchmarks.bench_model import measure_bandwidth
    from stllm_core.model.loading import _resolve, read_config
    from stllm_core.reasoning.pipeline import resolve_embedded

    lm_dir = _resolve(read_config(resolve_embedded(args.model)).llm) if args.model == "stllm-smol" else None
    lm_bytes = sum(f.stat().st_size for f in lm_dir.glob("*.safetensors")) if lm_dir else 0
    _ensure_records()
    torch.set_num_threads(2)
    bw = measure_bandwidth(torch.device("cpu"), 256 << 20)
    floor = bw / lm_bytes if lm_bytes else 0.0
    results = []
    for k in args.robots:
        for mode in ("local", "server"):
            r = run(mode, k, args)
            r["vs_floor"] = round(r["tokens_per_s"] / floor, 3) if floor else None
            results.append(r)
            print(json.dumps(r), flush=True)
    report = {"machine": f"{platform.processor() or platform.machine()}, {mp.cpu_count()} cores",
              "copy_bandwidth_GBps": round(bw / 1e9, 2), "lm_bytes": lm_bytes,
              "decode_floor_tokens_per_s": round(floor, 1), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n| robots | mode | answers/s | p50 ms | p95 ms | tokens/s | x floor |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['robots']} | {r['mode']} | {r['answers_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
              f"{r['tokens_per_s']:.1f} | {r['vs_floor']} |")
    print(f"\n{report['machine']}; copy bandwidth {report['copy_bandwidth_GBps']} GB/s; single-stream decode floor "
          f"{report['decode_floor_tokens_per_s']} tokens/s ({lm_bytes / 1e6:.0f} MB of LM weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
