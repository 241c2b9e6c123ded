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

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

OUTPUT_KEYS = ("rgb", "depth", "xyz", "normals", "mask")


@dataclass(frozen=True)
class Headlight:
    """FoundationPose's render shading: a light at the camera.

    Per vertex d = clip(normalize(n_cam) . direction, 0, 1), interpolated over the triangle like
    a colour; rgb = clip(albedo * ambient + d * albedo * diffuse, 0, 1); background 0.

    Attributes:
        direction: (3,) light direction in camera coordinates (default (0, 0, -1): from the camera).
        ambient: ambient factor (default 0.8).
        diffuse: diffuse factor (default 0.5).
    """

    direction: tuple = (0.0, 0.0, -1.0)
    ambient: float = 0.8
    diffuse: float = 0.5

    def shade(self, albedo, light):
        """albedo (...,3) and the interpolated d (...,1) -> shaded rgb (...,3) (torch or numpy).

        Args:
            albedo: (...,3) colours in 0..1, tensor or array.
            light: (...,1) interpolated d in 0..1, same type.

        Returns:
            (...,3) shaded rgb in 0..1, the inputs' type and dtype.
        """
        shaded = albedo * self.ambient + light * albedo * self.diffuse
        return shaded.clip(0.0, 1.0)


HEADLIGHT = Headlight()
# Nearest allowed near plane (metres); parts of the mesh closer than this are clipped.
MIN_NEAR = 1e-4


@runtime_checkable
class Renderer(Protocol):
    """Renders one mesh at many poses.

    The protocol every backend (and a user's own renderer) follows; see its two methods.

    Attributes:
        device: torch.device the returned tensors are on.
        backend: the backend's name ("gl", "nvdiffrast", ...).
    """

    device: torch.device
    backend: str

    def render_crops(self, poses, K, transforms, size: int, engine=None) -> dict:
        """Render the mesh at ``poses`` straight into crops.

        Args:
            poses: (B,4,4) object-in-camera poses, metres.
            K: (3,3) full-image intrinsics in pixels.
            transforms: (B,3,3) crop transforms, full-image pixel -> crop pixel.
            size: crop side s in pixels.
            engine: optional Engine to run the rendering as a budgeted stage.

        Returns:
            dict of tensors on ``renderer.device`` (leading B):
            rgb (B,3,s,s) float32 in 0..1 (HEADLIGHT-shaded unless the renderer was made with
            shading=False), depth (B,s,s) float32 camera z in metres (0 = background),
            xyz (B,3,s,s) float32 camera-frame points in metres, normals (B,3,s,s) float32
            camera-frame unit normals (0 = background), mask (B,s,s) bool.
        """
        ...

    def render_full(self, pose, K, width: int, height: int) -> dict:
        """Render the whole image at one pose.

        Args:
            pose: (4,4) object-in-camera pose, metres.
            K: (3,3) intrinsics in pixels.
            width: image width W in pixels.
            height: image height H in pixels.

        Returns:
            The render_crops dict with B = 1 at (H,W): rgb (1,3,H,W), depth (1,H,W), xyz (1,3,H,W),
            normals (1,3,H,W), mask (1,H,W).
        """
        ...


