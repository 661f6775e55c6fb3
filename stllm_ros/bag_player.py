"""stllm-play: publish a rosbag2 bag into the ROS graph (for machines without `ros2 bag`).

    stllm-play BAG [--rate 1.0] [--remap /old:=/new ...] [--topics /a /b] [--clock] [--loop] [--start-offset SEC]
               [--wait-for-subscribers SEC] [--any-subscriber] [--delay SEC] [--info]

Reads any rosbag2 bag (MCAP or SQLite3, including bags recorded by rosbag2) with `stllm_core.data.bags` and publishes
each message's stored CDR bytes unchanged on a publisher of the recorded type, at its log time scaled by 1/rate
(subscribers see the same bytes, zero-padded by DDS to a multiple of 4).

- Types: resolved by importing ``pkg.msg`` (``pkg.srv`` for service events). A type that is not importable is skipped:
  one warning per type and a count in the final summary.
- QoS, as ``ros2 bag play``: each topic is offered with its recorded QoS (reliability, durability, history depth; a
  topic recorded without a profile: reliable, depth 100). Topics in ``--latched`` (default /tf_static and
  /scene/points) are transient local as well. ``--qos-profile-overrides-path FILE`` overrides per topic with rosbag2's
  YAML (``/topic: {reliability: reliable|best_effort, durability: volatile|transient_local, history: keep_last,
  depth: N}``); ``--reliable`` offers every topic reliable, depth 100 (lossless into reliable subscribers; stllm-run
  uses it). Latched messages before ``--start-offset`` are still published at the start (they describe state, e.g.
  static transforms), other earlier messages are not.
- Timing: message i is due at wall time t0 + (stamp_i - start) / rate on a monotonic clock, so delays do not add up.
- ``--clock``: publishes rosgraph_msgs/Clock on /clock (best effort, depth 1, as rosbag2) with the bag time at
  ``--clock-hz`` and before every message; nodes with ``use_sim_time`` follow the bag. A /clock recorded in the bag
  is then not played (one clock in the graph).
- ``--wait-for-subscribers SEC``: before playing, wait up to SEC for every played topic to have a subscriber
  (with ``--any-subscriber``: for one of them, e.g. a node that subscribes to its inputs all at once when configured).
- Exits 0 at the end of the bag (after waiting for reliable subscribers to acknowledge), 0 on Ctrl-C, 2 on a bad bag.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from stllm_core.config import check
from stllm_core.data.bags import LATCHED_TOPICS, BagInfo, BagReader
from stllm_core.errors import STLLMError


@dataclass
class PlayerConfig:
    bag: str
    rate: float = 1.0
    remap: dict[str, str] = field(default_factory=dict)  # bag topic -> published topic
    topics: tuple[str, ...] = ()  # play only these bag topics (all when empty)
    clock: bool = False
    clock_hz: float = 40.0
    loop: bool = False
    start_offset: float = 0.0  # seconds into the bag
    wait_for_subscribers: float = 0.0  # seconds; 0 = do not wait
    any_subscriber: bool = False  # wait for one played topic to have a subscriber instead of all
    delay: float = 0.0  # seconds to sleep before playing (after waiting for subscribers), as `ros2 bag play --delay`
    latched: tuple[str, ...] = LATCHED_TOPICS
    reliable: bool = False  # offer every topic reliable, depth 100 (instead of the recorded QoS)
    qos_overrides: dict[str, dict] = field(default_factory=dict)  # bag topic -> rosbag2 QoS override
    ack_timeout: float = 10.0  # seconds to wait at the end for reliable subscribers to acknowledge

    def __post_init__(self) -> None:
        check(self.rate > 0 and self.rate < 1e6, "rate", self.rate, "a positive playback rate (1.0 = real time)")
        check(self.clock_hz > 0, "clock_hz", self.clock_hz, "a positive frequency in Hz")
        check(self.start_offset >= 0, "start_offset", self.start_offset, "seconds >= 0")
        check(self.wait_for_subscribers >= 0, "wait_for_subscribers", self.wait_for_subscribers, "seconds >= 0")
        check(self.delay >= 0, "delay", self.delay, "seconds >= 0")
        check(self.ack_timeout >= 0, "ack_timeout", self.ack_timeout, "seconds >= 0")
        for old, new in self.remap.items():
            check(old.startswith("/") and new.startswith("/"), "remap", f"{old}:={new}",
                  "absolute topic names, /old:=/new")


QOS_KEYS = {"reliability": ("reliable", "best_effort", "system_default"),
            "durability": ("volatile", "transient_local", "system_default"),
            "history": ("keep_last", "keep_all", "system_default")}


def load_qos_overrides(path: str) -> dict[str, dict]:
    """rosbag2's --qos-profile-overrides-path YAML: {topic: {reliability, durability, history, depth}} (other keys
    of rosbag2's profile, e.g. deadline, are refused by name rather than silently ignored)."""
    import yaml

    try:
        data = yaml.safe_load(open(path, encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise STLLMError(f"--qos-profile-overrides-path {path}: {e}") from None
    if not isinstance(data, dict):
        raise STLLMError(f"--qos-profile-overrides-path {path}: expected a mapping of topic -> QoS, "
                         f"got {type(data).__name__}")
    for topic, prof in data.items():
        if not isinstance(prof, dict):
            raise STLLMError(f"{path}: the QoS of {topic!r} must be a mapping, got {prof!r}")
        for key, value in prof.items():
            if key == "depth":
                if not (isinstance(value, int) and value >= 0):
                    raise STLLMError(f"{path}: {topic} depth must be an integer >= 0, got {value!r}")
            elif key in QOS_KEYS:
                if str(value).lower() not in QOS_KEYS[key]:
                    raise STLLMError(f"{path}: {topic} {key} {value!r}; expected one of {', '.join(QOS_KEYS[key])}")
            else:
                raise STLLMError(f"{path}: {topic}: unsupported QoS key {key!r} (supported: depth, "
                                 f"{', '.join(QOS_KEYS)})")
    return data


def topic_qos(topic, config: PlayerConfig):
    """The QoSProfile stllm-play offers on a bag topic (TopicInfo): recorded, --latched, --reliable, overrides."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    latched = topic.latched or topic.name in config.latched
    reliable = topic.reliable or config.reliable
    depth = 100 if config.reliable or not topic.depth else topic.depth
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                     reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
    enums = {"reliability": ReliabilityPolicy, "durability": DurabilityPolicy, "history": HistoryPolicy}
    for key, value in config.qos_overrides.get(topic.name, {}).items():
        if key == "depth":
            qos.depth = int(value)
        else:
            setattr(qos, key, enums[key][str(value).upper()])
    return qos


def parse_remap(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        old, sep, new = item.partition(":=")
        if not sep or not old or not new:
            raise argparse.ArgumentTypeError(f"--remap {item!r}: expected /old:=/new")
        out[old] = new
    return out


def message_class(msgtype: str):
    """'sensor_msgs/msg/Image' -> the rclpy message class; raises ImportError/AttributeError if not available."""
    parts = msgtype.split("/")
    if len(parts) == 2:  # ROS 1 style 'pkg/Type'
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3:
        raise ImportError(f"not a ROS 2 type name: {msgtype!r}")
    pkg, kind, name = parts
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


@dataclass
class PlayStats:
    published: Counter = field(default_factory=Counter)  # published topic -> messages
    skipped: Counter = field(default_factory=Counter)  # msgtype -> messages not published (type not importable)
    loops: int = 0
    wall_sec: float = 0.0


class BagPlayer:
    """Publishes a bag through `node` (an rclpy Node); `play(stop)` runs in the calling thread until the end or stop."""

    def __init__(self, node, config: PlayerConfig, reader: BagReader | None = None):
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        self.node = node
        self.config = config
        self.reader = reader or BagReader(config.bag)
        self.info: BagInfo = self.reader.info
        self.log = node.get_logger()
        known = {t.name for t in self.info.topics}
        unknown = [t for t in config.topics if t not in known]
        if unknown:
            raise STLLMError(f"--topics {unknown} not in bag {config.bag}; it has {sorted(known)}.")
        unknown = [t for t in config.remap if t not in known]
        if unknown:
            raise STLLMError(f"--remap of {unknown}: not in bag {config.bag}; it has {sorted(known)}.")
        unknown = [t for t in config.qos_overrides if t not in known]
        if unknown:
            raise STLLMError(f"QoS overrides of {unknown}: not in bag {config.bag}; it has {sorted(known)}.")
        self.publishers = {}  # bag topic -> publisher
        self.latched: set[str] = set()  # bag topics published transient-local
        self.unavailable: dict[str, str] = {}  # bag topic -> msgtype
        for t in self.info.topics:
            if config.topics and t.name not in config.topics:
                continue
            if config.clock and config.remap.get(t.name, t.name) == "/clock":
                self.log.info(f"{t.name}: the bag's recorded clock is not played (--clock publishes the bag time)")
                continue
            try:
                cls = message_class(t.msgtype)
            except (ImportError, AttributeError) as e:
                self.unavailable[t.name] = t.msgtype
                self.log.warning(f"type {t.msgtype} of {t.name} is not importable ({e}); its {t.count} message(s) "
                                 f"will be skipped")
                continue
            qos = topic_qos(t, config)
            if qos.durability == DurabilityPolicy.TRANSIENT_LOCAL:
                self.latched.add(t.name)
            self.publishers[t.name] = node.create_publisher(cls, config.remap.get(t.name, t.name), qos)
        self.stats = PlayStats()
        self.clock_pub = None
        self._last_clock_ns = 0
        if config.clock:
            from rosgraph_msgs.msg import Clock

            self.clock_pub = node.create_publisher(
                Clock, "/clock", QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))

    def wait_for_subscribers(self, timeout: float, stop: threading.Event) -> bool:
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            missing = [p.topic_name for p in self.publishers.values() if p.get_subscription_count() == 0]
            if not missing or (self.config.any_subscriber and len(missing) < len(self.publishers)):
                return True
            if time.monotonic() >= deadline:
                self.log.warning(f"no subscriber after {timeout:.1f} s on {missing}; playing anyway")
                return False
            stop.wait(0.05)
        return False

    def _publish_clock(self, bag_ns: int) -> None:
        from rosgraph_msgs.msg import Clock

        bag_ns = max(int(bag_ns), self._last_clock_ns)  # never backwards (float rounding of the wall-time tick)
        self._last_clock_ns = bag_ns
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = divmod(bag_ns, 10**9)
        self.clock_pub.publish(msg)

    def play(self, stop: threading.Event | None = None) -> PlayStats:
        stop = stop or threading.Event()
        cfg = self.config
        stats = self.stats = PlayStats()  # updated live: other threads may read it while playing
        t_start = time.monotonic()
        start_ns = self.info.start_ns + int(round(cfg.start_offset * 1e9))
        clock_period = 1.0 / cfg.clock_hz
        while not stop.is_set():
            t0 = time.monotonic()
            last_clock = -1.0
            self._last_clock_ns = 0  # a new pass starts the bag time again
            for m in self.reader.messages(self.publishers.keys() | self.unavailable.keys()):
                if stop.is_set():
                    break
                if m.topic not in self.publishers:
                    stats.skipped[m.msgtype] += 1
                    continue
                if m.stamp_ns < start_ns and m.topic not in self.latched:
                    continue
                due = t0 + max(m.stamp_ns - start_ns, 0) * 1e-9 / cfg.rate
                while True:  # sleep until due, ticking /clock
                    now = time.monotonic()
                    if self.clock_pub is not None and now - last_clock >= clock_period:
                        self._publish_clock(start_ns + int(max(min(now, due) - t0, 0) * cfg.rate * 1e9))
                        last_clock = now
                    if now >= due or stop.is_set():
                        break
                    wait = due - now
                    if self.clock_pub is not None:
                        wait = min(wait, max(last_clock + clock_period - now, 0.0))
                    stop.wait(wait)
                if stop.is_set():
                    break
                if self.clock_pub is not None:
                    self._publish_clock(max(m.stamp_ns, start_ns))
                self.publishers[m.topic].publish(m.data)
                stats.published[self.publishers[m.topic].topic_name] += 1
            stats.loops += 1
            if not cfg.loop:
                break
        stats.wall_sec = time.monotonic() - t_start
        return stats

    def wait_for_acks(self) -> None:
        from rclpy.duration import Duration

        deadline = time.monotonic() + self.config.ack_timeout
        for pub in self.publishers.values():
            left = max(deadline - time.monotonic(), 0.0)
            if not pub.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))):
                self.log.warning(f"subscribers of {pub.topic_name} did not acknowledge every message in time")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stllm-play", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bag", help="rosbag2 bag directory (or a .mcap / .db3 file)")
    p.add_argument("--rate", type=float, default=1.0, help="playback rate (1.0 = real time)")
    p.add_argument("--remap", action="append", default=[], metavar="OLD:=NEW", help="publish topic OLD as NEW")
    p.add_argument("--topics", nargs="+", default=[], metavar="TOPIC", help="play only these topics")
    p.add_argument("--clock", action="store_true", help="publish the bag time on /clock")
    p.add_argument("--clock-hz", type=float, default=40.0, help="/clock frequency with --clock")
    p.add_argument("--loop", action="store_true", help="play the bag again and again until Ctrl-C")
    p.add_argument("--start-offset", type=float, default=0.0, metavar="SEC", help="start SEC seconds into the bag")
    p.add_argument("--any-subscriber", action="store_true",
                   help="with --wait-for-subscribers: one subscribed topic is enough (not every topic)")
    p.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="SEC",
                   help="wait up to SEC seconds for a subscriber on every played topic before starting")
    p.add_argument("--delay", type=float, default=0.0, metavar="SEC",
                   help="sleep SEC seconds before playing (lets discovery settle after --wait-for-subscribers)")
    p.add_argument("--latched", nargs="*", default=list(LATCHED_TOPICS), metavar="TOPIC",
                   help="topics published transient-local (default: %(default)s)")
    p.add_argument("--reliable", action="store_true",
                   help="offer every topic reliable, depth 100, instead of its recorded QoS (lossless replay)")
    p.add_argument("--qos-profile-overrides-path", metavar="FILE",
                   help="rosbag2's per-topic QoS overrides YAML (reliability, durability, history, depth)")
    p.add_argument("--info", action="store_true", help="print what is in the bag and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    argv = list(sys.argv[1:] if argv is None else argv)
    # Our options come first; ROS arguments only after --ros-args (so `--remap a:=b` is never read as a ROS remap).
    cut = argv.index("--ros-args") if "--ros-args" in argv else len(argv)
    argv, ros_argv = argv[:cut], argv[cut:]
    args = build_parser().parse_args(argv)
    try:
        reader = BagReader(args.bag)
        if args.info:
            print(reader.info)
            return 0
        cfg = PlayerConfig(bag=args.bag, rate=args.rate, remap=parse_remap(args.remap), topics=tuple(args.topics),
                           clock=args.clock, clock_hz=args.clock_hz, loop=args.loop, start_offset=args.start_offset,
                           wait_for_subscribers=args.wait_for_subscribers, any_subscriber=args.any_subscriber,
                           delay=args.delay, latched=tuple(args.latched), reliable=args.reliable,
                           qos_overrides=(load_qos_overrides(args.qos_profile_overrides_path)
                                          if args.qos_profile_overrides_path else {}))
    except (STLLMError, argparse.ArgumentTypeError) as e:
        print(f"stllm-play: {e}", file=sys.stderr)
        return 2

    rc = 0
    stop = threading.Event()
    # rclpy.init() returns None on Jazzy (the context-manager form is Kilted-only): init, and shut down in finally
    rclpy.init(args=["stllm-play", *ros_argv])
    try:
        node = rclpy.create_node("stllm_bag_player")
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        def spin() -> None:
            try:
                executor.spin()
            except (ExternalShutdownException, KeyboardInterrupt):  # Ctrl-C shuts the context down under the thread
                stop.set()

        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        try:
            player = BagPlayer(node, cfg, reader)
            node.get_logger().info(
                f"bag {cfg.bag}: {reader.info.message_count} messages, {reader.info.duration_sec:.2f} s, "
                f"{len(player.publishers)} topic(s) to publish, {len(player.unavailable)} skipped")
            if cfg.wait_for_subscribers > 0:
                player.wait_for_subscribers(cfg.wait_for_subscribers, stop)
            if cfg.delay > 0:
                stop.wait(cfg.delay)
            node.get_logger().info(f"Playing at rate {cfg.rate}{' (loop)' if cfg.loop else ''}")
            stats = player.play(stop)
            if not stop.is_set() and rclpy.ok():  # after Ctrl-C the context is shut down: nothing to wait for
                player.wait_for_acks()
            skipped = dict(stats.skipped) or "none"
            node.get_logger().info(
                f"Played {sum(stats.published.values())} message(s) on {len(stats.published)} topic(s) in "
                f"{stats.wall_sec:.2f} s ({stats.loops} pass(es)); skipped (type not importable): {skipped}")
        except (KeyboardInterrupt, ExternalShutdownException):
            stop.set()
        except STLLMError as e:
            node.get_logger().error(str(e))
            rc = 2
        finally:
            executor.shutdown()
            spinner.join(5)
            node.destroy_node()
    finally:
        rclpy.try_shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
