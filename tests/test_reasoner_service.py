"""The reasoning service across processes, before any camera data: refusals are answers with reasons, never crashes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stllm_ros.srv import AskSTLLM
from tests_support import NodeProcess, RosTestNode, ros_env, wait_until


def reasoner(*params: str, ns: str = "/t") -> NodeProcess:
    """A reasoner node process; each concurrently running one needs its own namespace (node names must be unique:
    two /t/stllm_reasoner nodes would share their lifecycle and parameter services)."""
    args = []
    for p in params:
        args += ["-p", p]
    return NodeProcess.python("stllm_ros.reasoner_node", "--ros-args", "-r", f"__ns:={ns}", *args)


@pytest.fixture(scope="module")
def ros():
    with RosTestNode("reasoner_test_client") as node:
        yield node


@pytest.fixture(scope="module")
def tiny_node(ros):
    with reasoner("model:=tiny-random", "service_name:=/t/ask", "queue_size:=1", "max_question_chars:=200") as proc:
        proc.wait_for_output("stllm reasoner up", timeout=180)
        client = ros.node.create_client(AskSTLLM, "/t/ask")
        ros.wait_for_service(client)
        yield proc, client
        assert proc.returncode is None, "the reasoner died:\n" + proc.output[-3000:]


def ask(ros, client, question, **kw):
    return ros.call(client, AskSTLLM.Request(question=question, **kw), timeout=90)


@pytest.mark.parametrize(
    "question, reason",
    [
        ("", "empty"),
        ("   \t\n  ", "empty"),
        ("\x00\x01\x1b", "empty"),
        ("x" * 201, "maximum is 200"),
    ],
)
def test_bad_questions_are_refused_with_a_reason(ros, tiny_node, question, reason):
    res = ask(ros, tiny_node[1], question)
    assert not res.success and reason in res.error and res.answer == ""


def test_bad_request_fields_are_refused(ros, tiny_node):
    res = ask(ros, tiny_node[1], "where is the mug?", window_sec=-1.0)
    assert not res.success and "window_sec" in res.error
    res = ask(ros, tiny_node[1], "where is the mug?", max_new_tokens=100000)
    assert not res.success and "max_new_tokens" in res.error


def test_no_frames_yet_is_a_clear_refusal_not_a_hang(ros, tiny_node):
    res = ask(ros, tiny_node[1], "Where did I put the mug?")
    assert not res.success
    assert "no camera frames" in res.error and res.num_frames == 0


def test_cli_client_prints_the_reason_and_exits_1(tiny_node):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stllm_ros.ask_client",
            "Where is the fridge?",
            "--service",
            "/t/ask",
            "--timeout",
            "90",
        ],
        env=ros_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no camera frames" in out.stderr


def test_cli_client_without_a_service_exits_2():
    out = subprocess.run(
        [sys.executable, "-m", "stllm_ros.ask_client", "hello?", "--service", "/nobody/here", "--timeout", "2"],
        env=ros_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "not available" in out.stderr


def test_a_wrong_model_path_leaves_the_node_up_and_says_why(ros, tmp_path):
    missing = tmp_path / "no-such-model"
    with reasoner(f"model:={missing}", "service_name:=/t/ask_broken", ns="/broken") as proc:
        proc.wait_for_output("stllm reasoner up", timeout=180)
        client = ros.node.create_client(AskSTLLM, "/t/ask_broken")
        ros.wait_for_service(client)
        res = ask(ros, client, "Where is the mug?")
        assert not res.success
        assert "failed to load" in res.error and str(missing) in res.error
        assert proc.returncode is None


def test_invalid_utf8_is_decoded_safely_and_refused_with_a_reason(ros, tiny_node):
    """Invalid UTF-8 bytes on the wire: the generated typesupport (the same C conversion the service server runs)
    decodes them as U+FFFD; the reasoner drops those and says the question is empty — the node stays up."""
    from rclpy.serialization import deserialize_message, serialize_message

    raw = bytearray(serialize_message(AskSTLLM.Request(question="ABCD")))
    i = raw.index(b"ABCD")
    raw[i : i + 4] = b"\xff\xfe\xfd\xc3"  # not UTF-8
    req = deserialize_message(bytes(raw), AskSTLLM.Request)
    assert set(req.question) == {"\ufffd"}
    res = ask(ros, tiny_node[1], req.question)
    assert not res.success and "empty" in res.error
    res = ask(ros, tiny_node[1], "where\ufffd is the mug" + req.question)
    assert "no camera frames" in res.error  # cleaned and accepted; refused only for lack of frames
    assert tiny_node[0].returncode is None


def test_lifecycle_configure_loads_and_activate_serves(ros):
    """autostart off: the service answers with the state; configure + activate over lifecycle_msgs (as a lifecycle
    manager or `ros2 lifecycle set` would) make it serve."""
    from lifecycle_msgs.msg import State, Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    with reasoner("autostart:=false", "model:=tiny-random", "service_name:=/t/ask_lc", ns="/lc") as proc:
        proc.wait_for_output("stllm reasoner up", timeout=180)
        client = ros.node.create_client(AskSTLLM, "/t/ask_lc")
        ros.wait_for_service(client)
        res = ask(ros, client, "Where is the mug?")
        assert not res.success and "not configured" in res.error
        change = ros.node.create_client(ChangeState, "/lc/stllm_reasoner/change_state")
        get_state = ros.node.create_client(GetState, "/lc/stllm_reasoner/get_state")
        ros.wait_for_service(change)
        ros.wait_for_service(get_state)
        steps = (
            (Transition.TRANSITION_CONFIGURE, State.PRIMARY_STATE_INACTIVE, "not active"),
            (Transition.TRANSITION_ACTIVATE, State.PRIMARY_STATE_ACTIVE, None),
        )
        for tid, state, after in steps:
            # (the state is checked, not the reply's `success`: if a reply is lost and the call is re-sent, the
            # repeated transition is refused although the first one succeeded)
            ros.call(change, ChangeState.Request(transition=Transition(id=tid)), timeout=180)
            now = ros.call(get_state, GetState.Request(), timeout=60).current_state
            assert now.id == state, f"state {now.label} after transition {tid}; node output:\n{proc.output[-3000:]}"
            res = ask(ros, client, "Where is the mug?")
            if after:
                assert not res.success and after in res.error, res.error
        assert not res.success and "no camera frames" in res.error  # active: answering, only no frames yet


def test_parameters_of_a_configured_reasoner_are_refused_with_a_reason_then_apply_after_cleanup(ros):
    """`ros2 param set` of a parameter read at configure is refused while configured (not accepted and ignored);
    after cleanup it is accepted, and the next configure uses it (perception is restarted with its parameters)."""
    from lifecycle_msgs.msg import State, Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    with reasoner("model:=tiny-random", "service_name:=/t/ask_pr", ns="/pr") as proc:
        proc.wait_for_output("stllm reasoner up", timeout=180)
        set_params = ros.node.create_client(SetParameters, "/pr/stllm_reasoner/set_parameters")
        change = ros.node.create_client(ChangeState, "/pr/stllm_reasoner/change_state")
        get_state = ros.node.create_client(GetState, "/pr/stllm_reasoner/get_state")
        for c in (set_params, change, get_state):
            ros.wait_for_service(c)

        def set_temperature(value: float):
            p = Parameter(name="temperature", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE,
                                                                   double_value=value))
            return ros.call(set_params, SetParameters.Request(parameters=[p]), timeout=60).results[0]

        res = set_temperature(0.7)
        assert not res.successful and "cleanup" in res.reason and "temperature" in res.reason, res.reason
        for tid, state in ((Transition.TRANSITION_DEACTIVATE, State.PRIMARY_STATE_INACTIVE),
                           (Transition.TRANSITION_CLEANUP, State.PRIMARY_STATE_UNCONFIGURED)):
            ros.call(change, ChangeState.Request(transition=Transition(id=tid)), timeout=60)
            assert ros.call(get_state, GetState.Request(), timeout=60).current_state.id == state
        assert set_temperature(0.7).successful
        ros.call(change, ChangeState.Request(transition=Transition(id=Transition.TRANSITION_CONFIGURE)), timeout=180)
        assert ros.call(get_state, GetState.Request(), timeout=60).current_state.id == State.PRIMARY_STATE_INACTIVE
        assert proc.returncode is None, proc.output[-3000:]


def test_in_a_robot_namespace_names_params_file_and_prefixed_frames_follow(ros, tmp_path):
    """As under a launch file's PushRosNamespace (which passes __ns): the relative default names resolve in the
    robot's namespace, the `/**:`-keyed parameters file applies there, and a prefixed world frame is accepted."""
    params = tmp_path / "robot1.yaml"
    params.write_text("/**:\n  ros__parameters:\n    model: tiny-random\n    max_question_chars: 20\n"
                      "    perception:\n      world_frame: robot1/map\n")
    with NodeProcess.python("stllm_ros.reasoner_node", "--ros-args", "-r", "__ns:=/robot1", "--params-file",
                            str(params)) as proc:
        proc.wait_for_output("stllm reasoner up", timeout=180)
        client = ros.node.create_client(AskSTLLM, "/robot1/stllm/ask")
        ros.wait_for_service(client)
        assert "maximum is 20" in ask(ros, client, "x" * 21).error  # the params file applied in /robot1
        assert "no camera frames" in ask(ros, client, "Where is the mug?").error  # configured: world robot1/map
        wait_until(lambda: ros.node.count_publishers("/robot1/stllm/answers") == 1
                   and ros.node.count_subscribers("/robot1/camera/color/image_raw") == 1, 30,
                   what="the node's topics under /robot1")
        assert ros.node.count_subscribers("/tf") >= 1  # /tf stays global (frames carry the robot's prefix)
        assert proc.returncode is None, proc.output[-3000:]


