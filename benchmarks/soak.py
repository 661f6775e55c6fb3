"""Soak test of the reasoning service (a script, not a CI test).

Replays a bag in a loop (with /clock, the reasoner on sim time) into a running reasoner while `--clients` clients each
ask a question every `--every` seconds for `--minutes`, then reports:
- answered / refused / failed, and the refusals by reason;
- refusals while posed frames existed: the reasoner says "no camera frames with a known pose yet" when its buffer is
  empty (before the first frame, after a bag loop's reset) and "... in the last N s" when it held frames but none in
  the window: the latter is the starvation the soak looks for; the share answered is counted over the questions asked
  while frames existed;
- latency p50/p95 from the client, with the reasoner's own compute (encode + prefill + decode) beside it, so queueing
  and stalls show as the difference;
- the reasoner's resident memory sampled every 10 s: at start, after `--warmup-min` minutes and at the end (growth
  after the warm-up is what must stay flat);
- perception's drop and bad-input counters at the end.

    python benchmarks/soak.py --bag log/demo/kitchen_demo --minutes 30 --every 2 --model stllm-smol [--clients 2]
        [--out soak.json] [--param perception.depth_topic:=...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402

from stllm_ros.srv import AskSTLLM  # noqa: E402
from tests_support import NodeProcess, RosTestNode  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[int(q * (len(xs) - 1))] if xs else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bag", required=True)
    p.add_argument("--model", default="stllm-smol")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--every", type=float, default=2.0, help="seconds between one client's questions")
    p.add_argument("--clients", type=int, default=1, help="clients asking concurrently (staggered)")
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--warmup-min", type=float, default=5.0, help="memory growth is measured after this")
    p.add_argument("--question", default="Where did I put the mug?")
    p.add_argument("--param", action="append", default=[], help="extra reasoner parameter name:=value")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    args = p.parse_args(argv)

    params = ["model:=" + args.model, "use_sim_time:=true", "perception.depth_topic:=/camera/depth/image_raw",
              "perception.points_topic:=/scene/points", "perception.sensor_qos:=reliable", *args.param]
    node_cmd = ["stllm_ros.reasoner_node", "--ros-args"] + [x for p_ in params for x in ("-p", p_)]
    with NodeProcess.python(*node_cmd) as reasoner, RosTestNode("soak_client") as ros:
        reasoner.wait_for_output("stllm reasoner up", timeout=600)
        diag: dict[str, dict[str, str]] = {}
        lock = threading.Lock()

        def on_diag(msg: DiagnosticArray) -> None:
            with lock:
                for st in msg.status:
                    diag[st.name] = {kv.key: kv.value for kv in st.values} | {"_message": st.message}

        ros.node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
        with NodeProcess.python("stllm_ros.bag_player", args.bag, "--loop", "--clock", "--rate", str(args.rate),
                                "--reliable"):
            client = ros.node.create_client(AskSTLLM, "stllm/ask")
            ros.wait_for_service(client)
            time.sleep(3.0)
            t_start = time.monotonic()
            end = t_start + args.minutes * 60
            rss: list[tuple[float, float]] = []
            records: list[dict] = []
            stop = threading.Event()

            def perception_state() -> tuple[int, int]:
                """(frames held, resets so far) from perception's latest diagnostics; (-1, -1) before any."""
                with lock:
                    for name, values in diag.items():
                        if "perception" in name:
                            return int(values.get("frames_held", 0)), int(values.get("count.resets", 0))
                return -1, -1

            def ask_loop(k: int) -> None:
                next_ask = time.monotonic() + k * args.every / args.clients
                while time.monotonic() < end and not stop.is_set():
                    time.sleep(max(0.0, next_ask - time.monotonic()))
                    next_ask += args.every
                    held, _ = perception_state()
                    t0 = time.perf_counter()
                    rec = {"client": k, "t": time.monotonic() - t_start, "frames_held": held}
                    try:
                        res = ros.call(client, AskSTLLM.Request(question=args.question), timeout=120)
                    except TimeoutError:
                        rec["status"] = "failed"
                    else:
                        rec.update(status="answered" if res.success else "refused", error=res.error[:90],
                                   latency_ms=(time.perf_counter() - t0) * 1e3, num_tokens=int(res.num_tokens),
                                   compute_ms=float(res.encode_ms + res.prefill_ms + res.decode_ms))
                    with lock:
                        records.append(rec)
                    if reasoner.returncode is not None:
                        stop.set()

            threads = [threading.Thread(target=ask_loop, args=(k,), daemon=True) for k in range(args.clients)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                if reasoner.returncode is None:
                    rss.append((time.monotonic() - t_start, rss_mb(reasoner.proc.pid)))
                for t in threads:
                    t.join(timeout=10.0 / len(threads))
            with lock:
                final_diag = json.loads(json.dumps(diag))
            crashed = reasoner.returncode is not None

    answered = [r for r in records if r["status"] == "answered"]
    refused = [r for r in records if r["status"] == "refused"]
    reasons: dict[str, int] = {}
    for r in refused:
        reasons[r["error"]] = reasons.get(r["error"], 0) + 1
    # "no camera frames with a known pose yet" = the buffer was empty (before the first frame, or after a bag loop's
    # reset); "... in the last N s" = frames were held but none in the window: that is starvation
    starved = [r for r in refused if r["error"].startswith("no camera frames with a known pose in the last")]
    empty = [r for r in refused if r["error"].startswith("no camera frames with a known pose yet")]
    lat = [r["latency_ms"] for r in answered]
    comp = [r["compute_ms"] for r in answered]
    after = [m for t, m in rss if t >= args.warmup_min * 60]
    rss0, rss_w, rss1 = (rss[0][1] if rss else float("nan")), (after[0] if after else float("nan")), (
        rss[-1][1] if rss else float("nan"))
    out = {
        "minutes": args.minutes, "every_sec": args.every, "clients": args.clients, "model": args.model, "bag": args.bag,
        "answered": len(answered), "refused": len(refused), "failed": sum(r["status"] == "failed" for r in records),
        "crashed": crashed, "refusals": reasons, "refused_with_frames_held": len(starved),
        "refused_with_an_empty_buffer": len(empty),
        "answered_pct_when_frames_existed": 100.0 * len(answered) / max(1, len(records) - len(empty)),
        "latency_p50_ms": statistics.median(lat) if lat else None, "latency_p95_ms": percentile(lat, 0.95),
        "compute_p50_ms": statistics.median(comp) if comp else None, "compute_p95_ms": percentile(comp, 0.95),
        "tokens_p50": statistics.median([r["num_tokens"] for r in answered]) if answered else None,
        "rss_mb": {"start": rss0, f"after_{args.warmup_min:g}_min": rss_w, "end": rss1},
        "rss_growth_after_warmup_pct": 100.0 * (rss1 - rss_w) / rss_w if after else None,
        "rss_samples": [(round(t, 1), round(m, 1)) for t, m in rss],
        "diagnostics": final_diag,
    }
    print(f"soak {args.minutes:g} min, {args.clients} client(s) each asking every {args.every:g} s, model "
          f"{args.model}, bag {args.bag}")
    print(f"answered {out['answered']}, refused {out['refused']} ({len(empty)} with an empty frame buffer, "
          f"{len(starved)} while perception held frames), failed {out['failed']}, crashed {crashed}; answered "
          f"{out['answered_pct_when_frames_existed']:.1f} % of the questions asked while frames existed")
    for reason, n in reasons.items():
        print(f"  refused x{n}: {reason}")
    print(f"latency p50 {out['latency_p50_ms'] or float('nan'):.0f} ms, p95 {out['latency_p95_ms']:.0f} ms; "
          f"reasoner compute p50 {out['compute_p50_ms'] or float('nan'):.0f} ms, p95 {out['compute_p95_ms']:.0f} ms; "
          f"tokens p50 {out['tokens_p50']}")
    print(f"reasoner RSS {rss0:.0f} MB at start, {rss_w:.0f} MB after {args.warmup_min:g} min, {rss1:.0f} MB at end "
          f"({out['rss_growth_after_warmup_pct'] if after else float('nan'):+.1f} % after the warm-up)")
    for name, values in final_diag.items():
        keep = {k: v for k, v in values.items() if k.startswith(("dropped", "bad", "count.images", "count.frames",
                                                                  "frames_held", "queue", "_message"))}
        print(f"  {name}: {keep}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0 if out["failed"] == 0 and not crashed else 1


if __name__ == "__main__":
    sys.exit(main())
