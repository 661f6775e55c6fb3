"""Merge bench_model.py JSON files (one per dtype / run of benchmarks/gpu_suite.sh) into one JSON and a markdown table.

    python benchmarks/suite_report.py runs/gpu_suite/model_*.json --json runs/gpu_suite/suite.json \
        --markdown runs/gpu_suite/suite.md

Each row is one implementation in one run, beside the floors measured in that same run (copy bandwidth, matmul
rate): decode as % of the bandwidth floor, time to first token (encode + prefill) as a multiple of its floor, and the
end-to-end model time as a speed-up over HF generate() of the same run when it was measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows_of(run: dict) -> list[dict]:
    hf = next((r for r in run["rows"] if not r["impl"].startswith("stllm")), None)
    out = []
    for r in run["rows"]:
        f = run["floors"][r["impl"]]
        ttft = (r["encode_ms"] or 0.0) + r["prefill_ms"]
        ttft_floor = (f["encode_ms"] or 0.0) + f["prefill_ms"]
        out.append({
            "device": run["device"], "dtype": run["dtype"], "model": run["model"], "impl": r["impl"],
            "prompt_positions": r["prompt_positions"],
            "decode_tok_s": r["decode_tok_s"], "decode_floor_tok_s": f["decode_tok_s"],
            "decode_pct_of_floor": 100.0 * r["decode_tok_s"] / f["decode_tok_s"],
            "ttft_ms": ttft, "ttft_floor_ms": ttft_floor, "ttft_x_floor": ttft / ttft_floor,
            "e2e_ms": r["e2e_ms"], "e2e_x_floor": r["e2e_ms"] / f["e2e_ms"],
            "speedup_vs_hf": (hf["e2e_ms"] / r["e2e_ms"]) if hf is not None and r is not hf else None,
            "peak_mem_mb": r["peak_mem_mb"], "warmup_s": r["warmup_s"],
            "bandwidth_gb_s": run["bandwidth_gb_s"], "matmul_tflop_s": run["matmul_tflop_s"],
        })
    return out


def markdown(rows: list[dict]) -> str:
    head = ("| device | dtype | implementation | decode tok/s (% of floor) | TTFT ms (x floor) | end-to-end ms "
            "(x floor) | vs HF generate() | peak MiB | warm-up s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        vs = "-" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}x"
        lines.append(
            f"| {r['device']} | {r['dtype']} | {r['impl']} "
            f"| {r['decode_tok_s']:.1f} ({r['decode_pct_of_floor']:.0f} %) "
            f"| {r['ttft_ms']:.1f} ({r['ttft_x_floor']:.1f}x) | {r['e2e_ms']:.0f} ({r['e2e_x_floor']:.1f}x) | {vs} "
            f"| {r['peak_mem_mb']:.0f} | {r['warmup_s']:.1f} |")
    floors = sorted({(r["device"], r["dtype"], r["bandwidth_gb_s"], r["matmul_tflop_s"]) for r in rows})
    lines.append("")
    for device, dtype, bw, mm in floors:
        lines.append(f"Floors measured in the run on {device} ({dtype}): copy bandwidth {bw:.1f} GB/s, matmul "
                     f"{mm:.3f} TFLOP/s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="bench_model.py --json files")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    rows = [row for path in args.runs for row in rows_of(json.loads(Path(path).read_text()))]
    table = markdown(rows)
    print(table, end="")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