class BatchRenderer:
    """The shared public half of the backends: argument checks, the engine stage, the
    full-image case. A backend implements ``_render_images(poses, K, transforms, width,
    height)`` on numpy float64 inputs and ``bytes_per_item(size)``; it may check a full
    image's size in ``_check_full_size``."""

    def _render_images(self, poses: np.ndarray, K: np.ndarray, transforms: np.ndarray, width: int,
                       height: int) -> dict:
        raise NotImplementedError

    def bytes_per_item(self, size: int) -> int:
        """Bytes a backend allocates per rendered crop of side ``size`` (the engine's cost hint).

        Args:
            size: crop side in pixels.

        Returns:
            int bytes per crop.
        """
        raise NotImplementedError

    def _check_full_size(self, width: int, height: int) -> None:
        """Raise ValueError when this backend cannot draw a width x height image."""

    def render_crops_op(self, poses, transforms, *, K, size: int) -> dict:
        """The per-item op: poses (b,4,4), transforms (b,3,3) -> dict with leading b.

        What render_crops maps over chunks.

        Args:
            poses: (b,4,4) object-in-camera poses, metres (tensor or array).
            transforms: (b,3,3) crop transforms (tensor or array).
            K: (3,3) intrinsics in pixels.
            size: crop side in pixels.

        Returns:
            dict as Renderer.render_crops with B = b.

        Raises:
            ValueError: bad shapes, non-finite values, mismatched batch lengths or a bad size.
        """
        poses = as_numpy(poses, "poses", (4, 4))
        transforms = as_numpy(transforms, "transforms", (3, 3))
        check_batch(poses, transforms)
        K = as_numpy(K, "K", (3, 3))
        size = check_size(size)
        return self._render_images(poses, K, transforms, size, size)

    def render_crops(self, poses, K, transforms, size: int, engine=None) -> dict:
        """Render into crops.

        With ``engine``, runs as engine.map over poses and transforms (stage "render.crops") so its
        output memory is budgeted.

        Args:
            poses: (B,4,4) object-in-camera poses, metres (tensor or array; kept float64).
            K: (3,3) full-image intrinsics in pixels.
            transforms: (B,3,3) full-image pixel -> crop pixel.
            size: crop side s in pixels.
            engine: optional Engine; None renders all B at once.

        Returns:
            dict of tensors on ``renderer.device`` (leading B):
            rgb (B,3,s,s) float32 in 0..1 (HEADLIGHT-shaded unless the renderer was made with
            shading=False), depth (B,s,s) float32 camera z in metres (0 = background),
            xyz (B,3,s,s) float32 camera-frame points in metres, normals (B,3,s,s) float32
            camera-frame unit normals (0 = background), mask (B,s,s) bool.

        Raises:
            ValueError: bad shapes, non-finite values, mismatched batch lengths or a bad size.
        """
        size = check_size(size)
        if engine is None:
            return self.render_crops_op(poses, transforms, K=K, size=size)
        # the engine slices tensors only; float64 keeps the poses exactly as given
        return engine.map(
            self.render_crops_op,
            as_tensor(poses),
            as_tensor(transforms),
            name="render.crops",
            per_item_bytes=self.bytes_per_item(size),
            K=K,
            size=size,
        )

    def render_full(self, pose, K, width: int, height: int) -> dict:
        """Render the whole image: pose (4,4), K (3,3) -> dict with B = 1 at (height, width).

        Args:
            pose: (4,4) object-in-camera pose, metres.
            K: (3,3) intrinsics in pixels.
            width: image width W in pixels.
            height: image height H in pixels.

        Returns:
            dict as Renderer.render_full: rgb (1,3,H,W), depth (1,H,W), xyz (1,3,H,W),
            normals (1,3,H,W), mask (1,H,W).

        Raises:
            ValueError: bad shapes, non-finite values, or a size this backend cannot draw.
        """
        pose = as_numpy(pose, "pose", (4, 4)).reshape(1, 4, 4)
        K = as_numpy(K, "K", (3, 3))
        width, height = check_size(width, "width"), check_size(height, "height")
        self._check_full_size(width, height)
        return self._render_images(pose, K, np.eye(3)[None], width, height)


def output_bytes_per_pixel() -> int:
    """Bytes of the returned tensors per rendered pixel: rgb, depth, xyz, normals, mask.

    Returns:
        int: 41 (ten float32 channels and one bool).
    """
    return 4 * (3 + 1 + 3 + 3) + 1


def as_numpy(value, name: str, shape_tail: tuple, dtype=np.float64) -> np.ndarray:
    """``value`` (tensor or array) as a numpy array, checking its trailing shape.

    Args:
        value: tensor or array-like.
        name: the argument's name for error messages.
        shape_tail: the required trailing shape, e.g. (4, 4).
        dtype: numpy dtype of the result (default float64).

    Returns:
        numpy array of ``dtype`` with shape (..., *shape_tail).

    Raises:
        ValueError: the trailing shape differs, or a value is NaN or infinite.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(value, dtype=dtype)
    if array.shape[-len(shape_tail):] != shape_tail:
        raise ValueError(f"{name}: expected shape (...,{','.join(map(str, shape_tail))}), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinity")
    return array


def as_tensor(value) -> torch.Tensor:
    """A tensor as is; anything else as a float64 CPU tensor (for engine.map slicing).

    Args:
        value: tensor or array-like.

    Returns:
        torch.Tensor.
    """
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def check_batch(poses: np.ndarray, transforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check that poses and transforms are batches of one length.

    Args:
        poses: (B,4,4) numpy array.
        transforms: (B,3,3) numpy array.

    Returns:
        (poses, transforms) unchanged.

    Raises:
        ValueError: either is not 3-D or their lengths differ.
    """
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
    """``size`` as a positive int.

    Args:
        size: a positive integer (pixels).
        name: the argument's name for error messages.

    Returns:
        int.

    Raises:
        ValueError: not a positive integer.
    """
    if int(size) != size or int(size) < 1:
        raise ValueError(f"{name}: expected a positive integer, got {size!r}")
    return int(size)


def near_far(poses: np.ndarray, center: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pose near and far planes (B,) enclosing the mesh's bounding sphere.

    Tight planes keep the depth buffer precise; depth values themselves are interpolated
    camera coordinates, not read from the depth buffer.

    Args:
        poses: (B,4,4) float64 object-in-camera poses, metres.
        center: (3,) bounding-sphere centre in the mesh frame, metres.
        radius: bounding-sphere radius in metres.

    Returns:
        (near, far): two (B,) float64 arrays in metres, near >= MIN_NEAR.
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

    Args:
        K: (3,3) float64 intrinsics in pixels.
        transforms: (B,3,3) float64 full-image pixel -> image pixel maps.
        width: image width in pixels.
        height: image height in pixels.
        near: (B,) near planes in metres.
        far: (B,) far planes in metres.

    Returns:
        (B,4,4) float64 projection matrices.
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
