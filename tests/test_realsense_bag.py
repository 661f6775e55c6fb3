"""A bag shaped like a RealSense D435 recording (realsense-ros 4.x names under /camera/camera/, jpeg colour, aligned
16UC1 depth stamped a few ms off the colour, robot_state_publisher's /tf_static, odometry on /tf) replays through
`stllm-run --bag` with remap rules, and the answer is grounded in frames and in points integrated from the depth."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from stllm_core.data.bags import T_LINK_OPTICAL, _Msgs, _qos, _typestore, bag_info, read_bag_clip
from stllm_ros.srv import AskSTLLM
from tests_support import NodeProcess, RosTestNode, wait_until

NS = "/camera/camera"
COLOR = f"{NS}/color/image_raw"
COLOR_INFO = f"{NS}/color/camera_info"
DEPTH = f"{NS}/aligned_depth_to_color/image_raw"
DEPTH_INFO = f"{NS}/aligned_depth_to_color/camera_info"
OPTICAL = "camera_color_optical_frame"
START_NS = 1_700_000_000 * 10**9
W, H, FPS, SECONDS = 320, 240, 15, 3.0
K = np.array([[300.0, 0.0, 159.5], [0.0, 300.0, 119.5], [0.0, 0.0, 1.0]])
D = [0.1, -0.05, 0.001, 0.0005, 0.0]  # plumb_bob, as a D435 colour camera reports (k1, k2, t1, t2, k3)
# (x0, y0, x1, y1, BGR colour, depth mm) of the boxes in front of a 2.5 m wall
BOXES = [(20, 40, 110, 200, (40, 40, 220), 1200), (130, 90, 210, 230, (40, 200, 40), 1600),
         (220, 20, 300, 120, (220, 120, 30), 2000)]


def pose(x: float, y: float, z: float, yaw: float = 0.0) -> np.ndarray:
    T = np.eye(4)
    c, s = np.cos(yaw), np.sin(yaw)
    T[:3, :3] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    T[:3, 3] = (x, y, z)
    return T


def draw(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame i: a BGR image and its aligned depth (uint16 mm; 0 = no return, as the D435's invalid left band)."""
    shift = i // 3  # the boxes drift left as the robot turns
    bgr = np.empty((H, W, 3), np.uint8)
    bgr[:] = np.linspace(90, 160, W, dtype=np.uint8)[None, :, None]  # a shaded grey wall
    depth = np.full((H, W), 2500, np.uint16)
    for x0, y0, x1, y1, colour, mm in BOXES:
        x0, x1 = max(x0 - shift, 0), max(x1 - shift, 1)
        bgr[y0:y1, x0:x1] = colour
        depth[y0:y1, x0:x1] = mm
    depth[:, :12] = 0
    return bgr, depth


