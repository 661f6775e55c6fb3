"""stllm_core.geometry.poses: quaternion conventions, validation, inversion, interpolation, optical frame constants."""

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from stllm_core.errors import InputError
from stllm_core.geometry import poses


def test_quaternion_matrix_round_trip_uses_xyzw():
    q = np.array([0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)])  # 90 degrees about z
    R = poses.quat_to_matrix(q)
    np.testing.assert_allclose(R @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(poses.matrix_to_quat(R), q, atol=1e-12)
    # the canonical quaternion has w >= 0 even when -q is given
    np.testing.assert_allclose(poses.matrix_to_quat(poses.quat_to_matrix(-q)), q, atol=1e-12)


def test_quaternion_validation():
    with pytest.raises(InputError, match="non-finite"):
        poses.validate_quaternion([0.0, 0.0, float("nan"), 1.0])
    with pytest.raises(InputError, match=r"my_q is not normalised: \|q\|\^2 = 4"):
        poses.validate_quaternion([0.0, 0.0, 0.0, 2.0], name="my_q")
    with pytest.raises(InputError, match="4 numbers"):
        poses.validate_quaternion([0.0, 1.0])
    q = poses.validate_quaternion([0.0, 0.0, 0.0, 1.004])  # rounding in a message: renormalised
    np.testing.assert_allclose(q, [0.0, 0.0, 0.0, 1.0])
    # tf2's band, |q|^2 within 0.01 of 1: `static_transform_publisher ... 0 0 0.706 0.706` (|q| = 0.9984) is accepted
    # by tf2 and RViz, and here; |q|^2 = 0.9899 is refused by both
    np.testing.assert_allclose(poses.validate_quaternion([0, 0, 0.706, 0.706]), [0, 0, 2 ** -0.5, 2 ** -0.5])
    with pytest.raises(InputError, match="not normalised"):
        poses.validate_quaternion([0, 0, 0.0, 0.99494])
    with pytest.raises(InputError, match="translation"):
        poses.make_transform([0.0, float("inf"), 0.0], [0, 0, 0, 1])


def test_rigid_checks_and_inverse():
    T = poses.make_transform([1.0, 2.0, 3.0], Rotation.from_euler("xyz", [0.3, -0.2, 1.1]).as_quat())
    assert poses.is_rigid(T)
    np.testing.assert_allclose(poses.invert(T) @ T, np.eye(4), atol=1e-12)
    bad = T.copy()
    bad[0, 0] += 0.1
    assert not poses.is_rigid(bad)
    mirror = np.diag([1.0, 1.0, -1.0, 1.0])  # orthonormal but det -1
    assert not poses.is_rigid(mirror)
    nan = T.copy()
    nan[0, 3] = np.nan
    assert not poses.is_rigid(nan)
    with pytest.raises(InputError, match="T_x is not a finite 4x4 rigid"):
        poses.check_rigid(mirror, "T_x")
    t, q = poses.split_transform(T)
    np.testing.assert_allclose(poses.make_transform(t, q), T, atol=1e-12)


def test_interpolate_halfway_is_half_the_rotation_and_translation():
    T0 = np.eye(4)
    T1 = poses.make_transform([2.0, 0.0, 0.0], Rotation.from_euler("z", 90, degrees=True).as_quat())
    T = poses.interpolate(T0, T1, 0.5)
    np.testing.assert_allclose(T[:3, 3], [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(Rotation.from_matrix(T[:3, :3]).as_euler("xyz", degrees=True), [0, 0, 45], atol=1e-9)
    np.testing.assert_allclose(poses.interpolate(T0, T1, 0.0), T0)
    np.testing.assert_allclose(poses.interpolate(T0, T1, 1.0), T1)


def test_optical_frame_constants():
    # a point 2 m ahead: (0, 0, 2) in the optical frame is (2, 0, 0) in the body frame
    np.testing.assert_allclose(poses.T_BODY_OPTICAL @ [0, 0, 2, 1], [2, 0, 0, 1])
    # optical x (right) is body -y; optical y (down) is body -z
    np.testing.assert_allclose(poses.R_BODY_OPTICAL @ [1, 0, 0], [0, -1, 0])
    np.testing.assert_allclose(poses.R_BODY_OPTICAL @ [0, 1, 0], [0, 0, -1])
    np.testing.assert_allclose(poses.quat_to_matrix(poses.Q_BODY_OPTICAL), poses.R_BODY_OPTICAL, atol=1e-12)
    np.testing.assert_allclose(poses.T_OPTICAL_BODY @ poses.T_BODY_OPTICAL, np.eye(4), atol=1e-12)
    pts = poses.transform_points(poses.T_BODY_OPTICAL, [[0, 0, 2], [1, 0, 0]])
    np.testing.assert_allclose(pts, [[2, 0, 0], [0, -1, 0]], atol=1e-12)


def test_numpy_slerp_and_matrix_equal_scipy():
    from scipy.spatial.transform import Slerp

    rng = np.random.default_rng(0)
    rots = Rotation.random(40, random_state=rng)
    qs = rots.as_quat()
    for i in range(0, 40, 2):
        q0, q1 = qs[i], qs[i + 1]
        if i % 4 == 0:
            q1 = -q1  # the other sign of the same rotation: still the short arc
        for a in (0.0, 0.1, 0.5, 0.93, 1.0):
            ref = Slerp([0.0, 1.0], Rotation.from_quat([q0, q1]))([a]).as_matrix()[0]
            np.testing.assert_allclose(poses.unit_quat_to_matrix(poses.slerp_quaternion(q0, q1, a)), ref, atol=1e-12)
        np.testing.assert_allclose(poses.unit_quat_to_matrix(q0), Rotation.from_quat(q0).as_matrix(), atol=1e-15)
    q = qs[0]
    tiny = (Rotation.from_quat(q) * Rotation.from_rotvec([1e-5, 0, 0])).as_quat()  # nearly equal: nlerp branch
    mid = Rotation.from_quat(poses.slerp_quaternion(q, tiny, 0.5))
    np.testing.assert_allclose((Rotation.from_quat(q).inv() * mid).as_rotvec(), [5e-6, 0, 0], atol=1e-12)
