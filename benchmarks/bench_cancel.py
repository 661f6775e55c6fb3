"""Cancellation latency of the answer path: from a cancel request to the answer returned, against one decode step.

Not a test: it prints figures (JSON on the last line).

    python benchmarks/bench_cancel.py                          # tiny-random and stllm-smol (when its LM is here)
    python benchmarks/bench_cancel.py --models tiny-random --trials 50 --threads 2

For each trial a question is submitted through `Reasoner.submit` (the call the ROS service and action make) with
sampling at temperature 1 and a 512-token budget; once `--after` tokens have streamed, another thread waits a random
time in [0, 2 decode steps) and calls `Request.cancel()` (as a ROS cancel request arrives, at any point of a step);
the time from that call until `Request.wait()` returns the CANCELED result is taken. The
floor is the median time of one decode step measured in the same run (the engine checks the cancel flag before every
step, so the latency should be at most about one step). Trials whose answer ended before the cancel are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()}, {os.cpu_count()} cores ({platform.processor() or '?'}), load {load:.1f} at start"


def bench(model: str, trials: int, after: int) -> dict:
    from stllm_core.model.tiny import random_clip
    from stllm_core.reasoning.config import ReasonerConfig
    from stllm_core.reasoning.pipeline import AnswerPipeline
    from stllm_core.reasoning.reasoner import Reasoner

    pipe = AnswerPipeline.load(model)
    clip = random_clip(int(pipe.num_frames), seed=0)
    reasoner = Reasoner(ReasonerConfig(model=model, max_new_tokens=512), pipe, lambda w, n, s: clip)
    latencies, steps, ended = [], [], 0
    rng = random.Random(0)
    for i in range(trials):
        stamps, cancel_t, reached = [], [], threading.Event()

        def on_text(text: str, n: int, stamps=stamps, reached=reached) -> None:
            stamps.append((n, time.perf_counter()))
            if n >= after:
                reached.set()

        req = reasoner.submit(f"Describe the kitchen in detail, take {i}.", on_text=on_text, temperature=1.0)

        def canceller(req=req, reached=reached, cancel_t=cancel_t) -> None:
            if reached.wait(60):
                time.sleep(rng.uniform(0.0, 2.0 * (statistics.median(steps) if steps else 0.002)))
                cancel_t.append(time.perf_counter())
                req.cancel()

        thread = threading.Thread(target=canceller)
        thread.start()
        res = req.wait()
        done = time.perf_counter()
        reached.set()
        thread.join()
        if len(stamps) >= 2:
            (n0, t0), (n1, t1) = stamps[0], stamps[-1]
            if n1 > n0:
                steps.append((t1 - t0) / (n1 - n0))
        if res.status != "cancelled" or not cancel_t:
            ended += 1
            continue
        latencies.append((done - cancel_t[0]) * 1e3)
    reasoner.close()
    step = statistics.median(steps) * 1e3 if steps else float("nan")
    out = {"model": model, "trials": trials, "cancelled": len(latencies), "ended_before_cancel": ended,
           "decode_step_ms_median": round(step, 2)}
    if latencies:
        med = statistics.median(latencies)
        out.update(cancel_to_result_ms_median=round(med, 2), cancel_to_result_ms_max=round(max(latencies), 2),
                   median_in_decode_steps=round(med / step, 2) if step == step else None)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-random,stllm-smol")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--after", type=int, default=4, help="tokens streamed before the cancel")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = {"machine": machine(), "threads": args.threads, "results": []}
    for model in args.models.split(","):
        try:
            rows["results"].append(bench(model, args.trials, args.after))
        except Exception as e:  # e.g. stllm-smol without its LM wheel: say so, go on
            rows["results"].append({"model": model, "skipped": f"{type(e).__name__}: {e}"})
        print(rows["results"][-1], flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
