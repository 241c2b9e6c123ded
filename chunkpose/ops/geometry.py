"""Camera and rotation math, written once for every op, the pipeline and the networks.

- MIN_DEPTH: depths below it are "no measurement" everywhere (and upstream).
- backproject_into: ((u - cx) z / fx, (v - cy) z / fy, z) into given channels, zero where
  z < MIN_DEPTH, with the roundings of the csrc kernels (csrc/pixel_math.h: backproject),
  so the torch path and the kernels give the same floats.
- scaled_size / scale_intrinsics: an image resized by a factor the way FoundationPose's
  readers do it (sizes truncated, K's first two rows times the factor); validate_intrinsics.
- SO(3): skew, so3_exp (exact, or with pytorch3d's angle clamp that the upstream refiner
  update uses), so3_log, rotation_angle, look-at and in-plane rotations, make_pose.
All rotation functions take a leading batch axis and work in the tensor's dtype and device.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from chunkpose.errors import InputError

MIN_DEPTH = 0.001


# ----------------------------------------------------------------------------- camera
def backproject_into(channels, u: torch.Tensor, v: torch.Tensor, z: torch.Tensor, fx: float, fy: float,
                     cx: float, cy: float) -> None:
    """Write the camera-frame point of pixels (u, v) at depth z into ``channels``.

    Args:
        channels: (X, Y, Z) tensors (views of one output, e.g. out[..., 0], out[:, 1]) of z's
            shape, float32; written in place.
        u: pixel x coordinates broadcastable to z (float32; consumed: it may be changed).
        v: pixel y coordinates broadcastable to z (float32; consumed: it may be changed).
        z: depth in metres, float32; pixels with z < MIN_DEPTH get (0, 0, 0).
        fx: focal length in pixels, a Python float holding a float32 value (likewise fy).
        fy: focal length in pixels.
        cx: principal point x in pixels (likewise cy).
        cy: principal point y in pixels.

    Returns:
        None; X = (u - cx) z / fx, Y = (v - cy) z / fy, Z = z in metres.
    """
    X, Y, Z = channels
    torch.mul(u - cx, z, out=X)
    X.div_(fx)
    torch.mul(v - cy, z, out=Y)
    Y.div_(fy)
    Z.copy_(z)
    invalid = z < MIN_DEPTH
    for channel in channels:
        channel.masked_fill_(invalid, 0.0)


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(h, w) of an image of (height, width) resized by ``factor``: truncated, at least 1.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        factor: resize factor (e.g. 0.5).

    Returns:
        (h, w) ints in pixels.
    """
    return max(1, int(height * factor)), max(1, int(width * factor))


def scale_intrinsics(K, factor: float) -> np.ndarray:
    """K (3,3) of the image resized by ``factor``: the first two rows times the factor.

    Args:
        K: (3,3) camera matrix in pixels (array-like).
        factor: resize factor of both image axes.

    Returns:
        (3,3) float64 new array.
    """
    K = np.asarray(K, dtype=np.float64).copy()
    K[:2] *= float(factor)
    return K


def validate_intrinsics(K) -> np.ndarray:
    """K (3,3) camera matrix -> float64 copy, checked to be a usable pinhole K.

    Args:
        K: (3,3) numpy array, tensor or nested list [[fx,0,cx],[0,fy,cy],[0,0,1]] in pixels.

    Returns:
        (3,3) float64 numpy array.

    Raises:
        InputError: K is None, not (3,3), not numeric, not finite, has a non-positive focal length,
            or its last row is not [0, 0, 1].
    """
    if isinstance(K, torch.Tensor):
        K = K.detach().cpu().numpy()
    if K is None:
        raise InputError("K: got None; pass the 3x3 camera matrix")
    K = np.asarray(K)
    if K.shape != (3, 3):
        raise InputError(
            f"K: expected a 3x3 camera matrix [[fx,0,cx],[0,fy,cy],[0,0,1]], got shape {K.shape}"
            + ("; reshape the 9 values with K.reshape(3, 3)" if K.size == 9 else "")
        )
    if not np.issubdtype(K.dtype, np.number):
        raise InputError(f"K: expected numbers, got dtype {K.dtype}")
    K = K.astype(np.float64)
    if not np.all(np.isfinite(K)):
        raise InputError("K: contains NaN or inf; pass finite intrinsics")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise InputError(f"K: focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}")
    if not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise InputError(f"K: last row must be [0, 0, 1], got {K[2].tolist()}; pass a pinhole camera matrix")
    return K


# ----------------------------------------------------------------------------- SO(3)
def skew(v: torch.Tensor) -> torch.Tensor:
    """v (B,3) -> (B,3,3) cross-product matrices, skew(v) @ x == v x x.

    Args:
        v: (B,3) tensor, any float dtype.

    Returns:
        (B,3,3) tensor of v's dtype and device.
    """
    zero = torch.zeros_like(v[:, 0])
    x, y, z = v.unbind(-1)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(-1, 3, 3)


