"""Crop windows ("box_3d"), the pixel conventions crops are sampled with, and the region of
the full image that crops can read.

A crop transform ``T (3,3)`` maps full-image pixels to crop pixels (pixel centres at integer
coordinates, the align_corners=False convention of kornia's warp_perspective); crop pixel q
samples the full image at ``T^-1 q`` ("exact" sampling).

FoundationPose's learned networks were trained on crops sampled with two sub-pixel
deviations from that, which the learned path reproduces (see ``upstream_render_transforms``
and ``sampling_maps``): the rasteriser is handed the crop's pixel centres 0 and size-1 as
the crop box (a (size-1)/size zoom-out, half a pixel at the edges), and the observed crops
come from kornia 0.7.2's warp_perspective, which samples a source of width W at
``p * W/(W-1) - 0.5`` for the position p that T^-1 gives (rows likewise with H).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CropWindows:
    """Crops of B hypotheses.

    Attributes:
        transforms: (B,3,3) float32: full-image pixel -> crop pixel, on the poses' device.
        boxes: (B,4) float32: left, top, right, bottom in full-image pixels (integers).
        roi: (x0, y0, x1, y1) ints: the full-image pixels any crop pixel can read (bilinear and
            nearest, with a margin), clipped to the image when its size was given; x1, y1 exclusive.
        size: crop side in pixels.
    """

    transforms: torch.Tensor
    boxes: torch.Tensor
    roi: tuple[int, int, int, int]
    size: int

    @property
    def origin(self) -> tuple[int, int]:
        """(x0, y0): the full-frame pixel of the ROI's first pixel."""
        return self.roi[0], self.roi[1]

    def roi_slices(self) -> tuple[slice, slice]:
        """(rows, cols) slices that cut the ROI out of a full (H,W,...) image.

        Returns:
            (slice(y0, y1), slice(x0, x1)).
        """
        x0, y0, x1, y1 = self.roi
        return slice(y0, y1), slice(x0, x1)


def _as_poses(poses) -> torch.Tensor:
    if isinstance(poses, np.ndarray):
        poses = torch.from_numpy(poses)
    if not isinstance(poses, torch.Tensor):
        raise ValueError(f"poses must be a (B,4,4) tensor or array, got {type(poses).__name__}")
    if poses.dim() == 2:
        poses = poses[None]
    if poses.dim() != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"poses must be (B,4,4) object-in-camera matrices, got shape {tuple(poses.shape)}")
    return poses


def crop_windows(poses, K, diameter: float, crop_ratio: float, size: int = 160,
                 image_size: tuple[int, int] | None = None) -> CropWindows:
    """Box_3d crop windows of ``poses (B,4,4)`` (object-in-camera, metres) under ``K (3,3)``.

    The object's centre t and the four points t +- r*x, t +- r*y (camera axes,
    r = diameter * crop_ratio / 2) are projected; the half-size is the largest offset of those
    projections from the projected centre c along x or y; left/right/top/bottom = c -+ half,
    each rounded (half to even); T = scale(size/(right-left), size/(bottom-top)) @
    translate(-left, -top).

    Args:
        poses: (B,4,4) or (4,4) object-in-camera poses (tensor or numpy array), metres, t_z > 0.
        K: (3,3) camera matrix in pixels (tensor or array).
        diameter: object diameter in metres, > 0.
        crop_ratio: crop side as a multiple of the diameter (> 0).
        size: crop side in pixels (default 160).
        image_size: (H, W) to clip the ROI to; None leaves it unclipped (except at 0).

    Returns:
        CropWindows: transforms (B,3,3) float32 and boxes (B,4) float32 on the poses' device, the
        ROI and the size.

    Raises:
        ValueError: bad shapes of poses or K, a non-positive diameter, crop_ratio or size, an
            object behind the camera, or a crop window without extent.
    """
    poses = _as_poses(poses)
    if not (diameter > 0 and math.isfinite(diameter)):
        raise ValueError(f"diameter must be a positive number of metres, got {diameter}")
    if not crop_ratio > 0:
        raise ValueError(f"crop_ratio must be positive, got {crop_ratio}")
    if int(size) != size or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size}")
    size = int(size)
    Kd = (K if isinstance(K, torch.Tensor) else torch.as_tensor(np.asarray(K))).detach().to("cpu", torch.float64)
    if Kd.shape != (3, 3):
        raise ValueError(f"K must be (3,3), got {tuple(Kd.shape)}")
    t = poses[:, :3, 3].detach().to("cpu", torch.float64)  # (B,3)
    if torch.any(t[:, 2] <= 0):
        raise ValueError("poses must place the object in front of the camera (t_z > 0)")
    r = float(diameter) * float(crop_ratio) / 2.0
    offsets = torch.tensor([[0, 0, 0], [r, 0, 0], [-r, 0, 0], [0, r, 0], [0, -r, 0]], dtype=torch.float64)
    pts = t[:, None, :] + offsets[None]  # (B,5,3)
    proj = pts @ Kd.T
    uv = proj[..., :2] / proj[..., 2:3]  # (B,5,2)
    centre = uv[:, 0]
    half = (uv[:, 1:] - centre[:, None]).abs().amax(dim=(1, 2))  # (B,)
    left = torch.round(centre[:, 0] - half)
    right = torch.round(centre[:, 0] + half)
    top = torch.round(centre[:, 1] - half)
    bottom = torch.round(centre[:, 1] + half)
    width, height = right - left, bottom - top
    if torch.any(width <= 0) or torch.any(height <= 0):
        raise ValueError("a crop window has no extent (object too far or diameter too small for this K)")
    B = poses.shape[0]
    T = torch.zeros((B, 3, 3), dtype=torch.float64)
    T[:, 0, 0] = size / width
    T[:, 1, 1] = size / height
    T[:, 0, 2] = -left * (size / width)
    T[:, 1, 2] = -top * (size / height)
    T[:, 2, 2] = 1.0
    transforms = T.float()
    boxes = torch.stack([left, top, right, bottom], dim=1).float()
    roi = crop_roi(transforms, size, image_size)
    dev = poses.device
    return CropWindows(transforms=transforms.to(dev), boxes=boxes.to(dev), roi=roi, size=size)


