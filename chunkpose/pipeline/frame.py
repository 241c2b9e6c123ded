"""User input checks and the preparation of an ObservedFrame (depth clean-up, ROI upload).

The full frame stays a host numpy array. Only the region that crops can read (the ROI)
goes on the device, cleaned with the same 5x5 erode + bilateral filters as the full frame
would be: both are local, so cleaning the ROI plus a 4-pixel halo (2 per filter) gives
exactly the full-frame result inside the ROI.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from chunkpose.pipeline.base import ObservedFrame

#: Depth medians above this (metres) are taken as millimetres passed by mistake.
MAX_PLAUSIBLE_DEPTH_M = 20.0
#: erode (radius 2) then bilateral (radius 2): a ROI pixel depends on raw depth 4 px away.
CLEANUP_HALO = 4


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if x is None:
        raise ValueError(f"{name}: got None; pass a numpy array")
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: cannot be read as an array ({exc}); pass a numpy array") from exc


def validate_intrinsics(K) -> np.ndarray:
    """K (3,3) camera matrix -> float64 copy; ValueError when it is not a usable pinhole K."""
    K = _as_numpy(K, "K")
    if K.shape != (3, 3):
        raise ValueError(
            f"K: expected a 3x3 camera matrix [[fx,0,cx],[0,fy,cy],[0,0,1]], got shape {K.shape}"
            + ("; reshape the 9 values with K.reshape(3, 3)" if K.size == 9 else "")
        )
    if not np.issubdtype(K.dtype, np.number):
        raise ValueError(f"K: expected numbers, got dtype {K.dtype}")
    K = K.astype(np.float64)
    if not np.all(np.isfinite(K)):
        raise ValueError("K: contains NaN or inf; pass finite intrinsics")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"K: focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}")
    if not np.allclose(K[2], [0.0, 0.0, 1.0]):
        raise ValueError(f"K: last row must be [0, 0, 1], got {K[2].tolist()}; pass a pinhole camera matrix")
    return K


def validate_inputs(rgb, depth, K, mask=None, require_mask: bool = True):
    """Check user input and return it normalised: rgb uint8 (H,W,3), depth float32 (H,W)
    metres with NaN/inf -> 0, K float64 (3,3), mask bool (H,W) or None.

    Every problem raises ValueError naming the argument and the fix.
    """
    rgb = _as_numpy(rgb, "rgb")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected an (H,W,3) colour image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        hint = " (scale floats in 0..1 with (rgb*255).astype(np.uint8))" if np.issubdtype(rgb.dtype, np.floating) else ""
        raise ValueError(f"rgb: expected dtype uint8, got {rgb.dtype}{hint}")
    H, W = rgb.shape[:2]
    if H < 2 or W < 2:
        raise ValueError(f"rgb: image is too small ({H}x{W})")

    depth = _as_numpy(depth, "depth")
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[:, :, 0]
    if depth.ndim != 2:
        raise ValueError(f"depth: expected an (H,W) depth map in metres, got shape {depth.shape}")
    if depth.shape != (H, W):
        raise ValueError(f"depth: size {depth.shape} differs from rgb {(H, W)}; pass aligned images of one size")
    if np.issubdtype(depth.dtype, np.integer):
        raise ValueError(
            f"depth: got integer dtype {depth.dtype} (raw sensor units?); pass float32 metres, "
            "e.g. depth.astype(np.float32) / 1000.0 for millimetres"
        )
    if not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(f"depth: expected float32 metres, got dtype {depth.dtype}")
    depth = depth.astype(np.float32, copy=True)
    finite = np.isfinite(depth)
    if not finite.any():
        raise ValueError("depth: every value is NaN or inf; pass a depth map in metres with 0 for missing")
    depth[~finite] = 0.0
    valid = depth >= 0.001
    if not valid.any():
        raise ValueError("depth: no valid pixel (all zero or negative); pass a depth map in metres")
    median = float(np.median(depth[valid]))
    if median > MAX_PLAUSIBLE_DEPTH_M:
        raise ValueError(
            f"depth: median valid depth is {median:.1f}, which looks like millimetres; "
            "pass metres (divide by 1000)"
        )

    K = validate_intrinsics(K)

    if mask is None:
        if require_mask:
            raise ValueError("mask: registration needs an (H,W) bool mask of the object")
    else:
        mask = _as_numpy(mask, "mask")
        if mask.ndim == 3 and mask.shape[2] in (1, 3, 4):
            raise ValueError(
                f"mask: expected a single-channel (H,W) mask, got shape {mask.shape}; pass mask[..., 0] > 0"
            )
        if mask.ndim != 2:
            raise ValueError(f"mask: expected an (H,W) bool mask, got shape {mask.shape}")
        if mask.shape != (H, W):
            raise ValueError(f"mask: size {mask.shape} differs from rgb {(H, W)}; pass a mask of the same image size")
        if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.number)):
            raise ValueError(f"mask: expected bool, got dtype {mask.dtype}")
        mask = mask > 0 if mask.dtype != np.bool_ else mask.copy()
        if not mask.any():
            raise ValueError("mask: it is empty (no object pixel); pass a mask that covers the object")
        if not (mask & valid).any():
            raise ValueError("mask: no pixel inside the mask has valid depth; check that mask and depth are aligned")
    return rgb, depth, K, mask


def resize_inputs(rgb, depth, K, mask, factor: float):
    """Downscale by `factor` (< 1) as upstream does: nearest for rgb, depth and mask, K's
    first two rows scaled. Returns (rgb, depth, K, mask); the camera stays metric."""
    import cv2

    H, W = depth.shape
    w, h = max(2, int(round(W * factor))), max(2, int(round(H * factor)))
    rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_NEAREST)
    depth = cv2.resize(depth, (w, h), interpolation=cv2.INTER_NEAREST)
    if mask is not None:
        mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    K = K.copy()
    K[0] *= w / W
    K[1] *= h / H
    return rgb, depth, K, mask


def clip_roi(roi, size) -> Tuple[int, int, int, int]:
    """roi (x0,y0,x1,y1) end-exclusive, clipped to an image of size (H,W); never empty."""
    H, W = size
    x0, y0, x1, y1 = (int(v) for v in roi)
    x0, y0 = min(max(x0, 0), W - 1), min(max(y0, 0), H - 1)
    x1, y1 = min(max(x1, x0 + 1), W), min(max(y1, y0 + 1), H)
    return x0, y0, x1, y1


def union_roi(a, b):
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def mask_bbox(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """(x0,y0,x1,y1) end-exclusive bounding box of a non-empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def roi_bytes_per_pixel() -> int:
    """Device bytes per ROI pixel at the call's peak: the resident frame (rgb f32 x3,
    depth f32, xyz f32 x3, mask bool) plus headroom for what is briefly alive beside it
    (the uint8 rgb and mask uploads). Clean-up (raw, eroded, filtered depth: 12 B/px)
    happens before rgb and xyz exist, so it is below this."""
    return 12 + 4 + 12 + 1 + 3 + 4


