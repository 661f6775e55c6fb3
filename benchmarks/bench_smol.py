"""CPU latency of the shipped stllm-smol model, and the evaluation summary table of scripts/train_smol.sh.

Not a test: it prints figures.

    python benchmarks/bench_smol.py                       # latency (models/stllm-smol, CPU, eager)
    python benchmarks/bench_smol.py --threads 2 --questions 20 --clip-frames 32
    python benchmarks/bench_smol.py --summarize runs/stllm-smol/eval --write models/stllm-smol/eval.json

Latency: a REA-Sim kitchen episode is generated in a temporary directory (1 kitchen, `--clip-frames` frames of
320x240 px, its scene cloud as the map). The clip goes in with all its frames; the processor samples the model's
`num_frames` of them and voxelizes the map to at most `max_points`.
  1. one question with a forced 32-token answer (no stop token): encode (processor + vision/point encoders + aligner +
     prompt embedding), prefill (LM over the prompt, to the first token) and decode (31 more tokens), median of
     `--repeats` runs after one warm-up;
  2. service latency: `--questions` REA-Sim questions of the five types through `AnswerPipeline.answer` (the call the
     ROS reasoner service makes), greedy, stopping at end of turn: p50/p95 of the end-to-end wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("model", "no-video", "no-points", "no-position", "question-only")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), load average {load:.1f} at start"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(eval_dir: Path, write: Path | None) -> dict:
    """Per-type accuracy table from the stllm-eval results JSONs of scripts/train_smol.sh: the model, the question-only
    model and the rule baseline (from model.json) on the evaluation records, the stronger question-only baseline per
    type and the model's margin over it, with the standard error of each accuracy; then each ablation (no video, no
    points, no camera position) beside the model on the same records (an ablation may run on a subset)."""
    from training.evaluate import accuracy_by_type

    table: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}

    def add(name: str, acc: dict) -> None:
        table[name] = {k: v["accuracy"] for k, v in acc.items() if isinstance(v, dict)}
        table[name]["mean_per_type"] = acc["mean_per_type"]
        stderr[name] = {k: v.get("stderr", float("nan")) for k, v in acc.items() if isinstance(v, dict)}
        counts[name] = {k: v["correct"] + v["wrong"] + v["invalid"] for k, v in acc.items() if isinstance(v, dict)}

    path = eval_dir / "model.json"
    if not path.is_file():
        raise SystemExit(f"no stllm-eval results of the model (model.json) in {eval_dir}")
    model = json.loads(path.read_text())
    add("model", model["accuracy"])
    for name, b in (model.get("baselines") or {}).items():
        add(name, b["accuracy"])
    qo = eval_dir / "question-only.json"
    if qo.is_file():
        add("question-only", json.loads(qo.read_text())["accuracy"])
    types = [k for k in table["model"] if k not in ("overall", "mean_per_type")]
    baselines = [b for b in ("question-only", "rule") if b in table]
    if baselines:
        table["best baseline"] = {t: max(table[b][t] for b in baselines) for t in [*types, "overall"]}
        table["best baseline"]["mean_per_type"] = sum(table["best baseline"][t] for t in types) / len(types)
        table["margin"] = {t: table["model"][t] - table["best baseline"][t] for t in table["best baseline"]}
    by_id = {r["id"]: r for r in model["predictions"]}
    for variant in VARIANTS[1:]:
        path = eval_dir / f"{variant}.json"
        if variant == "question-only" or not path.is_file():
            continue
        res = json.loads(path.read_text())
        add(variant, res["accuracy"])
        same = [by_id[r["id"]] for r in res["predictions"] if r["id"] in by_id]
        if len(same) != len(by_id):  # the ablation ran on a subset: the model on exactly those records
            add(f"model@{variant}", accuracy_by_type(same))
        table[f"{variant} cost"] = {t: table[f"model@{variant}" if len(same) != len(by_id) else "model"][t]
                                    - table[variant][t] for t in table[variant]}
    rows = [*types, "overall", "mean_per_type"]
    print(f"{'accuracy %':22s}" + "".join(f"{v:>17s}" for v in table))
    for r in rows:
        cells = []
        for v in table:
            se = stderr.get(v, {}).get(r)
            n = counts.get(v, {}).get(r)
            cell = f"{table[v].get(r, float('nan')):6.1f}" + (f" +-{se:4.1f}" if se == se and se else "")
            cells.append(cell + (f" n{n}" if n else ""))
        print(f"{r:22s}" + "".join(f"{c:>17s}" for c in cells))
    out = {"accuracy_percent": table, "stderr_percent": stderr, "records": counts, "source": str(eval_dir)}
    if write is not None:
        write.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {write}")
    return out


def latency(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from stllm_core.data import ClipFolder, read_rea_json
    from stllm_core.data.reasim.generate import generate_reasim
    from stllm_core.engine import Engine, EngineConfig
    from stllm_core.reasoning.pipeline import AnswerPipeline

    print(f"machine: {machine()}; torch threads {args.threads}")
    t0 = time.perf_counter()
    pipe = AnswerPipeline.load(model=str(args.model), device="cpu", dtype="float32", backend="eager",
                               max_new_tokens=64)
    print(f"load: {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory(prefix="bench-smol-") as tmp:
        generate_reasim(tmp, scenes=2, clips_per_scene=1, frames=args.clip_frames, size=(320, 240),
                        questions_per_type=4, seed=args.seed, val_fraction=0.5, write_depth=False, workers=1,
                        progress=False)
        records = list(read_rea_json(Path(tmp) / "train.json")) + list(read_rea_json(Path(tmp) / "val.json"))
        # one question per type in turn, so the 20 questions cover the five types
        by_type: dict[str, list] = {}
        for rec in records:
            by_type.setdefault(rec.question_type, []).append(rec)
        ordered = [r for group in zip(*by_type.values(), strict=False) for r in group]
        first = records[0]
        clips = {}  # whole episodes (every frame), as the robot's frame window would hold them

        def episode(rec):
            key = str(rec.video_path.parent)
            if key not in clips:
                clips[key] = ClipFolder.read(key).clip()
            return clips[key]

        whole = full_clip = episode(first)
        print(f"clip: {len(whole.frames)} frames of {whole.frames[0].image.shape[1]}x{whole.frames[0].image.shape[0]}"
              f" px, map {len(whole.scene.points) if whole.scene is not None else 0} points; the model samples "
              f"{pipe.num_frames} frames and <= {pipe.model.config.max_points} voxels")

        # 1. forced 32-token answer
        lm_engine = pipe.engine
        pipe.engine = Engine(pipe.model.language_model, EngineConfig(max_new_tokens=32, stop_token_ids=()))
        runs = []
        for i in range(args.repeats + 1):
            ans = pipe.answer(first.question, full_clip, max_new_tokens=32)
            if i:
                runs.append(ans)
        pipe.engine = lm_engine
        enc = statistics.median(a.encode_ms for a in runs)
        pre = statistics.median(a.prefill_ms for a in runs)
        dec = statistics.median(a.decode_ms for a in runs)
        print(f"one question, {runs[0].num_tokens}-token answer, {runs[0].num_frames} frames, {runs[0].num_points} "
              f"voxels (median of {len(runs)}): encode {enc:.0f} ms, prefill {pre:.0f} ms, decode {dec:.0f} ms "
              f"({dec / max(runs[0].num_tokens - 1, 1):.1f} ms/token), total {enc + pre + dec:.0f} ms")

        # 2. service latency over N questions (real answers, stop at end of turn)
        walls, tokens = [], []
        for rec in (ordered * (args.questions // max(len(ordered), 1) + 1))[: args.questions]:
            clip = episode(rec)
            t = time.perf_counter()
            ans = pipe.answer(rec.question, clip)
            walls.append((time.perf_counter() - t) * 1e3)
            tokens.append(ans.num_tokens)
        p50, p95 = percentile(walls, 50), percentile(walls, 95)
        print(f"service: {len(walls)} questions through AnswerPipeline.answer: p50 {p50:.0f} ms, p95 {p95:.0f} ms, "
              f"max {max(walls):.0f} ms, mean answer {statistics.mean(tokens):.1f} tokens")
    return {"encode_ms": enc, "prefill_ms": pre, "decode_ms": dec, "service_p50_ms": p50, "service_p95_ms": p95,
            "machine": machine(), "threads": args.threads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "stllm-smol")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--clip-frames", type=int, default=32, help="frames of the REA-Sim episode (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the forced 32-token answer (median)")
    ap.add_argument("--questions", type=int, default=20, help="questions for the service p50/p95")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--summarize", type=Path,
                    help="directory of stllm-eval results (model, no-video, no-points, no-position, question-only)")
    ap.add_argument("--write", type=Path, help="with --summarize: write the table as JSON here")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.write)
    else:
        latency(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
