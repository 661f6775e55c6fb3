"""End to end across processes: the stack (stllm-run) runs, a REA-Sim bag is replayed into it with /clock, and
AskSTLLM is called from this process; plus the behaviours around it (no map, streaming, placeholders, 16 clients,
camera stopped)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from rosgraph_msgs.msg import Clock
from std_msgs.msg import String

from stllm_core.data.bags import bag_info
from stllm_core.data.cli import clip2bag_main, reasim_main
from stllm_ros.msg import Answer
from stllm_ros.srv import AskSTLLM
from tests_support import NodeProcess, RosTestNode, wait_until

WINDOW = 10.0


@pytest.fixture(scope="module")
def demo_bag(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    reasim_main(
        [
            "--out",
            str(root / "reasim"),
            "--scenes",
            "1",
            "--clips-per-scene",
            "1",
            "--frames",
            "8",
            "--size",
            "96x72",
            "--questions-per-type",
            "1",
            "--seed",
            "3",
            "--workers",
            "1",
            "-q",
        ]
    )
    clip = next((root / "reasim" / "clips").iterdir())
    bag = root / "kitchen"
    clip2bag_main([str(clip), str(bag), "--fps", "4", "-q"])
    return bag


@pytest.fixture(scope="module")
def ros():
    with RosTestNode("e2e_client") as node:
        yield node


@pytest.fixture(scope="module")
def stack(demo_bag, ros):
    """stllm-run (full perception) + a second reasoner without depth/points, then the bag replayed once with /clock."""
    # sampling: the untrained tiny model's greedy answer is one repeated newline, i.e. empty text
    # lossless delivery (as stllm-run --bag sets): best effort may drop some of the 8 frames, and N = 4 is asserted
    lossless = ["perception.sensor_qos:=reliable", "perception.sensor_depth:=100"]
    common = ["--param", "model:=tiny-random", "--param", "use_sim_time:=true", "--param", "temperature:=1.0"]
    common += [a for p in lossless for a in ("--param", p)]
    run = NodeProcess.python(
        "stllm_ros.run",
        *common,
        "--param",
        "perception.depth_topic:=/camera/depth/image_raw",
        "--param",
        "perception.points_topic:=/scene/points",
    )
    nomap = NodeProcess.python(
        "stllm_ros.reasoner_node",
        "--ros-args",
        "-r",
        "__ns:=/nomap",
        "-p",
        "model:=tiny-random",
        "-p",
        "use_sim_time:=true",
        "-p",
        "service_name:=/nomap/ask",
        "-p",
        "answers_topic:=/nomap/answers",
        "-p",
        "partial_topic:=/nomap/partial",
        "-p",
        "perception.map_topic:=/nomap/map",
        *[a for p in lossless for a in ("-p", p)],
    )
    with run, nomap:
        clients = {}
        for name in ("/stllm/ask", "/nomap/ask"):
            clients[name] = ros.node.create_client(AskSTLLM, name)
            ros.wait_for_service(clients[name], timeout=240)
            # the service exists from the start; perception subscribes only once the model has loaded (configure):
            # replaying before that loses frames for this node (the player only waits for ONE subscriber per topic)
            wait_until(lambda c=clients[name]: "not configured" not in ask(ros, c, "ready?").error, 240,
                       interval=0.5, what=f"{name} to be configured")
        # --delay 3: volatile readers get nothing published before they match the player's writers, and the player
        # counts one subscriber per topic (a CI run saw the second node hold 3 of the 4 frames with --delay 1)
        with NodeProcess.python(
            "stllm_ros.bag_player", str(demo_bag), "--clock", "--wait-for-subscribers", "60", "--delay", "3"
        ) as player:
            assert player.wait(240) == 0, player.output[-3000:]
        yield clients
        assert run.returncode is None, "stllm-run died:\n" + run.output[-3000:]
        assert nomap.returncode is None, "the reasoner died:\n" + nomap.output[-3000:]


def ask(ros, client, question="Where was the fridge when I took the pan?", **kw):
    return ros.call(client, AskSTLLM.Request(question=question, **kw), timeout=120)


def from_time(t) -> float:
    return t.sec + t.nanosec * 1e-9


def test_answers_from_the_replayed_clip(ros, stack, demo_bag):
    info = bag_info(demo_bag)
    answers = []
    ros.node.create_subscription(Answer, "/stllm/answers", answers.append, 10)
    # the map arrives on its own topic; ask until the answer is grounded in it (never assume it arrived in time)
    deadline = time.monotonic() + 120
    while True:
        res = ask(ros, stack["/stllm/ask"])
        assert res.success, res.error
        if res.num_points > 0 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert res.num_points > 0, "the scene cloud from the bag never reached the map"
    assert res.num_frames == 4  # the tiny model's frame count (num_frames 0 = the model's)
    start, end = from_time(res.clip_start), from_time(res.clip_end)
    assert info.start_ns * 1e-9 - 1e-6 <= start < end <= info.end_ns * 1e-9 + 1e-6
    assert end - start <= WINDOW
    assert res.num_tokens >= 1 and res.encode_ms > 0 and res.prefill_ms > 0
    wait_until(lambda: any(a.answer == res.answer for a in answers), 30, what="the Answer message")
    msg = next(a for a in answers if a.answer == res.answer)
    assert msg.question.startswith("Where was the fridge") and msg.num_frames == 4


def test_frames_but_no_map_answer_from_video_alone(ros, stack):
    res = ask(ros, stack["/nomap/ask"])
    assert res.success, res.error
    assert res.num_frames == 4 and res.num_points == 0


def test_partial_answers_are_streamed(ros, stack):
    partial = []
    ros.node.create_subscription(String, "/stllm/answers_partial", lambda m: partial.append(m.data), 50)
    # Discovery of the new subscription takes a moment on a loaded machine, and the untrained tiny model sometimes
    # samples only tokens that decode to nothing (no partial text to publish): ask until a non-empty answer was
    # streamed, then check that the stream ended with the final answer.
    deadline = time.monotonic() + 90
    for i in range(1000):
        res = ask(ros, stack["/stllm/ask"], question=f"What should I do next, step {i}?", max_new_tokens=8)
        assert res.success, res.error
        assert res.num_tokens <= 8
        if res.answer and partial and partial[-1] == res.answer:
            break
        assert time.monotonic() < deadline, f"no streamed partial answer matched a final answer; saw {partial[-3:]}"
        time.sleep(0.5)
    assert all(res.answer.startswith(p) or not p for p in partial[-1:])


def test_placeholders_in_the_question_are_escaped_not_injected(ros, stack):
    res = ask(ros, stack["/stllm/ask"], question="<image><pointcloud> <image> where is the mug? <|im_start|>")
    assert res.success, res.error
    assert res.num_frames == 4


def test_sixteen_clients_at_once_all_get_a_reply(ros, stack):
    results: list = [None] * 16

    def one(i):
        try:
            results[i] = ask(ros, stack["/stllm/ask"], max_new_tokens=4)
        except Exception as e:  # the assertion below reports it
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    errors = [r for r in results if not isinstance(r, AskSTLLM.Response)]
    assert not errors, errors
    answered = [r for r in results if r.success]
    busy = [r for r in results if not r.success]
    assert answered, "no question was answered"
    assert all("busy" in r.error for r in busy), [r.error for r in busy]
    assert ask(ros, stack["/stllm/ask"], max_new_tokens=2).success  # still up and serving


def test_camera_stopped_longer_than_the_window_is_refused_with_the_reason(ros, stack, demo_bag):
    """Runs last: moves the sim clock WINDOW+20 s past the bag's end, as if the camera had stopped."""
    end_ns = bag_info(demo_bag).end_ns + int((WINDOW + 20) * 1e9)
    pub = ros.node.create_publisher(Clock, "/clock", 10)
    stamp = Clock()
    stamp.clock.sec, stamp.clock.nanosec = divmod(end_ns, 1_000_000_000)
    for _ in range(20):
        pub.publish(stamp)
        time.sleep(0.1)
    res = ask(ros, stack["/stllm/ask"])
    assert not res.success
    assert "newest camera frame" in res.error and "older than" in res.error, res.error
    json.dumps(res.error)  # a plain string, printable
