"""What a sensor_msgs/CameraInfo says about the images it describes, and the pinhole images the model needs.

The model's rays are pinhole rays from K (stllm_core.geometry.rays). A CameraInfo describes (as its message definition
and image_pipeline's image_proc define it):
- raw images (`image_raw`): intrinsics K, distorted by D under `distortion_model` ("plumb_bob", "rational_polynomial",
  "equidistant");
- rectified images (`image_rect`, image_proc's output): the projection P, no distortion.
`CameraModel.pinhole(rectified)` gives the intrinsics of pinhole images and the remap that makes them:
- rectified images: K = P[:3, :3] (K when P is unset), nothing to do;
- raw images whose D is zero (or empty): K as is, nothing to do (realsense-ros' colour and aligned depth, most sims);
- raw distorted images: undistorted by OpenCV (cv2.initUndistortRectifyMap, or cv2.fisheye for "equidistant") into
  new intrinsics P[:3, :3] (K when P is unset); colour is interpolated bilinearly, depth takes the nearest sample (a
  blend of two depths is a point in the air). The rectification rotation R (stereo pairs) is not applied: the
  undistorted image stays in the header's frame, whose pose TF gives.
The maps are built once per camera model and reused for every image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from stllm_core.errors import InputError

DISTORTION_MODELS = ("plumb_bob", "rational_polynomial", "equidistant")


@dataclass(frozen=True)
class CameraModel:
    width: int
    height: int
    K: tuple[float, ...]  # 9 values, row-major
    D: tuple[float, ...] = ()
    distortion_model: str = ""
    P: tuple[float, ...] = ()  # 12 values, row-major; () or zeros = unset

    @classmethod
    def from_arrays(cls, width: int, height: int, K, D=(), distortion_model: str = "", P=(),
                    where: str = "CameraInfo") -> CameraModel:
        """Check and build (InputError naming `where` and the value for a K, size, D or P that cannot be used)."""
        K = np.asarray(K, np.float64).ravel()
        if K.size != 9 or not np.all(np.isfinite(K)) or K[0] <= 0 or K[4] <= 0 or K[8] != 1.0:
            raise InputError(f"Got K={K.tolist()} in {where}; expected 9 finite values with fx, fy > 0 and K[2,2] = 1.")
        if int(width) <= 0 or int(height) <= 0:
            raise InputError(f"Got size {width}x{height} in {where}; expected width and height > 0.")
        D = np.asarray(D, np.float64).ravel()
        if not np.all(np.isfinite(D)):
            raise InputError(f"Got D={D.tolist()} in {where}; expected finite distortion coefficients.")
        P = np.asarray(P, np.float64).ravel()
        if P.size not in (0, 12) or not np.all(np.isfinite(P)):
            raise InputError(f"Got P={P.tolist()} in {where}; expected 12 finite values (or none).")
        if P.size and not P.any():
            P = P[:0]
        if P.size and (P[0] <= 0 or P[5] <= 0 or P[10] != 1.0):
            raise InputError(f"Got P={P.tolist()} in {where}; expected fx', fy' > 0 and P[2,2] = 1 (or all zeros).")
        model = str(distortion_model)
        if D.any() and model not in DISTORTION_MODELS:
            raise InputError(f"Got distortion_model {model!r} with non-zero D in {where}; supported: "
                             f"{', '.join(DISTORTION_MODELS)} (or a zero D).")
        return cls(int(width), int(height), tuple(K.tolist()), tuple(D.tolist()), model, tuple(P.tolist()))

    @property
    def distorted(self) -> bool:
        return any(self.D)

    def pinhole(self, rectified: bool = False) -> Pinhole:
        """The pinhole view of this camera's images: `rectified` = the images are image_proc's rectified ones."""
        return _pinhole(self, bool(rectified))


@dataclass(frozen=True, eq=False)
class Pinhole:
    """Turns the images of one camera model into pinhole images with intrinsics `K` (3, 3)."""

    K: np.ndarray
    maps: tuple[np.ndarray, np.ndarray] | None  # cv2.remap maps; None = the images are pinhole already

    def image(self, rgb: np.ndarray) -> np.ndarray:
        """A colour image (H, W, 3) uint8 of the camera model's size, undistorted when it needs it (bilinear)."""
        if self.maps is None:
            return rgb
        import cv2

        return cv2.remap(rgb, *self.maps, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    def depth(self, depth: np.ndarray) -> np.ndarray:
        """A depth image (H, W) float metres, NaN = none, undistorted when it needs it (nearest; outside = NaN)."""
        if self.maps is None:
            return depth
        import cv2

        return cv2.remap(depth.astype(np.float32, copy=False), *self.maps, interpolation=cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))


@functools.lru_cache(maxsize=16)
def _pinhole(model: CameraModel, rectified: bool) -> Pinhole:
    K = np.array(model.K, np.float64).reshape(3, 3)
    newK = np.array(model.P, np.float64).reshape(3, 4)[:, :3] if model.P else K
    if rectified:
        return Pinhole(_frozen(newK), None)
    if not model.distorted:
        return Pinhole(_frozen(K), None)
    import cv2

    size, D = (model.width, model.height), np.array(model.D, np.float64)
    if model.distortion_model == "equidistant":
        m1, m2 = cv2.fisheye.initUndistortRectifyMap(K, D[:4], np.eye(3), newK, size, cv2.CV_32FC1)
    else:
        m1, m2 = cv2.initUndistortRectifyMap(K, D, None, newK, size, cv2.CV_32FC1)
    return Pinhole(_frozen(newK), (m1, m2))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a
