"""stllm-ask: ask the reasoner from the command line (for machines without the `ros2` CLI).

    stllm-ask "Where did I put the mug?" [--window 10] [--max-new-tokens 64] [--service /stllm/ask] [--json]
    stllm-ask --stream "Where did I put the mug?" [--action /stllm/ask] [--temperature T] [--top-p P]

--stream uses the AskSTLLM action: the answer is printed as it is generated, and Ctrl-C cancels the goal (the answer
so far is kept). Without it, the AskSTLLM service is called and the answer printed when complete.
Exit status: 0 answered, 1 refused or rejected (the reason is printed), 2 no service / no reply in time,
130 cancelled with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions

from stllm_ros.srv import AskSTLLM

SETTLE_SEC = 1.0


def _stamp(t) -> float:
    return t.sec + t.nanosec * 1e-9


def response_dict(res: AskSTLLM.Response) -> dict:
    return {
        "success": res.success,
        "answer": res.answer,
        "error": res.error,
        "request_id": res.request_id,
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
    p.add_argument("--service", default="stllm/ask", help="the AskSTLLM service (relative: in --ros-args -r "
                   "__ns:=/robot1, as the node's)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the service and the answer")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated (the action); Ctrl-C "
                   "cancels it")
    p.add_argument("--action", default="stllm/ask", help="the AskSTLLM action (with --stream)")
    p.add_argument("--temperature", type=float, default=-1.0, help="with --stream: this answer's sampling "
                   "temperature (< 0 = the node's default, 0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.0, help="with --stream: nucleus mass (0 = the node's default)")
    args = p.parse_args(user_args)
    if args.max_new_tokens < 0:
        p.error("--max-new-tokens must be >= 0")
    # --stream: no rclpy SIGINT handler; it would shut the context down at Ctrl-C, and the cancel could not be sent
    options = {"signal_handler_options": SignalHandlerOptions.NO} if args.stream else {}
    rclpy.init(args=["stllm-ask", *argv], **options)
    node = rclpy.create_node("stllm_ask")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        return (stream if args.stream else call)(args, node, executor)
    except KeyboardInterrupt:
        return 130
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


def call(args, node, executor) -> int:
    """The service client: the answer printed when it is complete."""
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
    if res.success and not args.json:
        print(res.answer)
    _print_result(res, args.json)
    if not res.success and not args.json:
        print(f"refused: {res.error}", file=sys.stderr)
    return 0 if res.success else 1


def _print_result(res, as_json: bool) -> None:
    if as_json:
        print(json.dumps(response_dict(res)))
    elif res.success:
        print(
            f"[{res.num_frames} frames, {res.num_points} points, clip {_stamp(res.clip_start):.2f}-"
            f"{_stamp(res.clip_end):.2f} s | encode {res.encode_ms:.0f} ms, prefill {res.prefill_ms:.0f} ms, "
            f"decode {res.decode_ms:.0f} ms, {res.num_tokens} tokens]",
            file=sys.stderr,
        )


def stream(args, node, executor) -> int:
    """The action client: feedback printed as it arrives; Ctrl-C cancels the goal and waits for its result."""
    from action_msgs.msg import GoalStatus
    from rclpy.action import ActionClient

    from stllm_ros.action import AskSTLLM as AskAction

    shown = [""]

    def on_feedback(msg) -> None:
        text = msg.feedback.partial_answer
        if not args.json and text.startswith(shown[0]) and len(text) > len(shown[0]):
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    client = ActionClient(node, AskAction, args.action)
    deadline = time.monotonic() + args.timeout
    if not client.wait_for_server(timeout_sec=args.timeout):
        print(f"error: action {args.action} is not available (is the reasoner running?)", file=sys.stderr)
        return 2
    time.sleep(SETTLE_SEC)  # as for the service: let the server's readers match this client's writers
    goal = AskAction.Goal(question=args.question, window_sec=args.window, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p)
    sent = client.send_goal_async(goal, feedback_callback=on_feedback)
    executor.spin_until_future_complete(sent, timeout_sec=max(1.0, deadline - time.monotonic()))
    if not sent.done():
        print(f"error: no reply from {args.action} within {args.timeout:.0f} s", file=sys.stderr)
        return 2
    goal_handle = sent.result()
    if not goal_handle.accepted:
        print("rejected: the reasoner did not accept the question (busy: its queue is full, or not active; "
              "see its log or /diagnostics)", file=sys.stderr)
        return 1
    result = goal_handle.get_result_async()
    cancelled = False
    try:
        executor.spin_until_future_complete(result, timeout_sec=max(1.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        cancelled = True
        executor.spin_until_future_complete(goal_handle.cancel_goal_async(), timeout_sec=10)
        executor.spin_until_future_complete(result, timeout_sec=30)
    if not result.done():
        print(f"error: no result from {args.action} within {args.timeout:.0f} s", file=sys.stderr)
        return 2
    res, status = result.result().result, result.result().status
    if not args.json:
        rest = res.answer[len(shown[0]):] if res.answer.startswith(shown[0]) else "\n" + res.answer
        print(rest)
    _print_result(res, args.json)
    if status == GoalStatus.STATUS_CANCELED:
        print(f"cancelled after {res.num_tokens} tokens", file=sys.stderr)
        return 130
    if not res.success:
        print(f"refused: {res.error}", file=sys.stderr)
        return 1
    return 130 if cancelled else 0


if __name__ == "__main__":
    sys.exit(main())