def test_frames_stamped_ahead_of_the_node_clock_are_answered(ros):
    """A camera on another computer whose clock runs ahead (no time sync), or a bag whose /clock has not caught up
    with its images: the frame is the latest observation and is used (it was refused as "no camera frames in the last
    10 s" because its stamp lay after the node's now)."""
    import time

    import numpy as np
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from tf2_msgs.msg import TFMessage

    from stllm_ros import conversions as cv

    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    latched = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    with reasoner("model:=tiny-random", "perception.sensor_qos:=reliable", ns="/skew") as proc:
        proc.wait_for_output("stllm reasoner up", timeout=180)
        client = ros.node.create_client(AskSTLLM, "/skew/stllm/ask")
        ros.wait_for_service(client)
        image = ros.node.create_publisher(Image, "/skew/camera/color/image_raw", reliable)
        info = ros.node.create_publisher(CameraInfo, "/skew/camera/color/camera_info", reliable)
        static = ros.node.create_publisher(TFMessage, "/tf_static", latched)
        wait_until(lambda: image.get_subscription_count() > 0 and info.get_subscription_count() > 0, 60,
                   what="the reasoner's camera subscriptions")
        static.publish(TFMessage(transforms=[cv.transform_to_msg("map", "skew_cam", 0.0, np.zeros(3),
                                                                 np.array([0, 0, 0, 1.0]))]))
        ahead = time.time() + 30.0  # the camera's clock is 30 s ahead of this machine's
        info.publish(cv.K_to_camera_info(np.diag([50.0, 50.0, 1.0]), 64, 48, ahead, "skew_cam"))
        time.sleep(0.5)
        image.publish(cv.numpy_to_image(np.full((48, 64, 3), 120, np.uint8), "rgb8", ahead, "skew_cam"))
        deadline = time.monotonic() + 20  # well before this machine's clock reaches the frame's stamp
        while True:
            res = ask(ros, client, "Where did I put the mug?", max_new_tokens=4)
            if res.success or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert res.success and res.num_frames == 1, res.error
        assert proc.returncode is None
    assert "ahead of this node's clock" in proc.output  # said once, with what to check
