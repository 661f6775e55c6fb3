"""TransformBuffer: interpolation, chains through the tree, typed errors, cache horizon, bad input, threads.
If tf2_ros (BufferCore) is importable, lookups are compared with it."""

import logging
import math
import threading

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from stllm_core.errors import InputError, STLLMError
from stllm_core.geometry.poses import make_transform
from stllm_core.memory import (
    DisconnectedError,
    ExtrapolationError,
    TransformBuffer,
    TransformLookupError,
    UnknownFrameError,
)

ID = [0.0, 0.0, 0.0, 1.0]


def yaw(deg: float) -> np.ndarray:
    return Rotation.from_euler("z", deg, degrees=True).as_quat()


def robot() -> TransformBuffer:
    """map -> odom (static, +1 m x) -> base (moves 1 m/s along x, yaws 90 deg/s over 0..2 s) -> cam (static)."""
    buf = TransformBuffer(cache_sec=10.0)
    buf.set_transform("map", "odom", 0.0, [1.0, 0.0, 0.0], ID, static=True)
    for t in (0.0, 1.0, 2.0):
        buf.set_transform("odom", "base", t, [t, 0.0, 0.0], yaw(90.0 * t))
    buf.set_transform("base", "cam", 0.0, [0.5, 0.0, 0.2], ID, static=True)
    return buf


