"""Rigid poses: quaternion <-> matrix, validation, inversion, interpolation, and the camera frame conventions.

Conventions
-----------
- Quaternions are (x, y, z, w), as geometry_msgs/Quaternion and scipy's ``Rotation.from_quat`` use them.
- A pose ``T_a_b`` is a (4, 4) float64 homogeneous matrix that maps points from frame ``b`` into frame ``a``:
  ``p_a = T_a_b @ p_b``. Translations are metres.
- REP-103 body frames: x forward, y left, z up (``base_link``, ``map``, ``odom``).
- The OpenCV optical frame of a camera (``*_optical_frame``): x right, y down, z forward (into the scene).
- REP-105: ``map`` -> ``odom`` -> ``base_link`` -> sensors; keyframe poses are world-from-camera (optical frame).

Example: the camera body frame looks along +x; its optical frame looks along +z. A point 2 m straight ahead is
``(2, 0, 0)`` in the body frame and ``(0, 0, 2)`` in the optical frame:
``T_BODY_OPTICAL @ [0, 0, 2, 1] == [2, 0, 0, 1]``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from stllm_core.errors import InputError

# tf2's rule (BufferCore::setTransform): a quaternion is accepted, and normalised, when |q|^2 is within 0.01 of 1,
# and refused otherwise. The one tolerance for every transform this package takes in (messages, bags, the buffer).
QUAT_NORM2_TOLERANCE = 1e-2

# Rotation of the optical frame (x right, y down, z forward) expressed in the body frame (x forward, y left, z up):
# the columns are the optical axes in body coordinates.
R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
T_BODY_OPTICAL = np.eye(4)
T_BODY_OPTICAL[:3, :3] = R_BODY_OPTICAL
T_OPTICAL_BODY = T_BODY_OPTICAL.T.copy()  # a pure rotation: the inverse is the transpose
# The same rotation as a quaternion (x, y, z, w) = (-0.5, 0.5, -0.5, 0.5), the usual `*_optical_frame` static TF.
Q_BODY_OPTICAL = np.array([-0.5, 0.5, -0.5, 0.5])


def validate_quaternion(q, name: str = "quaternion", tolerance: float = QUAT_NORM2_TOLERANCE) -> np.ndarray:
    """Return `q` (x, y, z, w) as a unit float64 (4,) array.

    Raises InputError naming `name` and the value when `q` is not 4 finite numbers or |q|^2 is further than
    `tolerance` from 1, as tf2 does (a nearly-unit quaternion is renormalised: `static_transform_publisher` with
    rounded components, e.g. (0, 0, 0.706, 0.706) with |q| = 0.9984, is accepted as tf2 and RViz accept it).
    """
    a = np.asarray(q, dtype=np.float64)
    if a.shape != (4,):
        raise InputError(f"{name} must be 4 numbers (x, y, z, w); got shape {a.shape}: {q!r}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} has non-finite components: {a.tolist()}")
    norm2 = float(a @ a)
    if abs(norm2 - 1.0) > tolerance:
        raise InputError(f"{name} is not normalised: |q|^2 = {norm2:.6g} (tf2 allows 1 +- {tolerance:g}): {a.tolist()}")
    return a / math.sqrt(norm2)


def validate_translation(t, name: str = "translation") -> np.ndarray:
    """Return `t` as a finite float64 (3,) array (metres) or raise InputError naming `name`."""
    a = np.asarray(t, dtype=np.float64)
    if a.shape != (3,):
        raise InputError(f"{name} must be 3 numbers (x, y, z) in metres; got shape {a.shape}: {t!r}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} has non-finite components: {a.tolist()}")
    return a


def quat_to_matrix(q) -> np.ndarray:
    """(x, y, z, w) quaternion -> (3, 3) rotation matrix. The quaternion is validated (see validate_quaternion)."""
    return unit_quat_to_matrix(validate_quaternion(q))


def matrix_to_quat(R) -> np.ndarray:
    """(3, 3) rotation matrix -> unit (x, y, z, w) quaternion with w >= 0 (the canonical one of the two)."""
    q = Rotation.from_matrix(np.asarray(R, dtype=np.float64)).as_quat()
    return -q if q[3] < 0 else q


def make_transform(translation, quaternion_xyzw) -> np.ndarray:
    """Build the (4, 4) float64 pose from a translation (3,) in metres and an (x, y, z, w) quaternion."""
    T = np.eye(4)
    T[:3, :3] = quat_to_matrix(quaternion_xyzw)
    T[:3, 3] = validate_translation(translation)
    return T


def split_transform(T) -> tuple[np.ndarray, np.ndarray]:
    """(4, 4) pose -> (translation (3,), quaternion (x, y, z, w) (4,))."""
    T = np.asarray(T, dtype=np.float64)
    return T[:3, 3].copy(), matrix_to_quat(T[:3, :3])


def is_rigid(T, atol: float = 1e-6) -> bool:
    """True when `T` is a finite (4, 4) rigid transform: orthonormal rotation with det +1, last row 0 0 0 1."""
    T = np.asarray(T)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        return False
    R = T[:3, :3].astype(np.float64)
    return bool(
        np.allclose(T[3], [0.0, 0.0, 0.0, 1.0], atol=atol)
        and np.allclose(R @ R.T, np.eye(3), atol=atol)
        and abs(np.linalg.det(R) - 1.0) <= atol * 10
    )


def check_rigid(T, name: str = "pose", atol: float = 1e-6) -> np.ndarray:
    """Return `T` as float64 (4, 4) or raise InputError naming `name` when it is not a rigid transform."""
    if not is_rigid(T, atol):
        raise InputError(f"{name} is not a finite 4x4 rigid transform: {np.asarray(T).tolist()!r}")
    return np.asarray(T, dtype=np.float64)


def invert(T) -> np.ndarray:
    """Inverse of a rigid (4, 4) transform, computed as [R^T, -R^T t] (exact for rigid input, no matrix inverse)."""
    T = np.asarray(T, dtype=np.float64)
    out = np.eye(4)
    Rt = T[:3, :3].T
    out[:3, :3] = Rt
    out[:3, 3] = -Rt @ T[:3, 3]
    return out


def interpolate(T0, T1, alpha: float) -> np.ndarray:
    """Pose at fraction `alpha` (0 -> T0, 1 -> T1): translation linear, rotation spherical-linear (scipy Slerp).

    Example: halfway between the identity and a 90 degree yaw with 2 m of x travel is a 45 degree yaw at x = 1 m.
    """
    T0 = np.asarray(T0, dtype=np.float64)
    T1 = np.asarray(T1, dtype=np.float64)
    out = np.eye(4)
    out[:3, 3] = (1.0 - alpha) * T0[:3, 3] + alpha * T1[:3, 3]
    out[:3, :3] = interpolate_rotation(T0[:3, :3], T1[:3, :3], alpha)
    return out


def interpolate_rotation(R0, R1, alpha: float) -> np.ndarray:
    """Slerp between two (3, 3) rotations at fraction `alpha` in [0, 1] (shortest arc)."""
    if alpha <= 0.0:
        return np.asarray(R0, dtype=np.float64).copy()
    if alpha >= 1.0:
        return np.asarray(R1, dtype=np.float64).copy()
    slerp = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([R0, R1])))
    return slerp([alpha]).as_matrix()[0]


def slerp_quaternion(q0, q1, alpha: float) -> np.ndarray:
    """Spherical-linear interpolation of unit (x, y, z, w) quaternions along the shortest arc, in plain numpy.

    Same result as scipy's ``Slerp`` (tested to 1e-12) at about 1/50 of its per-call cost, which matters for
    per-message TF lookups. Nearly equal quaternions fall back to normalised linear interpolation.
    """
    q0 = np.asarray(q0, dtype=np.float64)
    q1 = np.asarray(q1, dtype=np.float64)
    d = float(q0 @ q1)
    if d < 0.0:  # q and -q are the same rotation: take the short way
        q1, d = -q1, -d
    if d > 0.9999995:
        q = q0 + alpha * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = math.acos(d)
    s = math.sin(theta)
    return (math.sin((1.0 - alpha) * theta) / s) * q0 + (math.sin(alpha * theta) / s) * q1


def unit_quat_to_matrix(q) -> np.ndarray:
    """(3, 3) rotation of an already-unit (x, y, z, w) quaternion in plain numpy (no validation: quat_to_matrix)."""
    x, y, z, w = (float(c) for c in q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def transform_points(T, points) -> np.ndarray:
    """Apply the (4, 4) pose `T_a_b` to (N, 3) points in frame b; returns (N, 3) float64 points in frame a."""
    T = np.asarray(T, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return p @ T[:3, :3].T + T[:3, 3]
