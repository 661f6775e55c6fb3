"""stllm-play across processes: the player in a subprocess, a real rclpy subscriber here (Fast DDS over loopback)."""

from __future__ import annotations

import os
import re
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")

from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from test_bags import EXTERNAL, make_frames, make_scene  # noqa: E402

from stllm_core.data.bags import BagReader, BagWriterConfig, write_bag  # noqa: E402
from stllm_core.errors import ConfigError, STLLMError  # noqa: E402
from stllm_ros.bag_player import message_class  # noqa: E402
from tests_support import NodeProcess, RosTestNode, ros_env, wait_until  # noqa: E402

LATCHED = ("/tf_static", "/scene/points")


class Recorder:
    """Raw (CDR bytes) subscriptions on a RosTestNode; keeps (monotonic receive time, bytes) per topic."""

    def __init__(self, ros: RosTestNode, topics: dict[str, str]):
        self.lock = threading.Lock()
        self.got: dict[str, list[tuple[float, bytes]]] = defaultdict(list)
        self.subs = []
        for topic, msgtype in topics.items():
            durable = DurabilityPolicy.TRANSIENT_LOCAL if topic in LATCHED else DurabilityPolicy.VOLATILE
            best_effort = topic == "/clock"
            qos = QoSProfile(depth=1000, durability=durable,
                             reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE)
            self.subs.append(ros.node.create_subscription(
                message_class(msgtype), topic, lambda data, t=topic: self._on(t, data), qos, raw=True))

    def _on(self, topic: str, data: bytes) -> None:
        now = time.monotonic()
        with self.lock:
            self.got[topic].append((now, bytes(data)))

    def count(self, topic: str) -> int:
        with self.lock:
            return len(self.got[topic])


def same_cdr(received: bytes, sent: bytes) -> bool:
    """The bytes published, as received: DDS pads a serialized payload with zeros to a multiple of 4 bytes."""
    pad = received[len(sent):]
    return received[: len(sent)] == sent and len(pad) < 4 and (len(sent) + len(pad)) % 4 == 0 and not any(pad)


def play(bag: Path, *args: str, timeout: float = 90.0, env: dict[str, str] | None = None) -> str:
    """Run stllm-play to completion; returns its output (asserts exit code 0)."""
    with NodeProcess.python("stllm_ros.bag_player", str(bag), *args, env=env) as proc:
        try:
            rc = proc.wait(timeout)
        except Exception:
            raise AssertionError(f"player did not finish in {timeout} s:\n{proc.output[-3000:]}") from None
        assert rc == 0, proc.output[-3000:]
        return proc.output


def test_replay_delivers_every_message_in_order_at_rate(tmp_path):
    fps, rate = 20.0, 2.0
    bag = tmp_path / "clip_bag"
    write_bag(bag, make_frames(161, fps=fps), make_scene(300), BagWriterConfig())  # 8.0 s of bag time
    expected = defaultdict(list)
    for m in BagReader(bag).messages():
        expected[m.topic].append(m)
    types = {t.name: t.msgtype for t in BagReader(bag).info.topics}

    with RosTestNode("bag_replay_test") as ros:
        rec = Recorder(ros, {**types, "/clock": "rosgraph_msgs/msg/Clock"})
        out = play(bag, "--rate", str(rate), "--clock", "--wait-for-subscribers", "60", "--delay", "1.5")
        # the player waited for acknowledgements before exiting; allow the last callbacks to run
        wait_until(lambda: all(rec.count(t) >= len(ms) for t, ms in expected.items()), 30, what="every message")

    assert "Played 646 message(s) on 6 topic(s)" in out, out[-2000:]
    for topic, msgs in expected.items():
        got = rec.got[topic]
        assert len(got) == len(msgs), topic
        for i, ((_, d), m) in enumerate(zip(got, msgs)):
            assert same_cdr(d, m.data), f"{topic} message {i}: payload differs (or arrived out of order)"

    # The rate: bag time of the replay / the wall time the player took (from its own report). The subscriber's receive
    # times are printed too but not asserted: on these machines Fast DDS sometimes hands a reliable reader its samples
    # in bursts (pairwise receive-time slopes read 2.0x, 3.7x and 33x for the same 2x replay on an idle machine),
    # while order and completeness, asserted above, always held.
    played = re.search(r"Played \d+ message\(s\) on \d+ topic\(s\) in ([0-9.]+) s", out)
    assert played, out[-2000:]
    info = BagReader(bag).info
    measured_rate = info.duration_sec / float(played.group(1))
    stamps = np.array([m.stamp_ns for m in expected["/camera/color/image_raw"]]) * 1e-9
    recv = np.array([t for t, _ in rec.got["/camera/color/image_raw"]])
    print(f"replay rate: requested {rate}, player {measured_rate:.3f}; subscriber first-to-last "
          f"{(stamps[-1] - stamps[0]) / (recv[-1] - recv[0]):.3f}")
    assert abs(measured_rate / rate - 1.0) < 0.10

    # /clock carried bag time, never backwards, within the bag
    from rclpy.serialization import deserialize_message
    from rosgraph_msgs.msg import Clock

    clock = [deserialize_message(d, Clock).clock for _, d in rec.got["/clock"]]
    clock_ns = [c.sec * 10**9 + c.nanosec for c in clock]
    assert len(clock_ns) >= 10
    assert clock_ns == sorted(clock_ns)
    info = BagReader(bag).info
    assert info.start_ns <= clock_ns[0] and clock_ns[-1] <= info.end_ns


