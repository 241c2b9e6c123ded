"""User input checks and the preparation of an ObservedFrame (depth clean-up, ROI upload).

The full frame stays a host numpy array. Only the region that crops can read (the ROI,
chunkpose.pipeline.roi) goes on the device, cleaned with the same 5x5 erode + bilateral
filters as the full frame would be: both are local, so cleaning the ROI plus a 4-pixel halo
(2 per filter) gives exactly the full-frame result inside the ROI, and so does cleaning
just the pixels crops sample (tracking).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from chunkpose.errors import InputError
from chunkpose.ops.depth import OnDemandClean
from chunkpose.ops.geometry import MIN_DEPTH, scale_intrinsics, scaled_size, validate_intrinsics
from chunkpose.pipeline.base import ObservedFrame
from chunkpose.pipeline.roi import CLEANUP, CallRegion, merge_regions

#: Depth medians above this (metres) are taken as millimetres passed by mistake.
MAX_PLAUSIBLE_DEPTH_M = 20.0


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if x is None:
        raise InputError(f"{name}: got None; pass a numpy array")
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise InputError(f"{name}: cannot be read as an array ({exc}); pass a numpy array") from exc


def validate_inputs(rgb, depth, K, mask=None, require_mask: bool = True):
    """Check user input and return it normalised.

    Every problem raises an InputError (a ValueError) naming the argument and the fix.

    Args:
        rgb: (H,W,3) uint8 colour image (numpy array or tensor), H, W >= 2.
        depth: (H,W) or (H,W,1) float depth in metres (0, NaN, inf = missing); a median valid
            depth above MAX_PLAUSIBLE_DEPTH_M is taken as millimetres and refused.
        K: (3,3) camera intrinsics in pixels.
        mask: (H,W) bool or numeric (non-zero = object) mask, or None.
        require_mask: whether a mask must be given (registration; default True).

    Returns:
        (rgb, depth, K, mask): rgb uint8 (H,W,3), depth float32 (H,W) metres (a copy, NaN/inf
        -> 0), K float64 (3,3), mask bool (H,W) copy or None.

    Raises:
        InputError: wrong shapes, dtypes or units, images of different sizes, no valid depth, an
            empty mask or one without valid depth, a missing required mask, or an unusable K.
    """
    rgb = _as_numpy(rgb, "rgb")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(f"rgb: expected an (H,W,3) colour image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        hint = " (scale floats in 0..1 with (rgb*255).astype(np.uint8))" if np.issubdtype(rgb.dtype, np.floating) else ""
        raise InputError(f"rgb: expected dtype uint8, got {rgb.dtype}{hint}")
    H, W = rgb.shape[:2]
    if H < 2 or W < 2:
        raise InputError(f"rgb: image is too small ({H}x{W})")

    depth = _as_numpy(depth, "depth")
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[:, :, 0]
    if depth.ndim != 2:
        raise InputError(f"depth: expected an (H,W) depth map in metres, got shape {depth.shape}")
    if depth.shape != (H, W):
        raise InputError(f"depth: size {depth.shape} differs from rgb {(H, W)}; pass aligned images of one size")
    if np.issubdtype(depth.dtype, np.integer):
        raise InputError(
            f"depth: got integer dtype {depth.dtype} (raw sensor units?); pass float32 metres, "
            "e.g. depth.astype(np.float32) / 1000.0 for millimetres"
        )
    if not np.issubdtype(depth.dtype, np.floating):
        raise InputError(f"depth: expected float32 metres, got dtype {depth.dtype}")
    depth = depth.astype(np.float32, copy=True)
    finite = np.isfinite(depth)
    if not finite.any():
        raise InputError("depth: every value is NaN or inf; pass a depth map in metres with 0 for missing")
    depth[~finite] = 0.0
    valid = depth >= MIN_DEPTH
    if not valid.any():
        raise InputError("depth: no valid pixel (all zero or negative); pass a depth map in metres")
    # A units check, not a statistic: every 4th pixel each way tells metres from
    # millimetres as well as all of them, at a 16th of the cost on a full-resolution frame.
    sample = depth[::4, ::4]
    sample = sample[sample >= MIN_DEPTH]
    median = float(np.median(sample if sample.size else depth[valid]))
    if median > MAX_PLAUSIBLE_DEPTH_M:
        raise InputError(
            f"depth: median valid depth is {median:.1f}, which looks like millimetres; "
            "pass metres (divide by 1000)"
        )

    K = validate_intrinsics(K)

    if mask is None:
        if require_mask:
            raise InputError("mask: registration needs an (H,W) bool mask of the object")
    else:
        mask = validate_mask(mask, depth)
    return rgb, depth, K, mask


def validate_mask(mask, depth: np.ndarray, name: str = "mask") -> np.ndarray:
    """Check one object mask against a validated depth map and return it as a bool copy.

    Args:
        mask: (H,W) bool or numeric (non-zero = object) mask (numpy array or tensor).
        depth: (H,W) float32 metres, as validate_inputs returns it.
        name: the argument's name in error messages (default "mask").

    Returns:
        (H,W) bool numpy copy.

    Raises:
        InputError: not a single-channel (H,W) mask of depth's size, an unusable dtype, empty, or
            without a pixel of valid depth.
    """
    mask = _as_numpy(mask, name)
    if mask.ndim == 3 and mask.shape[2] in (1, 3, 4):
        raise InputError(
            f"{name}: expected a single-channel (H,W) mask, got shape {mask.shape}; pass mask[..., 0] > 0"
        )
    if mask.ndim != 2:
        raise InputError(f"{name}: expected an (H,W) bool mask, got shape {mask.shape}")
    if mask.shape != depth.shape:
        raise InputError(f"{name}: size {mask.shape} differs from rgb {depth.shape}; "
                         "pass a mask of the same image size")
    if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.number)):
        raise InputError(f"{name}: expected bool, got dtype {mask.dtype}")
    mask = mask > 0 if mask.dtype != np.bool_ else mask.copy()
    if not mask.any():
        raise InputError(f"{name}: it is empty (no object pixel); pass a mask that covers the object")
    if not (mask & (depth >= MIN_DEPTH)).any():
        raise InputError(f"{name}: no pixel inside the mask has valid depth; check that mask and depth are aligned")
    return mask


def resize_inputs(rgb, depth, K, mask, factor: float):
    """Downscale by ``factor`` (< 1) as upstream's readers do.

    Sizes truncated (at least 2 pixels), nearest for rgb, depth and mask, K's first two rows
    times the factor (chunkpose.ops.geometry); the camera stays metric.

    Args:
        rgb: (H,W,3) uint8.
        depth: (H,W) float32 metres.
        K: (3,3) intrinsics in pixels.
        mask: (H,W) bool or None.
        factor: scale of both image axes.

    Returns:
        (rgb, depth, K, mask) at (h,w) = (int(H*factor), int(W*factor)): rgb uint8 (h,w,3),
        depth float32 (h,w), K float64 (3,3), mask bool (h,w) or None.
    """
    import cv2

    h, w = scaled_size(*depth.shape, factor)
    h, w = max(2, h), max(2, w)
    rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_NEAREST)
    depth = cv2.resize(depth, (w, h), interpolation=cv2.INTER_NEAREST)
    if mask is not None:
        mask = resize_mask(mask, (h, w))
    return rgb, depth, scale_intrinsics(K, factor), mask


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """A bool mask resized to ``size=(h, w)`` as resize_inputs resizes it (nearest).

    Args:
        mask: (H,W) bool.
        size: (h, w) target size in pixels.

    Returns:
        (h,w) bool.
    """
    import cv2

    return cv2.resize(mask.astype(np.uint8), (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST) > 0


def upload(array: np.ndarray, device) -> torch.Tensor:
    """A device copy of a host array, made by torch ops (empty + copy_), so that the engine's meter
    counts it on every device (a from_numpy tensor on the CPU would be the host array itself,
    outside any count).

    Args:
        array: numpy array of any shape and a torch-supported dtype.
        device: target device.

    Returns:
        Tensor of the array's shape and dtype on ``device``.
    """
    array = np.ascontiguousarray(array)
    out = torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype, device=device)
    out.copy_(torch.from_numpy(array))
    return out


def prepare_frame(rgb, depth, K, mask, region: CallRegion, diameter: float, engine, device) -> ObservedFrame:
    """Upload a validated frame's region and clean its depth (or leave it for on-demand cleaning).

    Dense: the raw window (ROI plus halo) is cleaned through ``engine`` (row bands) and cut to
    the ROI, which equals full-frame cleaning there. On demand: the raw window stays, and crops
    clean the pixels they sample. rgb and mask go up after the clean-up, so its peak does not
    hold them.

    Args:
        rgb: (H,W,3) uint8, as validate_inputs returns it.
        depth: (H,W) float32 metres.
        K: (3,3) float64 full-frame intrinsics in pixels.
        mask: (H,W) bool or None.
        region: the call's CallRegion (chunkpose.pipeline.roi.call_region).
        diameter: object diameter in metres.
        engine: the Engine the dense clean-up runs through, or None (unbudgeted).
        device: where the frame's tensors go.

    Returns:
        ObservedFrame with rgb (3,h,w) uint8, depth float32 (cleaned ROI or raw window), mask
        (h,w) bool or None and K (3,3) float32 on ``device``.
    """
    H, W = depth.shape
    x0, y0, x1, y1 = region.roi
    hx0, hy0, hx1, hy1 = region.raw
    raw = upload(depth[hy0:hy1, hx0:hx1], device)
    on_demand = None
    depth_origin = None
    if region.on_demand:
        depth_roi, depth_origin = raw, (hx0, hy0)
        on_demand = OnDemandClean(roi=region.roi, full_size=(H, W), cleanup=CLEANUP)
    else:
        # one map at a time besides the filter's output: the raw map goes before the second filter
        eroded = CLEANUP.erode(raw, engine=engine)
        del raw
        cleaned = CLEANUP.bilateral(eroded, engine=engine)
        del eroded
        depth_roi = cleaned[y0 - hy0: y1 - hy0, x0 - hx0: x1 - hx0]
        if depth_roi.shape != cleaned.shape:
            depth_roi = depth_roi.contiguous()
        del cleaned
    # channels-first on the host, then one uint8 copy on the device
    rgb_roi = upload(rgb[y0:y1, x0:x1].transpose(2, 0, 1), device)
    mask_roi = upload(mask[y0:y1, x0:x1], device) if mask is not None else None
    return ObservedFrame(rgb=rgb_roi, depth=depth_roi, mask=mask_roi, K=torch.as_tensor(K, dtype=torch.float32).to(device),
                         origin=(x0, y0), full_size=(H, W), diameter=float(diameter), depth_origin=depth_origin,
                         on_demand=on_demand)


def prepare_frames(rgb, depth, K, masks, regions, diameters, engine, device) -> list:
    """ObservedFrames of several objects in one frame, each region pixel uploaded and cleaned once.

    Regions whose raw windows overlap are merged (chunkpose.pipeline.roi.merge_regions) and
    prepared once (prepare_frame); each object's frame shares its merged region's rgb and depth
    tensors and adds only its own mask over it. Inside an object's own region the values are
    those its single-object frame would hold (the clean-up is local), and outside it there is
    more real observation rather than nothing.

    Args:
        rgb: (H,W,3) uint8, as validate_inputs returns it.
        depth: (H,W) float32 metres.
        K: (3,3) float64 full-frame intrinsics in pixels.
        masks: per object an (H,W) bool mask or None.
        regions: per object its CallRegion (chunkpose.pipeline.roi.call_region).
        diameters: per object its diameter in metres.
        engine: the Engine the dense clean-ups run through, or None.
        device: where the frames' tensors go.

    Returns:
        list of ObservedFrame, one per object, in the order given.
    """
    frames = [None] * len(regions)
    for region, members in merge_regions(regions):
        shared = prepare_frame(rgb, depth, K, None, region, diameters[members[0]], engine, device)
        x0, y0, x1, y1 = region.roi
        for i in members:
            mask = upload(masks[i][y0:y1, x0:x1], device) if masks[i] is not None else None
            frames[i] = dataclasses.replace(shared, mask=mask, diameter=float(diameters[i]))
    return frames
