"""The naive memory pattern of upstream's scorer, kept as a reference and as a baseline.

Never used by the pipeline. FoundationPose's scorer prepares its observed xyz crops through
per-hypothesis full-resolution buffers (upstream's score predictor, make_crop_data_batch and its
dataset's transform_depth_to_xyzmap):

1. the depth is warped into each 160x160 crop (nearest);
2. each depth crop is warped back to a full-resolution depth image per hypothesis (nearest):
   ``depth (B,1,H,W)`` float32, plus its invalid mask ``(B,1,H,W)`` bool;
3. each of those is back-projected with per-hypothesis pixel grids ``u, v (B,H,W)`` float32
   into a full-resolution point map ``(B,3,H,W)`` float32;
4. the point maps are warped into the crops again (nearest).

At the point-map step all of these are live at once: 25 bytes per hypothesis per full-frame
pixel, about 37 GiB for 252 hypotheses at 3072x2048 (and growing linearly with H*W).
``naive_scorer_xyz_crops`` allocates exactly that (nothing is chunked), and gives exactly
``xyz_crops(..., semantics="scorer")``: the tests use it as the full-frame reference and the
benchmarks as the upstream baseline. ``naive_scorer_peak_bytes`` is its peak from the shapes.
"""
from __future__ import annotations

import torch

from .depth import MIN_DEPTH, as_depth_tensor, intrinsics
from .crops import sampling_maps
from .warp import warp_crops

#: Live bytes per hypothesis per full-frame pixel at the peak: depth f32, invalid mask bool,
#: two pixel grids f32, points (3 x f32).
BYTES_PER_HYPOTHESIS_PIXEL = 4 + 1 + 2 * 4 + 3 * 4
#: Pixels per band while filling the per-hypothesis full-frame depth (keeps the float64
#: position temporaries small next to the full-frame buffers).
_BAND_PIXELS = 1 << 16


def naive_scorer_peak_bytes(hypotheses: int, height: int, width: int, size: int = 160) -> int:
    """Predicted peak of ``naive_scorer_xyz_crops`` (bytes) for ``hypotheses`` crops of
    ``size`` from a ``height x width`` frame: the full-resolution per-hypothesis buffers plus
    the depth crops and the output crops (the input depth itself not included)."""
    B, H, W, s = int(hypotheses), int(height), int(width), int(size)
    return B * H * W * BYTES_PER_HYPOTHESIS_PIXEL + B * s * s * (4 + 3 * 4)


def _back_to_full_frame(depth_crop: torch.Tensor, T: torch.Tensor, us: torch.Tensor, vs: torch.Tensor,
                        out: torch.Tensor) -> None:
    """out (H,W) <- depth_crop (s,s) at nearest(T p) for every full-frame pixel p, 0 outside
    the crop. T (3,3) float64; us, vs (H,W) float32 pixel grids."""
    H, W = out.shape
    s = depth_crop.shape[-1]
    flat_crop = depth_crop.reshape(-1)
    rows = max(1, _BAND_PIXELS // W)
    for r0 in range(0, H, rows):
        u = us[r0:r0 + rows].double()
        v = vs[r0:r0 + rows].double()
        den = T[2, 0] * u + T[2, 1] * v + T[2, 2]
        rx = torch.round((T[0, 0] * u + T[0, 1] * v + T[0, 2]) / den)
        ry = torch.round((T[1, 0] * u + T[1, 1] * v + T[1, 2]) / den)
        ok = (rx >= 0) & (rx <= s - 1) & (ry >= 0) & (ry <= s - 1)
        index = (ry * s + rx).masked_fill_(~ok, 0).long()
        out[r0:r0 + rows] = torch.where(ok, flat_crop[index], torch.zeros((), dtype=out.dtype))


def naive_scorer_xyz_crops(depth, K, transforms, size: int, sampling: str = "exact") -> torch.Tensor:
    """Observed xyz crops ``(B,3,size,size)`` with scorer semantics, computed the naive way.

    ``depth (H,W)`` float32 metres (full frame), ``K (3,3)``, ``transforms (B,3,3)`` full-image
    pixel -> crop pixel, ``sampling`` "exact" or "kornia_0.7.2" (every warp of the chain with
    kornia 0.7.2's offset for its own source). Equals ``chunkpose.ops.xyz_crops(depth, K,
    transforms, size, "scorer", sampling=sampling, source_size=(H, W))`` exactly, but peaks at
    ``naive_scorer_peak_bytes(B, H, W, size)``: do not call it at full resolution with many
    hypotheses unless that much memory is free.
    """
    depth = as_depth_tensor(depth)
    H, W = depth.shape
    dev = depth.device
    T = torch.as_tensor(transforms)
    if T.dim() != 3 or T.shape[1:] != (3, 3):
        raise ValueError(f"transforms must be (B,3,3) full-image -> crop pixel maps, got shape {tuple(T.shape)}")
    T = T.to(dev)
    B = T.shape[0]
    fx, fy, cx, cy = intrinsics(K)
    depth_crop = warp_crops(depth[None], T, size, "nearest", sampling=sampling, source_size=(H, W))  # (B,1,s,s)
    forward, _ = sampling_maps(T, size, (H, W), sampling)  # full frame -> crop, for the warp back
    T64 = forward.to(dev)
    # per-hypothesis pixel grids and full-resolution depth
    us = torch.arange(W, dtype=torch.float32, device=dev).expand(B, H, W).contiguous()
    vs = torch.arange(H, dtype=torch.float32, device=dev)[:, None].expand(B, H, W).contiguous()
    depth_full = torch.empty((B, 1, H, W), dtype=torch.float32, device=dev)
    for b in range(B):
        _back_to_full_frame(depth_crop[b, 0], T64[b], us[b], vs[b], depth_full[b, 0])
    invalid = depth_full < MIN_DEPTH
    # per-hypothesis full-resolution point maps
    z = depth_full[:, 0]
    points = torch.empty((B, 3, H, W), dtype=torch.float32, device=dev)
    torch.mul(us.sub_(cx), z, out=points[:, 0])
    points[:, 0].div_(fx)
    torch.mul(vs.sub_(cy), z, out=points[:, 1])
    points[:, 1].div_(fy)
    points[:, 2].copy_(z)
    points.masked_fill_(invalid, 0.0)
    # and back into the crops
    out = torch.empty((B, 3, size, size), dtype=torch.float32, device=dev)
    for b in range(B):
        out[b] = warp_crops(points[b], T[b:b + 1], size, "nearest", sampling=sampling, source_size=(H, W))[0]
    return out