def test_interpolated_pose_between_samples():
    buf = robot()
    T = buf.lookup("odom", "base", 0.5)
    np.testing.assert_allclose(T[:3, 3], [0.5, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(Rotation.from_matrix(T[:3, :3]).as_euler("xyz", degrees=True), [0, 0, 45], atol=1e-9)
    # on a sample exactly
    np.testing.assert_allclose(buf.lookup("odom", "base", 2.0)[:3, 3], [2.0, 0.0, 0.0], atol=1e-12)


def test_chained_frames_and_inverse_direction():
    buf = robot()
    # at t = 1: base at odom (1, 0, 0) yawed 90 deg; cam 0.5 m ahead of base -> odom (1, 0.5, 0.2) -> map (2, 0.5, 0.2)
    T = buf.lookup("map", "cam", 1.0)
    np.testing.assert_allclose(T[:3, 3], [2.0, 0.5, 0.2], atol=1e-12)
    expected = make_transform([1, 0, 0], ID) @ make_transform([1, 0, 0], yaw(90)) @ make_transform([0.5, 0, 0.2], ID)
    np.testing.assert_allclose(T, expected, atol=1e-12)
    np.testing.assert_allclose(buf.lookup("cam", "map", 1.0), np.linalg.inv(expected), atol=1e-12)
    # siblings: two sensors under base, common ancestor is base (time-independent)
    buf.set_transform("base", "lidar", 0.0, [0.0, 0.0, 1.0], ID, static=True)
    np.testing.assert_allclose(buf.lookup("cam", "lidar", 1.5)[:3, 3], [-0.5, 0.0, 0.8], atol=1e-12)
    assert buf.lookup("cam", "cam", 1.0).tolist() == np.eye(4).tolist()
    # stamp=None: the latest time all dynamic edges on the path have (t = 2)
    np.testing.assert_allclose(buf.lookup("map", "base")[:3, 3], [3.0, 0.0, 0.0], atol=1e-12)


def test_extrapolation_and_tolerance():
    buf = robot()
    np.testing.assert_allclose(buf.lookup("odom", "base", 2.05, tolerance=0.1)[:3, 3], [2.0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(buf.lookup("odom", "base", -0.05, tolerance=0.1)[:3, 3], [0.0, 0, 0], atol=1e-12)
    with pytest.raises(ExtrapolationError, match=r"odom -> base at 2\.500000 s would extrapolate 0\.500000 s after"):
        buf.lookup("map", "cam", 2.5, tolerance=0.1)
    with pytest.raises(ExtrapolationError, match="before the first sample"):
        buf.lookup("map", "cam", -1.0)
    # static-only paths work at any time
    np.testing.assert_allclose(buf.lookup("base", "cam", 1e9)[:3, 3], [0.5, 0.0, 0.2])
    assert not buf.can_transform("map", "cam", 5.0)
    assert buf.can_transform("map", "cam", 1.5)
    assert buf.counters()["lookup_extrapolation"] == 2  # can_transform does not count


def test_unknown_and_disconnected_errors_are_typed():
    buf = robot()
    buf.set_transform("world", "other_robot", 0.0, [0, 0, 0], ID, static=True)
    with pytest.raises(UnknownFrameError, match="unknown frame 'nope'; known frames: base, cam, "):
        buf.lookup("map", "nope", 1.0)
    with pytest.raises(DisconnectedError, match=r"'other_robot' into 'cam'.*roots 'world' and 'map'"):
        buf.lookup("cam", "other_robot", 1.0)
    for cls in (UnknownFrameError, DisconnectedError, ExtrapolationError):
        assert issubclass(cls, LookupError) and issubclass(cls, STLLMError) and issubclass(cls, TransformLookupError)
    with pytest.raises(UnknownFrameError, match=r"\(none: no transform received\)"):
        TransformBuffer().lookup("map", "base", 0.0)


def test_out_of_order_duplicates_and_cache_horizon():
    buf = TransformBuffer(cache_sec=5.0)
    for t in (0.0, 2.0, 1.0):  # 1.0 arrives late: inserted in place
        buf.set_transform("odom", "base", t, [t * 10.0, 0.0, 0.0], ID)
    np.testing.assert_allclose(buf.lookup("odom", "base", 1.5)[:3, 3], [15.0, 0, 0], atol=1e-12)
    buf.set_transform("odom", "base", 1.0, [100.0, 0.0, 0.0], ID)  # duplicate stamp replaces
    np.testing.assert_allclose(buf.lookup("odom", "base", 1.0)[:3, 3], [100.0, 0, 0], atol=1e-12)
    c = buf.counters()
    assert c["out_of_order"] == 1 and c["duplicate_replaced"] == 1
    for t in np.arange(3.0, 10.01, 1.0):
        buf.set_transform("odom", "base", float(t), [t * 10.0, 0.0, 0.0], ID)
    assert buf.time_range("base") == (5.0, 10.0)  # newest - cache_sec
    with pytest.raises(ExtrapolationError, match=r"samples cover 5\.000000 \.\. 10\.000000"):
        buf.lookup("odom", "base", 4.0, tolerance=0.1)
    buf.set_transform("odom", "base", 1.0, [0.0, 0.0, 0.0], ID)  # behind the horizon: ignored, counted
    assert buf.counters()["older_than_cache"] == 1 and buf.time_range("base") == (5.0, 10.0)


def test_bad_input_is_refused_counted_and_leaves_the_buffer_unchanged():
    buf = robot()
    before = buf.lookup("map", "cam", 1.0)
    bad = [
        (("odom", "base", 1.0, [0, 0, 0], [float("nan"), 0, 0, 1]), "bad_quaternion", "non-finite"),
        (("odom", "base", 1.0, [0, 0, 0], [0, 0, 0, 3.0]), "bad_quaternion", "not normalised"),
        (("odom", "base", 1.0, [0, float("nan"), 0], ID), "bad_translation", "non-finite"),
        (("odom", "base", float("inf"), [0, 0, 0], ID), "bad_stamp", "finite"),
        (("", "base", 1.0, [0, 0, 0], ID), "bad_frame_id", "non-empty"),
        (("base", "base", 1.0, [0, 0, 0], ID), "bad_frame_id", "own parent"),
        (("cam", "odom", 1.0, [0, 0, 0], ID), "cycle", "cycle"),
    ]
    for args, cause, words in bad:
        before_count = buf.counters().get(cause, 0)
        with pytest.raises(InputError, match=words):
            buf.set_transform(*args)
        assert buf.counters()[cause] == before_count + 1, cause
    c = buf.counters()
    assert (c["bad_quaternion"], c["bad_translation"], c["bad_stamp"], c["bad_frame_id"], c["cycle"]) == (2, 1, 1, 2, 1)
    np.testing.assert_array_equal(buf.lookup("map", "cam", 1.0), before)
    assert buf.parent("odom") == "map"


def reparenting_samples(connected: bool = True) -> list[tuple]:
    """c moves under A (x = t) for t = 0..4, then under B (y = t) for t = 5..8; A and B hang off world (static).
    (parent, child, stamp, translation, quaternion, static) rows."""
    rows = [("world", "A", 0.0, [1.0, 0.0, 0.0], ID, True), ("world", "B", 0.0, [0.0, 2.0, 0.0], yaw(90.0), True)]
    rows = rows if connected else []
    rows += [("A", "c", float(t), [float(t), 0.0, 0.0], ID, False) for t in range(5)]
    return rows + [("B", "c", float(t), [0.0, float(t), 0.0], ID, False) for t in range(5, 9)]


def reparented(connected: bool = True) -> TransformBuffer:
    buf = TransformBuffer(cache_sec=20.0)
    for parent, child, t, tr, q, static in reparenting_samples(connected):
        buf.set_transform(parent, child, t, tr, q, static=static)
    return buf


def test_reparented_frame_keeps_its_history_each_sample_with_its_parent(caplog):
    with caplog.at_level(logging.WARNING, logger="stllm_core.memory.transforms"):
        buf = reparented(connected=False)
    # before the change c is found through A (interpolated), after it through B: the parent valid at the stamp
    np.testing.assert_allclose(buf.lookup("A", "c", 2.0)[:3, 3], [2.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(buf.lookup("A", "c", 2.5)[:3, 3], [2.5, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(buf.lookup("B", "c", 7.0)[:3, 3], [0.0, 7.0, 0.0], atol=1e-12)
    assert (buf.parent("c", 2.0), buf.parent("c", 7.0), buf.parent("c")) == ("A", "B", "B")
    # between samples of different parents nothing is interpolated: the earlier sample holds (as tf2's getData)
    np.testing.assert_allclose(buf.lookup("A", "c", 4.5)[:3, 3], [4.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(buf.lookup("B", "c", 5.0)[:3, 3], [0.0, 5.0, 0.0], atol=1e-12)
    # A and B are separate trees here: c at 7 is not in A's tree, at 2 not in B's
    with pytest.raises(DisconnectedError, match=r"'c' into 'A' at 7\.000000 s"):
        buf.lookup("A", "c", 7.0)
    with pytest.raises(DisconnectedError):
        buf.lookup("B", "c", 2.0)
    assert buf.frames() == ["A", "B", "c"] and buf.time_range("c") == (0.0, 8.0)
    assert buf.counters()["parent_change"] == 1
    assert sum("changed parent from 'A' to 'B' at 5.000000 s" in r.message for r in caplog.records) == 1


def test_reparented_frame_resolves_through_the_tree_when_parents_are_connected(caplog):
    buf = reparented(connected=True)
    T_world_A, T_world_B = make_transform([1, 0, 0], ID), make_transform([0, 2, 0], yaw(90.0))
    # at 7 the path is c -> B -> world -> A; at 2 it is c -> A (and the reverse direction through world)
    expected_7 = np.linalg.inv(T_world_A) @ T_world_B @ make_transform([0, 7, 0], ID)
    np.testing.assert_allclose(buf.lookup("A", "c", 7.0), expected_7, atol=1e-12)
    np.testing.assert_allclose(
        buf.lookup("B", "c", 2.0), np.linalg.inv(T_world_B) @ T_world_A @ make_transform([2, 0, 0], ID), atol=1e-12
    )
    np.testing.assert_allclose(buf.lookup("world", "c", 2.0)[:3, 3], [3.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(buf.lookup("world", "c", 7.0)[:3, 3], [-7.0, 2.0, 0.0], atol=1e-12)
    latest = np.linalg.inv(T_world_A) @ T_world_B @ make_transform([0, 8, 0], ID)  # t = 8, through B
    np.testing.assert_allclose(buf.lookup("A", "c"), latest, atol=1e-12)
    np.testing.assert_allclose(buf.lookup("A", "c", 0), latest, atol=1e-12)
    # a late sample relative to the old parent is inserted in place; it is no parent change
    buf.set_transform("A", "c", 3.5, [30.0, 0.0, 0.0], ID)
    np.testing.assert_allclose(buf.lookup("A", "c", 3.5)[:3, 3], [30.0, 0.0, 0.0], atol=1e-12)
    assert buf.counters()["parent_change"] == 1 and buf.counters()["out_of_order"] == 1
    # and back and forth: every change is counted, warned once per frame
    with caplog.at_level(logging.WARNING, logger="stllm_core.memory.transforms"):
        buf.set_transform("A", "c", 9.0, [9.0, 0.0, 0.0], ID)
        buf.set_transform("B", "c", 10.0, [0.0, 10.0, 0.0], ID)
    assert buf.counters()["parent_change"] == 3 and buf.parent("c") == "B" and buf.parent("c", 9.5) == "A"
    assert sum("changed parent" in r.message for r in caplog.records) == 1
    # the cycle check (current tree) still holds
    with pytest.raises(InputError, match="cycle"):
        buf.set_transform("c", "B", 11.0, [0, 0, 0], ID)


def test_a_loop_through_older_parents_is_a_lookup_error_not_a_hang():
    buf = reparented(connected=False)
    buf.set_transform("c", "A", 8.0, [0.0, 0.0, 0.0], ID)  # allowed: c hangs off B now; but at t = 2, c was under A
    with pytest.raises(TransformLookupError, match=r"loop at 2\.000000 s.*c -> A -> c"):
        buf.lookup("B", "c", 2.0)
    assert buf.counters()["lookup_loop"] == 1
    np.testing.assert_allclose(buf.lookup("B", "A", 8.0)[:3, 3], [0.0, 8.0, 0.0], atol=1e-12)


def test_stamp_zero_means_latest_like_none():
    buf = robot()  # dynamic samples at 0, 1, 2: stamp 0 is "latest" (t = 2), never the sample at 0.0
    latest = buf.lookup("map", "cam", None)
    np.testing.assert_allclose(latest, buf.lookup("map", "cam", 2.0), atol=1e-12)
    for zero in (0, 0.0, np.float64(0.0), -0.0):
        np.testing.assert_array_equal(buf.lookup("map", "cam", zero), latest)
    np.testing.assert_allclose(buf.lookup("map", "base", 0.0)[:3, 3], [3.0, 0.0, 0.0], atol=1e-12)
    assert buf.latest_common_time("map", "cam") == 2.0 and buf.latest_common_time("base", "cam") == 0.0
    # the latest COMMON time: the oldest newest sample on the path
    buf.set_transform("base", "arm", 1.5, [0.0, 0.0, 1.0], ID)
    assert buf.latest_common_time("map", "arm") == 1.5
    np.testing.assert_allclose(buf.lookup("arm", "map", 0), buf.lookup("arm", "map", 1.5), atol=1e-12)
    # data far from t = 0: a literal 0 would extrapolate; 0 = latest works, for lookup and can_transform
    late = TransformBuffer()
    late.set_transform("map", "cam", 100.0, [1.0, 0.0, 0.0], ID)
    late.set_transform("map", "cam", 101.0, [2.0, 0.0, 0.0], ID)
    assert late.can_transform("map", "cam", 0) and late.can_transform("map", "cam", 0.0)
    np.testing.assert_allclose(late.lookup("map", "cam", 0.0)[:3, 3], [2.0, 0.0, 0.0], atol=1e-12)
    assert late.parent("cam", 0) == "map" and not late.can_transform("map", "cam", 50.0)
    with pytest.raises(UnknownFrameError):
        late.lookup("map", "nope", 0)


def test_nearly_unit_quaternion_of_a_static_transform_is_accepted_and_gives_poses():
    """static_transform_publisher with rounded components: (0, 0, 0.706, 0.706), |q| = 0.9984 (tf2 accepts it)."""
    buf = TransformBuffer()
    buf.set_transform("base", "cam", 0.0, [0.1, 0.0, 0.0], [0.0, 0.0, 0.706, 0.706], static=True)
    assert buf.counters() == {"static_set": 1}
    T = buf.lookup("base", "cam", 123.0)
    np.testing.assert_allclose(T, make_transform([0.1, 0.0, 0.0], yaw(90.0)), atol=1e-12)  # renormalised
    np.testing.assert_allclose(buf.lookup("cam", "base", 0)[:3, 3], [0.0, 0.1, 0.0], atol=1e-12)
    with pytest.raises(InputError, match=r"not normalised: \|q\|\^2 = 0\.98 \(tf2 allows 1 \+- 0\.01\)"):
        buf.set_transform("base", "cam2", 0.0, [0, 0, 0], [0.0, 0.0, 0.7, 0.7], static=True)  # |q|^2 = 0.98


def test_out_of_order_samples_give_the_same_lookups_as_in_order():
    rng = np.random.default_rng(1)
    edges = {("odom", "base"): np.arange(0.0, 5.01, 0.25), ("base", "arm"): np.arange(0.1, 5.0, 0.3)}
    samples = [
        (parent, child, float(t), rng.normal(size=3), Rotation.random(random_state=rng).as_quat())
        for (parent, child), stamps in edges.items()
        for t in stamps
    ]
    in_order, shuffled = TransformBuffer(cache_sec=10.0), TransformBuffer(cache_sec=10.0)
    for buf in (in_order, shuffled):
        buf.set_transform("map", "odom", 0.0, [1.0, 2.0, 3.0], yaw(30.0), static=True)
    for parent, child, t, tr, q in samples:
        in_order.set_transform(parent, child, t, tr, q)
    for k in rng.permutation(len(samples)):
        parent, child, t, tr, q = samples[k]
        shuffled.set_transform(parent, child, t, tr, q)
    assert shuffled.counters()["out_of_order"] > 10 and "out_of_order" not in in_order.counters()
    assert shuffled.time_range("base") == in_order.time_range("base") and shuffled.stats()["samples"] == len(samples)
    for target, source in [("map", "arm"), ("arm", "odom"), ("base", "arm")]:
        for t in [None, 0.0, *np.linspace(0.1, 4.9, 25)]:
            np.testing.assert_array_equal(shuffled.lookup(target, source, t), in_order.lookup(target, source, t))


def test_static_dynamic_switch_and_clear():
    buf = robot()
    buf.set_transform("map", "odom", 3.0, [2.0, 0.0, 0.0], ID)  # static edge becomes dynamic
    assert not buf.is_static("odom")
    np.testing.assert_allclose(buf.lookup("map", "odom", 3.0)[:3, 3], [2.0, 0, 0])
    buf.clear()  # dynamic history gone, static kept
    assert buf.parent("cam") == "base" and buf.parent("base") is None
    assert buf.stats()["dynamic_edges"] == 0


def test_concurrent_writers_and_readers_never_see_a_wrong_pose():
    """A writer adds samples of x = t while readers look up; every successful lookup is exactly x = t."""
    buf = TransformBuffer(cache_sec=1000.0)
    buf.set_transform("odom", "base", 0.0, [0.0, 0.0, 0.0], ID)
    errors, lookups = [], [0]
    stop = threading.Event()

    def writer():
        for i in range(1, 2000):
            buf.set_transform("odom", "base", i * 0.01, [i * 0.01, 0.0, 0.0], ID)
        stop.set()

    def reader():
        rng = np.random.default_rng(threading.get_ident() % 1000)
        done = 0
        while not stop.is_set() or done < 500:  # also after the writer: it may finish before a reader starts
            done += 1
            t = float(rng.uniform(0, 20))
            try:
                x = buf.lookup("odom", "base", t, tolerance=0.0)[0, 3]
            except ExtrapolationError:
                continue
            lookups[0] += 1
            if not math.isclose(x, t, abs_tol=1e-9):
                errors.append((t, x))

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors and lookups[0] > 0
    assert buf.counters()["dynamic_set"] == 2000


def test_same_lookups_as_tf2_buffer_core():
    tf2_ros = pytest.importorskip("tf2_ros", exc_type=ImportError)
    from builtin_interfaces.msg import Time
    from geometry_msgs.msg import TransformStamped

    core = tf2_ros.BufferCore()  # no node, no rclpy.init
    ours = TransformBuffer(cache_sec=10.0)
    rng = np.random.default_rng(0)
    edges = [("map", "odom", True), ("odom", "base", False), ("base", "cam", True), ("base", "arm", False)]
    for parent, child, static in edges:
        for t in [0.0] if static else [0.0, 0.5, 1.0, 1.5, 2.0]:
            trans = rng.normal(size=3)
            q = Rotation.random(random_state=rng).as_quat()
            msg = TransformStamped()
            msg.header.frame_id, msg.child_frame_id = parent, child
            msg.header.stamp = Time(sec=int(t), nanosec=int(round((t % 1) * 1e9)))
            msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = trans.tolist()
            r = msg.transform.rotation
            r.x, r.y, r.z, r.w = q.tolist()
            (core.set_transform_static if static else core.set_transform)(msg, "test")
            ours.set_transform(parent, child, t, trans, q, static=static)
    for target, source in [("map", "cam"), ("cam", "arm"), ("arm", "odom")]:
        for t in (0.25, 1.0, 1.7):
            ts = core.lookup_transform_core(target, source, Time(sec=int(t), nanosec=int(round((t % 1) * 1e9))))
            tr, rot = ts.transform.translation, ts.transform.rotation
            expected = make_transform([tr.x, tr.y, tr.z], [rot.x, rot.y, rot.z, rot.w])
            np.testing.assert_allclose(ours.lookup(target, source, t), expected, atol=1e-9)


def test_reparenting_and_stamp_zero_match_tf2_buffer_core():
    tf2_ros = pytest.importorskip("tf2_ros", exc_type=ImportError)
    from builtin_interfaces.msg import Time
    from geometry_msgs.msg import TransformStamped

    def stamp(t: float) -> Time:
        return Time(sec=int(t), nanosec=int(round((t % 1) * 1e9)))

    core, ours = tf2_ros.BufferCore(), reparented(connected=True)
    for parent, child, t, tr, q, static in reparenting_samples(connected=True):
        msg = TransformStamped()
        msg.header.frame_id, msg.child_frame_id, msg.header.stamp = parent, child, stamp(t)
        msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = map(float, tr)
        r = msg.transform.rotation
        r.x, r.y, r.z, r.w = map(float, q)
        (core.set_transform_static if static else core.set_transform)(msg, "test")
    for target, source in [("A", "c"), ("B", "c"), ("world", "c"), ("c", "A")]:
        for t in (0.0, 2.0, 2.5, 4.5, 5.0, 7.0, 7.5):  # 0 = latest in both
            ts = core.lookup_transform_core(target, source, stamp(t))
            tr, rot = ts.transform.translation, ts.transform.rotation
            expected = make_transform([tr.x, tr.y, tr.z], [rot.x, rot.y, rot.z, rot.w])
            np.testing.assert_allclose(ours.lookup(target, source, t), expected, atol=1e-9)