#: Sampling conventions of crop ops: "exact" (crop pixel q at T^-1 q) and "kornia_0.7.2"
#: (what kornia 0.7.2's warp_perspective(align_corners=False) samples, pinned by upstream).
SAMPLINGS = ("exact", "kornia_0.7.2")


def _check_sampling(sampling: str) -> str:
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {sampling!r}")
    return sampling


def kornia072_offset(source_size: tuple[int, int]) -> torch.Tensor:
    """The (3,3) float64 map p -> (p_x W/(W-1) - 0.5, p_y H/(H-1) - 0.5) of a source image of
    ``source_size=(H, W)``.

    kornia 0.7.2 normalises the homography with the [0, W-1] pixel convention but samples with
    grid_sample(align_corners=False), so the position it reads for a target pixel is this map
    applied to the one T^-1 gives.

    Args:
        source_size: (H, W) of the source image in pixels, each >= 2.

    Returns:
        (3,3) float64 CPU tensor.

    Raises:
        ValueError: the source is smaller than 2 x 2.
    """
    H, W = int(source_size[0]), int(source_size[1])
    if H < 2 or W < 2:
        raise ValueError(f"source_size: expected (H, W) of at least 2 x 2 pixels, got {source_size}")
    return torch.tensor([[W / (W - 1), 0.0, -0.5], [0.0, H / (H - 1), -0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


def sampling_maps(transforms: torch.Tensor, size: int, source_size: tuple[int, int] | None,
                  sampling: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, inverse) float64 (B,3,3) maps a crop op samples with.

    inverse: crop pixel -> the source position it reads (exact: T^-1); forward: source pixel ->
    the crop position a warp back from the crop reads (exact: T), used by the scorer's
    crop -> frame -> crop round trip, where the crop is the source. With "kornia_0.7.2" each
    direction carries kornia 0.7.2's offset for its own source: inverse = offset(H, W) @ T^-1
    (the full frame of ``source_size``), forward = offset(size, size) @ T (the crop).

    Args:
        transforms: (B,3,3) crop transforms T (full-image pixel -> crop pixel).
        size: crop side in pixels.
        source_size: (H, W) of the full frame; needed for "kornia_0.7.2", unused by "exact".
        sampling: "exact" (default) or "kornia_0.7.2" (see SAMPLINGS).

    Returns:
        (forward, inverse): two (B,3,3) float64 tensors on the transforms' device.

    Raises:
        ValueError: an unknown ``sampling``, or "kornia_0.7.2" without ``source_size``.
    """
    _check_sampling(sampling)
    T = transforms.detach().to("cpu", torch.float64)
    Ti = inverse_transforms(T)
    if sampling == "kornia_0.7.2":
        if source_size is None:
            raise ValueError("source_size: kornia_0.7.2 sampling depends on the full frame's (H, W); pass it")
        Ti = kornia072_offset(source_size) @ Ti
        T = kornia072_offset((size, size)) @ T
    device = transforms.device
    return T.contiguous().to(device), Ti.contiguous().to(device)


def upstream_render_transforms(transforms: torch.Tensor, size: int) -> torch.Tensor:
    """Crop transforms (B,3,3) that make a renderer draw what FoundationPose's rasteriser draws
    into a crop of ``size`` pixels.

    Upstream hands the rasteriser the crop box spanned by the inverse transforms of the crop's
    pixel CENTRES 0 and size-1, over an OpenGL projection whose NDC spans pixel edges: crop
    pixel j then shows the full-image point T^-1((j + 1/2) (size-1)/size). A renderer that
    shows T_r^-1 j at pixel j (chunkpose's convention) does so for T_r = C^-1 T with
    C^-1(x) = x size/(size-1) - 1/2.

    Args:
        transforms: (B,3,3) crop transforms T (full-image pixel -> crop pixel).
        size: crop side in pixels, >= 2.

    Returns:
        (B,3,3) float64 transforms T_r on the transforms' device.

    Raises:
        ValueError: ``size`` < 2.
    """
    size = int(size)
    if size < 2:
        raise ValueError(f"size: expected a crop side of at least 2 pixels, got {size}")
    zoom = size / (size - 1)
    C_inv = torch.tensor([[zoom, 0.0, -0.5], [0.0, zoom, -0.5], [0.0, 0.0, 1.0]], dtype=torch.float64,
                         device=transforms.device)
    return C_inv @ transforms.to(torch.float64)


def inverse_transforms(transforms: torch.Tensor) -> torch.Tensor:
    """``transforms (B,3,3)`` -> their inverses in float64.

    Computed on the CPU, so every device samples at the same positions.

    Args:
        transforms: (B,3,3) tensor (B may be 0).

    Returns:
        (B,3,3) float64 tensor on the transforms' device.

    Raises:
        ValueError: ``transforms`` is not (B,3,3).
    """
    if transforms.dim() != 3 or transforms.shape[1:] != (3, 3):
        raise ValueError(f"transforms must be (B,3,3), got shape {tuple(transforms.shape)}")
    Td = transforms.detach().to("cpu", torch.float64)
    if Td.shape[0] == 0:
        return Td.to(transforms.device)
    return torch.linalg.inv(Td).to(transforms.device)


def crop_roi(transforms: torch.Tensor, size: int, image_size: tuple[int, int] | None = None,
             margin: int = 1) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1/y1 exclusive: the full-image pixels that crop pixels 0..size-1 of all
    ``transforms (B,3,3)`` can read.

    With bilinear (floor, floor+1) or nearest (round) sampling, plus ``margin`` pixels, clipped
    to ``image_size=(H,W)`` when given (always to >= 0).

    Args:
        transforms: (B,3,3) crop transforms (full-image pixel -> crop pixel).
        size: crop side in pixels.
        image_size: (H, W) to clip to; None clips only at 0.
        margin: extra pixels on every side (default 1).

    Returns:
        (x0, y0, x1, y1) ints in full-image pixels; (0, 0, 0, 0) for B = 0.

    Raises:
        ValueError: a transform maps crop corners behind the image plane.
    """
    Ti = inverse_transforms(transforms).cpu()
    B = Ti.shape[0]
    if B == 0:
        return (0, 0, 0, 0)
    c = float(size - 1)
    corners = torch.tensor([[0, 0, 1], [c, 0, 1], [0, c, 1], [c, c, 1]], dtype=torch.float64)
    p = corners @ Ti.transpose(1, 2)  # (B,4,3)
    if torch.any(p[..., 2] <= 0):
        raise ValueError("a crop transform maps crop corners behind the image plane; not a crop transform")
    xy = p[..., :2] / p[..., 2:3]
    lo = xy.reshape(-1, 2).amin(0)
    hi = xy.reshape(-1, 2).amax(0)
    x0 = int(math.floor(lo[0])) - margin
    y0 = int(math.floor(lo[1])) - margin
    x1 = int(math.floor(hi[0])) + 2 + margin
    y1 = int(math.floor(hi[1])) + 2 + margin
    x0, y0 = max(x0, 0), max(y0, 0)
    if image_size is not None:
        H, W = int(image_size[0]), int(image_size[1])
        x1, y1 = min(x1, W), min(y1, H)
        x0, y0 = min(x0, W), min(y0, H)
    return (x0, y0, max(x1, x0), max(y1, y0))
