"""Soak test of the reasoning service (a script, not a CI test).

Replays a bag in a loop at 30 Hz (or the bag's own rate) into a running reasoner while asking a question every
`--every` seconds for `--minutes`, then reports answered / refused / failed counts, answer latency p50/p95 and the
reasoner's resident memory at start and end.

    python benchmarks/soak.py --bag log/demo/kitchen_demo --minutes 10 --every 2 --model tiny-random
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from stllm_ros.srv import AskSTLLM  # noqa: E402
from tests_support import NodeProcess, RosTestNode  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bag", required=True)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--every", type=float, default=2.0)
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--question", default="Where did I put the mug?")
    args = p.parse_args(argv)

    node_cmd = ["stllm_ros.reasoner_node", "--ros-args", "-p", f"model:={args.model}", "-p", "use_sim_time:=true",
                "-p", "perception.depth_topic:=/camera/depth/image_raw", "-p", "perception.points_topic:=/scene/points"]
    with NodeProcess.python(*node_cmd) as reasoner, RosTestNode("soak_client") as ros:
        reasoner.wait_for_output("stllm reasoner up", timeout=600)
        with NodeProcess.python("stllm_ros.bag_player", args.bag, "--loop", "--clock", "--rate", str(args.rate)):
            client = ros.node.create_client(AskSTLLM, "/stllm/ask")
            ros.wait_for_service(client)
            time.sleep(3.0)
            rss0 = rss_mb(reasoner.proc.pid)
            counts = {"answered": 0, "refused": 0, "failed": 0}
            reasons: dict[str, int] = {}
            latencies = []
            end = time.monotonic() + args.minutes * 60
            next_ask = time.monotonic()
            while time.monotonic() < end:
                time.sleep(max(0.0, next_ask - time.monotonic()))
                next_ask += args.every
                t0 = time.perf_counter()
                try:
                    res = ros.call(client, AskSTLLM.Request(question=args.question), timeout=120)
                except TimeoutError:
                    counts["failed"] += 1
                    continue
                if res.success:
                    counts["answered"] += 1
                    latencies.append((time.perf_counter() - t0) * 1e3)
                else:
                    counts["refused"] += 1
                    reasons[res.error[:80]] = reasons.get(res.error[:80], 0) + 1
                if reasoner.returncode is not None:
                    counts["failed"] += 1
                    break
            rss1 = rss_mb(reasoner.proc.pid) if reasoner.returncode is None else float("nan")
    lat = sorted(latencies)
    p50 = statistics.median(lat) if lat else float("nan")
    p95 = lat[int(0.95 * (len(lat) - 1))] if lat else float("nan")
    print(f"soak {args.minutes:g} min, a question every {args.every:g} s, model {args.model}, bag {args.bag}")
    print(f"answered {counts['answered']}, refused {counts['refused']}, failed {counts['failed']}")
    for reason, n in reasons.items():
        print(f"  refused x{n}: {reason}")
    print(f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms; reasoner RSS {rss0:.0f} MB at start, {rss1:.0f} MB at end")
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