def _xyz_channels_first(depth: torch.Tensor, K: np.ndarray) -> torch.Tensor:
    """Point map (3,h,w) of depth (h,w), written channel by channel (no (h,w,3) copy):
    the same formula and roundings as chunkpose.ops.depth.depth_to_xyz, zero where z < 1 mm."""
    h, w = depth.shape
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    out = torch.empty((3, h, w), dtype=torch.float32, device=depth.device)
    u = torch.arange(w, dtype=torch.float32, device=depth.device)
    v = torch.arange(h, dtype=torch.float32, device=depth.device)
    torch.mul(u - cx, depth, out=out[0])
    out[0].div_(fx)
    torch.mul((v - cy)[:, None], depth, out=out[1])
    out[1].div_(fy)
    out[2].copy_(depth)
    out.masked_fill_((depth < 0.001)[None], 0.0)
    return out


def prepare_frame(rgb, depth, K, mask, roi, diameter: float, engine, device) -> ObservedFrame:
    """Upload the ROI (x0,y0,x1,y1) of a validated frame and clean its depth.

    rgb uint8 (H,W,3), depth float32 (H,W), K float64 (3,3), mask bool (H,W) or None.
    The depth filters run through `engine` (banded), on the ROI plus a halo so the result
    equals full-frame cleaning inside the ROI.
    """
    from chunkpose.ops.depth import bilateral_filter_depth, erode_depth

    H, W = depth.shape
    x0, y0, x1, y1 = clip_roi(roi, (H, W))
    hx0, hy0 = max(0, x0 - CLEANUP_HALO), max(0, y0 - CLEANUP_HALO)
    hx1, hy1 = min(W, x1 + CLEANUP_HALO), min(H, y1 + CLEANUP_HALO)
    raw = torch.from_numpy(np.ascontiguousarray(depth[hy0:hy1, hx0:hx1])).to(device)
    eroded = erode_depth(raw, engine=engine)
    del raw
    cleaned = bilateral_filter_depth(eroded, engine=engine)
    del eroded
    depth_roi = cleaned[y0 - hy0 : y1 - hy0, x0 - hx0 : x1 - hx0].contiguous()
    del cleaned

    # Shift the principal point so the ROI's own pixel grid back-projects like the full frame.
    K_roi = K.copy()
    K_roi[0, 2] -= x0
    K_roi[1, 2] -= y0
    xyz = _xyz_channels_first(depth_roi, K_roi)

    # channels-first on the host, then one float copy on the device
    rgb_roi = torch.from_numpy(np.ascontiguousarray(rgb[y0:y1, x0:x1].transpose(2, 0, 1))).to(device)
    rgb_roi = rgb_roi.to(torch.float32)
    mask_roi = None
    if mask is not None:
        mask_roi = torch.from_numpy(np.ascontiguousarray(mask[y0:y1, x0:x1])).to(device)
    return ObservedFrame(
        rgb=rgb_roi,
        depth=depth_roi,
        xyz=xyz,
        mask=mask_roi,
        K=torch.as_tensor(K, dtype=torch.float32, device=device),
        origin=(x0, y0),
        full_size=(H, W),
        diameter=float(diameter),
    )