def so3_exp(w: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Axis-angle w (B,3) (angle = |w| radians) -> rotation matrices (B,3,3) (Rodrigues).

    Args:
        w: (B,3) axis-angle vectors in radians, float tensor.
        eps: None: exact, with Taylor expansions near zero. Given: pytorch3d's so3_exp_map,
            whose angle is sqrt(max(|w|^2, eps)), so below sqrt(eps) rad the coefficients are
            those of that angle; the upstream refiner's steps were trained and are applied that
            way (eps 1e-4).

    Returns:
        (B,3,3) rotation matrices of w's dtype and device.
    """
    theta2 = (w * w).sum(-1)
    W = skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand_as(W)
    if eps is not None:
        theta = theta2.clamp_min(eps).sqrt()
        a = torch.sin(theta) / theta
        b = (1 - torch.cos(theta)) / (theta * theta)
    else:
        theta = theta2.clamp_min(1e-20).sqrt()
        small = theta2 < 1e-8
        a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
        b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-20))
    return eye + a[:, None, None] * W + b[:, None, None] * (W @ W)


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices R (B,3,3) -> axis-angle (B,3), angle in [0, pi].

    Args:
        R: (B,3,3) rotation matrices, float tensor.

    Returns:
        (B,3) axis-angle vectors (norm = angle in radians) of R's dtype and device; near pi the
        axis comes from the symmetric part of R.
    """
    trace = R[:, 0, 0] + R[:, 1, 1] + R[:, 2, 2]
    cos = ((trace - 1) / 2).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    vee = torch.stack([R[:, 2, 1] - R[:, 1, 2], R[:, 0, 2] - R[:, 2, 0], R[:, 1, 0] - R[:, 0, 1]], dim=-1)
    sin = torch.sin(theta)
    small = theta < 1e-4
    near_pi = theta > math.pi - 1e-3
    scale = torch.where(small, 0.5 + theta * theta / 12, theta / (2 * sin.clamp_min(1e-12)))
    w = vee * scale[:, None]
    if near_pi.any():
        # Near pi the antisymmetric part vanishes; take the axis from the symmetric part.
        Rp = R[near_pi]
        S = (Rp + Rp.transpose(1, 2)) / 2 - torch.eye(3, dtype=R.dtype, device=R.device) * cos[near_pi, None, None]
        col = S.norm(dim=1).argmax(-1)
        axis = S[torch.arange(len(Rp), device=R.device), :, col]
        axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        # Fix the sign with the (small) antisymmetric part when it is informative.
        sign = torch.sign((axis * vee[near_pi]).sum(-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        w[near_pi] = axis * (sign * theta[near_pi])[:, None]
    return w


def rotation_angle(R: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (B,) in radians of rotations R (B,3,3).

    Args:
        R: (B,3,3) rotation matrices, float tensor.

    Returns:
        (B,) angles in [0, pi] radians, R's dtype and device.
    """
    trace = R[:, 0, 0] + R[:, 1, 1] + R[:, 2, 2]
    return torch.acos(((trace - 1) / 2).clamp(-1.0, 1.0))


def make_pose(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """R (B,3,3), t (B,3) -> homogeneous poses (B,4,4).

    Args:
        R: (B,3,3) rotations.
        t: (B,3) translations (metres, by the package's convention).

    Returns:
        (B,4,4) tensor of R's dtype and device, last row [0, 0, 0, 1].
    """
    T = torch.zeros(R.shape[0], 4, 4, dtype=R.dtype, device=R.device)
    T[:, :3, :3] = R
    T[:, :3, 3] = t
    T[:, 3, 3] = 1
    return T


def look_at_rotations(eyes: torch.Tensor) -> torch.Tensor:
    """Object-in-camera rotations (B,3,3) for cameras at `eyes` (B,3) looking at the origin.

    The camera z axis points from the eye to the object centre (OpenCV: z forward); the up
    vector is the object's +z unless the view is (nearly) along it, then +y, so every view
    direction gets a well-defined frame.

    Args:
        eyes: (B,3) non-zero camera positions in the object frame (any scale), float tensor.

    Returns:
        (B,3,3) object-in-camera rotations of eyes' dtype and device.
    """
    forward = -eyes / eyes.norm(dim=-1, keepdim=True)
    up = torch.zeros_like(eyes)
    along_z = forward[:, 2].abs() > 0.999
    up[:, 2] = torch.where(along_z, 0.0, 1.0)
    up[:, 1] = torch.where(along_z, 1.0, 0.0)
    # Camera y points down (OpenCV), so x = y_down x forward with y_down = -up.
    right = torch.cross(-up, forward, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.cross(forward, right, dim=-1)
    cam_in_obj = torch.stack([right, down, forward], dim=-1)  # columns = camera axes
    return cam_in_obj.transpose(1, 2)


def rotation_about_z(angles: torch.Tensor) -> torch.Tensor:
    """In-plane (camera z) rotations (N,3,3) for angles (N,) radians.

    Args:
        angles: (N,) angles in radians, float tensor.

    Returns:
        (N,3,3) rotations of angles' dtype and device.
    """
    c, s = torch.cos(angles), torch.sin(angles)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], dim=-1).reshape(-1, 3, 3)