def write_realsense_bag(path: Path) -> None:
    """~3 s of a D435 on a slowly moving base, with realsense-ros 4.x topics (written with the project's rosbags
    helpers: _Msgs for the messages, _qos for the offered QoS)."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    ts = _typestore()
    M = _Msgs(ts)
    CompressedImage = ts.types["sensor_msgs/msg/CompressedImage"]
    msgs: list[tuple[int, str, str, object]] = []  # (log time = header stamp, topic, type, message)

    def tf(stamp: int, parent: str, child: str, T: np.ndarray):
        return M.TFMessage(transforms=[M.transform(stamp, parent, child, T)])

    def info(stamp: int):
        return dataclasses.replace(M.camera_info(stamp, OPTICAL, K, W, H), d=np.array(D))  # P = [K | 0] already

    # robot_state_publisher: one latched TFMessage with every fixed joint (REP-103 optical rotation last)
    msgs.append((START_NS, "/tf_static", "tf2_msgs/msg/TFMessage", M.TFMessage(transforms=[
        M.transform(START_NS, "base_link", "camera_link", pose(0.1, 0.0, 0.4)),
        M.transform(START_NS, "camera_link", OPTICAL, T_LINK_OPTICAL)])))
    end_ns = START_NS + int((SECONDS + 0.1) * 1e9)  # odometry runs past the last image: every pose interpolates
    for k in range(int((end_ns - START_NS) * 30e-9) + 1):  # odom -> base_link at 30 Hz, map -> odom at 10 Hz
        t = k / 30.0
        stamp = START_NS + int(round(t * 1e9))
        msgs.append((stamp, "/tf", "tf2_msgs/msg/TFMessage", tf(stamp, "odom", "base_link", pose(0.15 * t, 0.0, 0.0,
                                                                                                   0.05 * t))))
        if k % 3 == 0:
            msgs.append((stamp, "/tf", "tf2_msgs/msg/TFMessage", tf(stamp, "map", "odom",
                                                                     pose(0.5 + 0.001 * t, -0.2, 0.0, 0.01))))
    for i in range(int(SECONDS * FPS)):
        stamp = START_NS + int(round((0.05 + i / FPS) * 1e9))
        bgr, depth = draw(i)
        ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        msgs.append((stamp, f"{COLOR}/compressed", "sensor_msgs/msg/CompressedImage", CompressedImage(
            header=M.header(stamp, OPTICAL), format="rgb8; jpeg compressed bgr8", data=jpeg.reshape(-1))))
        msgs.append((stamp, COLOR_INFO, "sensor_msgs/msg/CameraInfo", info(stamp)))
        dstamp = stamp + (1 if i % 2 else -1) * (3 + i % 5) * 1_000_000  # the depth sensor's own stamp: 3-7 ms off
        msgs.append((dstamp, DEPTH, "sensor_msgs/msg/Image", M.image(dstamp, OPTICAL, depth, "16UC1")))
        msgs.append((dstamp, DEPTH_INFO, "sensor_msgs/msg/CameraInfo", info(dstamp)))
    msgs.sort(key=lambda m: m[0])
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns: dict[str, object] = {}
        for stamp, topic, msgtype, msg in msgs:
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=ts,
                                                offered_qos_profiles=_qos(topic == "/tf_static"))
            w.write(conns[topic], stamp, ts.serialize_cdr(msg, msgtype))


@pytest.fixture(scope="module")
def realsense_bag(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("realsense") / "d435"
    write_realsense_bag(path)
    return path


def test_the_bag_looks_like_a_realsense_recording(realsense_bag):
    info = bag_info(realsense_bag)
    topics = {t.name: t for t in info.topics}
    assert topics[f"{COLOR}/compressed"].msgtype == "sensor_msgs/msg/CompressedImage"
    assert topics[f"{COLOR}/compressed"].count == topics[DEPTH].count == int(SECONDS * FPS)
    assert topics["/tf_static"].latched and topics["/tf_static"].count == 1 and not topics["/tf"].latched
    assert 3.0 <= info.duration_sec <= 3.2
    clip = read_bag_clip(realsense_bag, f"{COLOR}/compressed", COLOR_INFO, DEPTH, points_topic=None)
    assert len(clip.frames) == int(SECONDS * FPS) and all(f.depth is not None for f in clip.frames)  # 3-7 ms apart
    assert np.abs(clip.frames[0].image[100, 60].astype(int) - (220, 40, 40)).max() < 12  # BGR jpeg decoded to RGB
    assert np.nanmin(clip.frames[0].depth) == pytest.approx(1.2) and np.nanmax(clip.frames[0].depth) == 2.5


def test_replays_through_stllm_run_with_remaps_into_frames_and_points(realsense_bag):
    # The colour and its CameraInfo come in by remap rules on the node's default (relative) names, as a robot's launch
    # file remaps a driver's topics; the rule for the base name also moves the compressed subscription (perception
    # resolves the base name, then appends /compressed, as image_transport does). Depth is off by default
    # (depth_topic ''): there is no name to remap, it is set by parameter.
    remaps = [f"camera/color/image_raw:={COLOR}", f"camera/color/camera_info:={COLOR_INFO}"]
    params = ["model:=tiny-random", "perception.image_transport:=compressed", f"perception.depth_topic:={DEPTH}",
              f"perception.depth_info_topic:={DEPTH_INFO}"]
    args = [a for r in remaps for a in ("-r", r)] + [a for p in params for a in ("--param", p)]
    with RosTestNode("realsense_client") as ros, NodeProcess.python("stllm_ros.run", *args, "--bag",
                                                                    str(realsense_bag)) as run:
        client = ros.node.create_client(AskSTLLM, "/stllm/ask")
        try:
            # stllm-run starts the player at once; it waits for the reasoner's subscriptions (after the model loaded)
            run.wait_for_output("[stllm-run] bag replay finished (0)", timeout=240)
        except (TimeoutError, RuntimeError) as e:
            pytest.fail(f"the replay did not finish: {e}")
        realsense = (f"{COLOR}/compressed", COLOR_INFO, DEPTH, DEPTH_INFO)
        defaults = ("/camera/color/image_raw", "/camera/color/image_raw/compressed", "/camera/color/camera_info")

        def subscribed() -> dict[str, list[str]]:
            return {t: [s.node_name for s in ros.node.get_subscriptions_info_by_topic(t)] for t in realsense + defaults}

        try:  # this process's view of the graph may lag the player's by a moment
            wait_until(lambda: all("stllm_reasoner" in subscribed()[t] for t in realsense), 10,
                       what="the reasoner's subscriptions")
        except TimeoutError:
            pass  # the assertion below says which names
        subscribed = subscribed()
        assert all("stllm_reasoner" in subscribed[t] for t in realsense), f"not on the realsense names: {subscribed}"
        assert not any(subscribed[t] for t in defaults), f"a default name is still subscribed: {subscribed}"
        ros.wait_for_service(client, timeout=60)
        deadline = time.monotonic() + 60
        while True:  # the worker integrates the last depth images just after the replay: ask until the map has them
            res = ros.call(client, AskSTLLM.Request(question="Where is the red box?", max_new_tokens=8), timeout=120)
            if (res.success and res.num_frames > 0 and res.num_points > 0) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert res.success, f"refused: {res.error}\nstllm-run output:\n{run.output[-4000:]}"
        assert res.num_frames > 0, f"no frames from the compressed colour\nstllm-run output:\n{run.output[-4000:]}"
        assert res.num_points > 0, f"no points from the aligned depth\nstllm-run output:\n{run.output[-4000:]}"
        info = bag_info(realsense_bag)
        start = res.clip_start.sec + res.clip_start.nanosec * 1e-9
        end = res.clip_end.sec + res.clip_end.nanosec * 1e-9
        assert info.start_ns * 1e-9 - 1e-6 <= start < end <= info.end_ns * 1e-9 + 1e-6, (start, end)
        bad = [line for line in run.output.splitlines() if "perception: " in line and "throttled" in line]
        assert not bad, "perception refused input from the bag:\n" + "\n".join(bad)
        assert run.returncode is None, "stllm-run died:\n" + run.output[-3000:]


def test_stllm_run_passes_remaps_to_every_node_and_refuses_malformed_ones():
    from stllm_ros.run import main, node_command, parse_remap
    from stllm_ros.stack import NODES

    rule = f"camera/color/image_raw:={COLOR}"
    cmd = node_command(NODES[0], "reasoner.yaml", ["model:=tiny-random"], "robot1", [rule])
    ros_args = cmd[cmd.index("--ros-args"):]
    assert ros_args[:5] == ["--ros-args", "-r", "__node:=stllm_reasoner", "-r", "__ns:=/robot1"]
    assert ros_args[5:7] == ["-r", rule] and "-p" in ros_args
    for bad in ("camera/color/image_raw", ":=/x", "a:=", "__node:=other"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_remap(bad)
    with pytest.raises(SystemExit) as e:
        main(["--remap", "no-separator"])
    assert e.value.code == 2
