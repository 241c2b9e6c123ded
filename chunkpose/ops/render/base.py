"""The renderer protocol and the projection shared by every backend.

Conventions (OpenCV camera, metres): a camera point X = (x, y, z) projects to full-image
pixel coordinates (u, v) = (fx x/z + cx, fy y/z + cy), pixel (u, v) has its centre at the
integers (u, v). A crop transform T (3,3) maps full-image pixel coordinates to crop pixel
coordinates, so crop pixel q looks at the full-image point T^-1 q (the convention of
kornia ``warp_perspective(..., align_corners=False)`` and ``chunkpose.ops.warp``).

Rendering a crop therefore uses the intrinsics K' = T K (a zoomed camera): the crop is
rasterised directly at its own size, the full frame is never drawn.

A rasteriser's image of width w has pixel i covering NDC x in [-1 + 2i/w, -1 + 2(i+1)/w],
centre -1 + (2i+1)/w. Mapping pixel coordinate q to NDC with ndc = (2q + 1)/w - 1 puts
the centre of pixel i exactly at q = i. Rows are mapped the same way (no flip): image row
0 is the first row the rasteriser writes (the bottom in OpenGL terms), so reading the
buffer back in memory order gives the image top row first.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

OUTPUT_KEYS = ("rgb", "depth", "xyz", "normals", "mask")
# Nearest allowed near plane (metres); parts of the mesh closer than this are clipped.
MIN_NEAR = 1e-4


@runtime_checkable
class Renderer(Protocol):
    """Renders one mesh at many poses.

    render_crops(poses (B,4,4), K (3,3), transforms (B,3,3), size, engine=None) -> dict:
        rgb (B,3,s,s) float32 0..1, depth (B,s,s) float32 camera z (0 = background),
        xyz (B,3,s,s) float32 camera frame, normals (B,3,s,s) float32 camera frame unit
        (0 = background), mask (B,s,s) bool. Tensors on ``renderer.device``.
    render_full(pose (4,4), K (3,3), width, height) -> the same dict with B = 1 at (H,W).
    """

    device: torch.device
    backend: str

    def render_crops(self, poses, K, transforms, size: int, engine=None) -> dict: ...

    def render_full(self, pose, K, width: int, height: int) -> dict: ...


def output_bytes_per_pixel() -> int:
    """Bytes of the returned tensors per rendered pixel: rgb, depth, xyz, normals, mask."""
    return 4 * (3 + 1 + 3 + 3) + 1


def as_numpy(value, name: str, shape_tail: tuple, dtype=np.float64) -> np.ndarray:
    """``value`` (tensor or array) as a numpy array, checking its trailing shape."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(value, dtype=dtype)
    if array.shape[-len(shape_tail):] != shape_tail:
        raise ValueError(f"{name}: expected shape (...,{','.join(map(str, shape_tail))}), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinity")
    return array


def as_tensor(value) -> torch.Tensor:
    """A tensor as is; anything else as a float64 CPU tensor (for engine.map slicing)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def check_batch(poses: np.ndarray, transforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if poses.ndim != 3:
        raise ValueError(f"poses: expected (B,4,4), got {poses.shape}")
    if transforms.ndim != 3:
        raise ValueError(f"transforms: expected (B,3,3), got {transforms.shape}")
    if len(poses) != len(transforms):
        raise ValueError(
            f"transforms: expected one per pose ({len(poses)}), got {len(transforms)}"
        )
    return poses, transforms


def check_size(size, name="size") -> int:
    if int(size) != size or int(size) < 1:
        raise ValueError(f"{name}: expected a positive integer, got {size!r}")
    return int(size)


def near_far(poses: np.ndarray, center: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pose near and far planes (B,) enclosing the mesh's bounding sphere.

    Tight planes keep the depth buffer precise; depth values themselves are interpolated
    camera coordinates, not read from the depth buffer.
    """
    centre_z = poses[:, 2, :3] @ center + poses[:, 2, 3]
    margin = radius * 1.01 + 1e-4
    near = np.maximum(centre_z - margin, MIN_NEAR)
    far = np.maximum(centre_z + margin, near * 2.0 + 1e-3)
    return near, far


def clip_projection(
    K: np.ndarray, transforms: np.ndarray, width: int, height: int, near: np.ndarray, far: np.ndarray
) -> np.ndarray:
    """(B,4,4) matrices from camera coordinates (x,y,z,1) to clip space of a width x height
    image, for cameras K' = T K (transforms (B,3,3) full-image -> image pixels).

    clip w = the third row of K' (camera z for the usual affine T); clip x, y give
    ndc = (2 q + 1)/size - 1 for pixel coordinate q; clip z maps [near, far] to [-1, 1].
    """
    zoomed = transforms @ K[None]  # (B,3,3)
    zoomed = zoomed / zoomed[:, 2:3, 2:3]  # a transform's overall scale is irrelevant
    proj = np.zeros((len(transforms), 4, 4), dtype=np.float64)
    row_w = zoomed[:, 2, :]
    proj[:, 0, :3] = (2.0 * zoomed[:, 0, :] + (1.0 - width) * row_w) / width
    proj[:, 1, :3] = (2.0 * zoomed[:, 1, :] + (1.0 - height) * row_w) / height
    a = (far + near) / (far - near)
    b = -2.0 * far * near / (far - near)
    proj[:, 2, 2] = a
    proj[:, 2, 3] = b
    proj[:, 3, :3] = row_w
    return proj
