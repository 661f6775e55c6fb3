"""stllm-run: start the stllm stack without the `launch` package (bare machines), from the same node list and the same
YAML parameters as launch/reasoning.launch.py.

    stllm-run [--params-file config/reasoner.yaml] [--param model:=tiny-random ...] [--remap FROM:=TO ...]
              [--bag BAG [--rate 1.0] [--loop]]

With --bag the demo/recorded bag is replayed into the graph by stllm-play with /clock, and the nodes use sim time, so
the reasoner's window is measured in the bag's time. Ctrl-C stops everything; if a node exits, the rest are stopped and
stllm-run exits with its status.

--remap FROM:=TO is passed as a ROS remap rule (`--ros-args -r FROM:=TO`) to every node of the stack (not to the bag
player, whose topics are the bag's; stllm-play --remap renames those), e.g. for realsense-ros 4.x:
    stllm-run -r camera/color/image_raw:=/camera/camera/color/image_raw \\
              -r camera/color/camera_info:=/camera/camera/color/camera_info
A rule matches a node's topic name exactly: with perception.image_transport compressed the colour topic is
<image_topic>/compressed, so remap that name (camera/color/image_raw/compressed:=...) or set perception.image_topic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

from stllm_ros.stack import LAUNCH_ARGUMENTS, NODES, REPLAY_PARAMS, default_params_file, player_arguments


def node_command(spec, params_file: str, params: list[str], namespace: str = "",
                 remaps: list[str] | None = None) -> list[str]:
    exe = shutil.which(spec.executable)
    cmd = [exe] if exe else [sys.executable, "-m", spec.module]
    cmd += ["--ros-args", "-r", f"__node:={spec.name}"]
    if namespace.strip("/"):
        cmd += ["-r", f"__ns:=/{namespace.strip('/')}"]
    for r in remaps or []:
        cmd += ["-r", r]
    cmd += ["--params-file", params_file]
    for p in params:
        cmd += ["-p", p]
    return cmd


def player_command(bag: str, rate: float, loop: bool) -> list[str]:
    exe = shutil.which("stllm-play")
    cmd = [exe] if exe else [sys.executable, "-m", "stllm_ros.bag_player"]
    return cmd + player_arguments(bag, rate, loop)


def parse_param(text: str) -> str:
    name, sep, value = text.partition(":=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name:=value, got {text!r}")
    name = LAUNCH_ARGUMENTS.get(name, (name,))[0]  # launch-argument aliases (image_topic -> perception.image_topic)
    return f"{name}:={value}"


def parse_remap(text: str) -> str:
    src, sep, dst = text.partition(":=")
    if not sep or not src or not dst or " " in text:
        raise argparse.ArgumentTypeError(f"expected a remap rule FROM:=TO, got {text!r}")
    if src.startswith("__"):  # __node / __ns are stllm-run's own (--namespace); a node-name remap would break it
        raise argparse.ArgumentTypeError(f"{src}:= is not a topic remap; use --namespace for the namespace")
    return f"{src}:={dst}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="stllm-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params-file", default=None, help="ROS 2 parameters YAML (default: config/reasoner.yaml)")
    p.add_argument("--namespace", default="", help="the robot's namespace (e.g. robot1): the node and its relative "
                   "names (stllm/ask, camera/color/image_raw, ...) go under it")
    p.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        type=parse_param,
        metavar="NAME:=VALUE",
        help="override one parameter (repeatable); launch-argument names are accepted too",
    )
    p.add_argument(
        "--remap",
        "-r",
        action="append",
        default=[],
        type=parse_remap,
        metavar="FROM:=TO",
        help="ROS remap rule for every node of the stack (repeatable), passed as --ros-args -r FROM:=TO; relative "
        "names resolve in the node's namespace (camera/color/image_raw:=/camera/camera/color/image_raw)",
    )
    p.add_argument("--bag", help="replay this rosbag2 bag (mcap or sqlite3) into the graph with /clock")
    p.add_argument("--rate", type=float, default=1.0, help="bag replay rate")
    p.add_argument("--loop", action="store_true", help="replay the bag in a loop")
    p.add_argument("--bag-delay", type=float, default=0.0, help="seconds to wait after the nodes are up before replay")
    args = p.parse_args(argv)
    params_file = args.params_file or str(default_params_file())
    if not os.path.exists(params_file):
        p.error(f"parameters file {params_file} does not exist")
    replay = [f"{k}:={str(v).lower() if isinstance(v, bool) else v}" for k, v in REPLAY_PARAMS.items()]  # -p later wins
    params = (replay if args.bag else []) + list(args.param)
    if args.bag and not os.path.exists(args.bag):
        p.error(f"bag {args.bag} does not exist")

    procs: list[subprocess.Popen] = []
    player: subprocess.Popen | None = None
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for spec in NODES:
            cmd = node_command(spec, params_file, params, args.namespace, args.remap)
            full = "/".join(x for x in ("", args.namespace.strip("/"), spec.name) if x)
            print(f"[stllm-run] starting /{full}: {' '.join(cmd)}", flush=True)
            procs.append(subprocess.Popen(cmd, start_new_session=True))
        if args.bag:
            time.sleep(args.bag_delay)
            player = subprocess.Popen(player_command(args.bag, args.rate, args.loop), start_new_session=True)
            print(f"[stllm-run] replaying {args.bag} at {args.rate}x", flush=True)
        while not stopping:
            for proc in procs:
                if proc.poll() is not None:
                    print(f"[stllm-run] {proc.args[0]} exited with {proc.returncode}; stopping", flush=True)
                    return proc.returncode or 1
            if player is not None and player.poll() is not None:
                print(f"[stllm-run] bag replay finished ({player.returncode}); nodes keep running", flush=True)
                player = None
            time.sleep(0.2)
        return 0
    finally:
        for proc in procs + ([player] if player is not None else []):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