@pytest.mark.skipif(not (EXTERNAL / "talker_sqlite3").is_dir(), reason="shared rosbag2 bags not present")
def test_replay_real_rosbag2_bag_with_remap_and_unknown_types(tmp_path):
    bag = EXTERNAL / "talker_sqlite3"
    with RosTestNode("bag_replay_talker") as ros:
        rec = Recorder(ros, {"/chatter": "std_msgs/msg/String"})
        out = play(bag, "--rate", "10", "--topics", "/topic", "--remap", "/topic:=/chatter",
                   "--wait-for-subscribers", "60")
        wait_until(lambda: rec.count("/chatter") >= 10, 30, what="10 talker messages")
    from rclpy.serialization import deserialize_message
    from std_msgs.msg import String

    assert [deserialize_message(d, String).data for _, d in rec.got["/chatter"]] == [
        f"Hello, world! {i}" for i in range(10)]
    assert "Played 10 message(s) on 1 topic(s)" in out

    # a bag whose types are not installed here (test_msgs): skipped with a count, exit 0
    out = play(EXTERNAL / "cdr_test_mcap")
    assert "test_msgs/msg/BasicTypes': 3" in out and "test_msgs/msg/Arrays': 4" in out
    assert "Played 0 message(s)" in out


def test_player_runs_with_the_jazzy_rclpy_init(tmp_path):
    """On Jazzy rclpy.init() returns None (only Kilted's returns a context manager): the player must not use it as
    one. A sitecustomize gives this process's rclpy Jazzy's return value."""
    shim = tmp_path / "jazzy"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import rclpy\n_init = rclpy.init\n\n\ndef init(*args, **kwargs):\n    _init(*args, **kwargs)\n\n\n"
        "rclpy.init = init\n")
    env = ros_env()
    env["PYTHONPATH"] = os.pathsep.join([str(shim), env["PYTHONPATH"]])
    with RosTestNode("bag_replay_jazzy") as ros:
        rec = Recorder(ros, {"/chatter": "std_msgs/msg/String"})
        out = play(EXTERNAL / "talker_sqlite3", "--rate", "20", "--remap", "/topic:=/chatter",
                   "--wait-for-subscribers", "60", env=env)
        wait_until(lambda: rec.count("/chatter") >= 10, 30, what="10 talker messages")
    assert "Played 20 message(s) on 2 topic(s)" in out


def test_ctrl_c_stops_a_looping_player_cleanly(tmp_path):
    bag = tmp_path / "b"
    write_bag(bag, make_frames(5, depth=False), None, BagWriterConfig())
    with NodeProcess.python("stllm_ros.bag_player", str(bag), "--loop", "--rate", "0.5") as proc:
        proc.wait_for_output("Playing at rate", timeout=60)
        rc = proc.stop(timeout=30)
    assert rc == 0, proc.output[-3000:]
    assert "terminate called" not in proc.output and "Traceback" not in proc.output


def test_bad_bag_exits_2_with_reason(tmp_path):
    (tmp_path / "bad.mcap").write_bytes(b"not a bag")
    with NodeProcess.python("stllm_ros.bag_player", str(tmp_path / "bad.mcap")) as proc:
        assert proc.wait(60) == 2
    assert "bad.mcap" in proc.output and "truncated, corrupt" in proc.output


