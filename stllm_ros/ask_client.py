"""stllm-ask: call the AskSTLLM service from the command line (for machines without the `ros2` CLI).

    stllm-ask "Where did I put the mug?" [--window 10] [--max-new-tokens 64] [--service /stllm/ask] [--json]

Exit status: 0 answered, 1 refused (the reason is printed), 2 no service / no reply in time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import rclpy
from rclpy.executors import SingleThreadedExecutor

from stllm_ros.srv import AskSTLLM

SETTLE_SEC = 1.0


def _stamp(t) -> float:
    return t.sec + t.nanosec * 1e-9


def response_dict(res: AskSTLLM.Response) -> dict:
    return {
        "success": res.success,
        "answer": res.answer,
        "error": res.error,
        "clip_start": _stamp(res.clip_start),
        "clip_end": _stamp(res.clip_end),
        "num_frames": res.num_frames,
        "num_points": res.num_points,
        "encode_ms": round(res.encode_ms, 1),
        "prefill_ms": round(res.prefill_ms, 1),
        "decode_ms": round(res.decode_ms, 1),
        "num_tokens": res.num_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    user_args = rclpy.utilities.remove_ros_args(["stllm-ask", *argv])[1:]
    p = argparse.ArgumentParser(
        prog="stllm-ask", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("question")
    p.add_argument("--window", type=float, default=0.0, help="seconds of recent video (0 = the node's default)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="answer length cap (0 = the node's default)")
    p.add_argument("--service", default="/stllm/ask")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the service and the answer")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON")
    args = p.parse_args(user_args)
    if args.max_new_tokens < 0:
        p.error("--max-new-tokens must be >= 0")

    rclpy.init(args=["stllm-ask", *argv])
    node = rclpy.create_node("stllm_ask")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        client = node.create_client(AskSTLLM, args.service)
        deadline = time.monotonic() + args.timeout
        if not client.wait_for_service(timeout_sec=args.timeout):
            print(f"error: service {args.service} is not available (is the reasoner running?)", file=sys.stderr)
            return 2
        # The graph lists a service before the server's request reader has matched this new client's writer; a
        # request sent in that gap is lost. Let discovery settle (measured: needed under load with 16 clients).
        time.sleep(SETTLE_SEC)
        req = AskSTLLM.Request(question=args.question, window_sec=args.window, max_new_tokens=args.max_new_tokens)
        future = client.call_async(req)
        executor.spin_until_future_complete(future, timeout_sec=max(1.0, deadline - time.monotonic()))
        if not future.done():
            print(f"error: no reply from {args.service} within {args.timeout:.0f} s", file=sys.stderr)
            return 2
        res = future.result()
        if args.json:
            print(json.dumps(response_dict(res)))
        elif res.success:
            print(res.answer)
            print(
                f"[{res.num_frames} frames, {res.num_points} points, clip {_stamp(res.clip_start):.2f}-"
                f"{_stamp(res.clip_end):.2f} s | encode {res.encode_ms:.0f} ms, prefill {res.prefill_ms:.0f} ms, "
                f"decode {res.decode_ms:.0f} ms, {res.num_tokens} tokens]",
                file=sys.stderr,
            )
        else:
            print(f"refused: {res.error}", file=sys.stderr)
        return 0 if res.success else 1
    except KeyboardInterrupt:
        return 130
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