def test_start_offset_keeps_latched_state_and_loop_repeats(tmp_path):
    """In-process BagPlayer: --start-offset drops earlier messages except latched ones; --loop plays passes again."""
    from stllm_ros.bag_player import BagPlayer, PlayerConfig

    bag = tmp_path / "b"
    write_bag(bag, make_frames(10, fps=10.0, depth=False), make_scene(20), BagWriterConfig())  # frames at 0.0..0.9 s
    with RosTestNode("bag_player_inproc") as ros:
        stop = threading.Event()
        cfg = PlayerConfig(bag=str(bag), rate=50.0, start_offset=0.45, remap={"/tf": "/bag/tf"})
        stats = BagPlayer(ros.node, cfg).play(stop)
        # frames at 0.5 .. 0.9 s (5 frames x tf, camera_info, image) + /tf_static + /scene/points
        assert stats.published == {"/tf_static": 1, "/scene/points": 1, "/bag/tf": 5,
                                   "/camera/color/camera_info": 5, "/camera/color/image_raw": 5}
        assert stats.loops == 1 and not stats.skipped

        player = BagPlayer(ros.node, PlayerConfig(bag=str(bag), rate=100.0, loop=True, topics=("/tf",)))
        runner = threading.Thread(target=player.play, args=(stop,))
        runner.start()
        try:
            wait_until(lambda: player.stats.published["/tf"] >= 25, 60, what="three passes of a looping bag")
        finally:
            stop.set()
            runner.join(30)
        assert not runner.is_alive()
        assert player.stats.loops >= 2 and player.stats.published["/tf"] >= 25
        assert set(player.stats.published) == {"/tf"}

        with pytest.raises(STLLMError, match=r"--remap of \['/tff'\]: not in bag"):
            BagPlayer(ros.node, PlayerConfig(bag=str(bag), remap={"/tff": "/x"}))
        with pytest.raises(STLLMError, match=r"--topics \['/nope'\] not in bag"):
            BagPlayer(ros.node, PlayerConfig(bag=str(bag), topics=("/nope",)))
    with pytest.raises(ConfigError, match="rate"):
        PlayerConfig(bag=str(bag), rate=0.0)


def test_bag_messages_decode_with_rclpy_and_the_ros_adapters(tmp_path):
    """The CDR that rosbags writes is what rclpy and stllm_ros.conversions read (interop with the live ROS path)."""
    from rclpy.serialization import deserialize_message

    from stllm_ros import conversions as conv

    frames, scene = make_frames(3), make_scene(40)
    write_bag(tmp_path / "b", frames, scene, BagWriterConfig(depth_encoding="16UC1"))
    seen = defaultdict(int)
    for m in BagReader(tmp_path / "b").messages():
        msg = deserialize_message(m.data, message_class(m.msgtype))
        i = seen[m.topic]
        seen[m.topic] += 1
        if m.topic == "/camera/color/image_raw":
            np.testing.assert_array_equal(conv.image_to_rgb(msg), frames[i].image)
            assert conv.stamp_to_sec(msg.header.stamp) * 1e9 == pytest.approx(m.stamp_ns, abs=1e3)
        elif m.topic == "/camera/depth/image_raw":
            np.testing.assert_allclose(conv.image_to_depth(msg), frames[i].depth, atol=5e-4, equal_nan=True)
        elif m.topic == "/camera/color/camera_info":
            np.testing.assert_array_equal(conv.camera_info_to_model(msg).pinhole().K, frames[i].K)
        elif m.topic == "/scene/points":
            xyz, rgb = conv.pointcloud2_to_xyz_rgb(msg)
            np.testing.assert_array_equal(xyz, scene.points)
            np.testing.assert_array_equal(rgb, scene.colors)
        elif m.topic in ("/tf", "/tf_static"):
            parent, child, _, t, q = conv.transform_from_msg(msg.transforms[0])
            assert (parent, child) == (("map", "camera_link") if m.topic == "/tf" else
                                       ("camera_link", "camera_color_optical_frame"))
            if m.topic == "/tf":  # map <- camera_link <- optical (fixed REP-103 -> optical rotation) is the clip pose
                from scipy.spatial.transform import Rotation

                T = np.eye(4)
                T[:3, :3], T[:3, 3] = Rotation.from_quat(q).as_matrix(), t
                R_link_opt = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)
                T_link_opt = np.eye(4)
                T_link_opt[:3, :3] = R_link_opt
                np.testing.assert_allclose(T @ T_link_opt, frames[i].T_world_cam, atol=1e-9)
    assert seen["/camera/color/image_raw"] == 3 and seen["/scene/points"] == 1


@pytest.mark.skipif(not (EXTERNAL / "talker_mcap").is_dir(), reason="shared rosbag2 bags not present")
def test_info_prints_topics_like_ros2_bag_info(capsys):
    from stllm_ros.bag_player import main

    assert main([str(EXTERNAL / "talker_mcap"), "--info"]) == 0
    out = capsys.readouterr().out
    assert "Messages: 20" in out and "std_msgs/msg/String" in out and "/rosout" in out
    assert main([str(EXTERNAL / "talker_mcap"), "--rate", "-1"]) == 2
    assert "rate" in capsys.readouterr().err


def _bag_with_recorded_qos(path: Path) -> Path:
    """A bag as `ros2 bag record` writes one of a camera driver: best-effort depth-5 images, a reliable latched
    /tf_static, and a recorded /clock."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    zero = QosTime(sec=0, nsec=0)

    def qos(reliability, durability, depth):
        return [Qos(history=QosHistory.KEEP_LAST, depth=depth, reliability=reliability, durability=durability,
                    deadline=zero, lifespan=zero, liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=zero,
                    avoid_ros_namespace_conventions=False)]

    Clock, Time = ts.types["rosgraph_msgs/msg/Clock"], ts.types["builtin_interfaces/msg/Time"]
    Header, String = ts.types["std_msgs/msg/Header"], ts.types["std_msgs/msg/String"]
    with Writer(path, version=9) as w:
        cam = w.add_connection("/cam/info", "std_msgs/msg/Header", typestore=ts,
                               offered_qos_profiles=qos(QosReliability.BEST_EFFORT, QosDurability.VOLATILE, 5))
        static = w.add_connection("/tf_static", "std_msgs/msg/String", typestore=ts,
                                  offered_qos_profiles=qos(QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, 1))
        clock = w.add_connection("/clock", "rosgraph_msgs/msg/Clock", typestore=ts,
                                 offered_qos_profiles=qos(QosReliability.BEST_EFFORT, QosDurability.VOLATILE, 1))
        for i in range(3):
            t = 10**9 + i * 10**8
            stamp = Time(sec=t // 10**9, nanosec=t % 10**9)
            w.write(cam, t, ts.serialize_cdr(Header(stamp=stamp, frame_id="cam"), "std_msgs/msg/Header"))
            w.write(clock, t, ts.serialize_cdr(Clock(clock=stamp), "rosgraph_msgs/msg/Clock"))
        w.write(static, 10**9, ts.serialize_cdr(String(data="tree"), "std_msgs/msg/String"))
    return path


def test_player_offers_the_recorded_qos_with_rosbag2_overrides_and_one_clock(tmp_path):
    """As `ros2 bag play`: each topic with its recorded QoS (a best-effort camera stays best effort, a latched topic
    transient local); --reliable and rosbag2's --qos-profile-overrides-path YAML override it; with --clock the bag's
    recorded /clock is not played beside the player's own."""
    from rclpy.qos import HistoryPolicy

    from stllm_ros.bag_player import BagPlayer, PlayerConfig, load_qos_overrides

    bag = _bag_with_recorded_qos(tmp_path / "qos_bag")
    info = {t.name: t for t in BagReader(bag).info.topics}
    assert (info["/cam/info"].reliable, info["/cam/info"].depth) == (False, 5) and info["/tf_static"].latched
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("/cam/info:\n  reliability: reliable\n  history: keep_last\n  depth: 42\n")
    with RosTestNode("bag_player_qos") as ros:
        recorded = BagPlayer(ros.node, PlayerConfig(bag=str(bag)))
        q = recorded.publishers["/cam/info"].qos_profile
        assert (q.reliability, q.durability, q.depth) == (ReliabilityPolicy.BEST_EFFORT, DurabilityPolicy.VOLATILE, 5)
        assert recorded.publishers["/tf_static"].qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
        assert "/clock" in recorded.publishers  # without --clock the recorded clock is just a topic
        reliable = BagPlayer(ros.node, PlayerConfig(bag=str(bag), reliable=True, clock=True))
        q = reliable.publishers["/cam/info"].qos_profile
        assert (q.reliability, q.depth) == (ReliabilityPolicy.RELIABLE, 100)
        assert "/clock" not in reliable.publishers
        over = BagPlayer(ros.node, PlayerConfig(bag=str(bag), qos_overrides=load_qos_overrides(str(overrides))))
        q = over.publishers["/cam/info"].qos_profile
        assert (q.reliability, q.history, q.depth) == (ReliabilityPolicy.RELIABLE, HistoryPolicy.KEEP_LAST, 42)
        with pytest.raises(STLLMError, match=r"QoS overrides of \['/nope'\]"):
            BagPlayer(ros.node, PlayerConfig(bag=str(bag), qos_overrides={"/nope": {"depth": 1}}))
    overrides.write_text("/cam/info:\n  deadline: {sec: 1}\n")
    with pytest.raises(STLLMError, match="unsupported QoS key 'deadline'"):
        load_qos_overrides(str(overrides))
    overrides.write_text("/cam/info:\n  reliability: sometimes\n")
    with pytest.raises(STLLMError, match="reliability 'sometimes'"):
        load_qos_overrides(str(overrides))
