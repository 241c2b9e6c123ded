"""Depth clean-up and the point map, on the full frame.

Both filters are local (2*radius+1)^2 windows, clipped at the image border (only pixels inside
the image count). They are computed per band of rows: a band reads ``radius`` halo rows above
and below from the full depth map, so any banding gives exactly the whole-frame result. With
``engine=...`` the row bands are chosen by the engine (``engine.map`` over a row-index tensor,
the full depth passed whole as a keyword argument).

Over 400 lines mostly because of the Args/Returns documentation of its public API; the code
is one concern and splitting it would scatter it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import _ext
from .geometry import MIN_DEPTH, backproject_into



@dataclass(frozen=True)
class CleanUp:
    """FoundationPose's depth clean-up: erode (radius 2, 1 mm, 80%), then the hole-filling
    bilateral filter (radius 2, sigma_d 2, sigma_r 1e5), both with zfar.

    Both are local windows, so a pixel's cleaned depth depends on raw depth up to ``halo``
    pixels away: cleaning a window plus that halo, or cleaning just the pixels that crops
    sample (``xyz_crops(..., clean=OnDemandClean(...))``), gives exactly the full-frame result.

    Attributes:
        erode_radius: erosion window radius in pixels (window 2r+1 square).
        depth_diff_thres: metres; a neighbour farther than this from the centre counts as bad.
        ratio_thres: fraction of bad window pixels above which the centre is dropped.
        bilateral_radius: bilateral window radius in pixels.
        sigma_d: spatial sigma in pixels.
        sigma_r: depth sigma in metres.
        zfar: metres; depths >= zfar are invalid.
    """

    erode_radius: int = 2
    depth_diff_thres: float = 0.001
    ratio_thres: float = 0.8
    bilateral_radius: int = 2
    sigma_d: float = 2.0
    sigma_r: float = 1e5
    zfar: float = 100.0

    @property
    def halo(self) -> int:
        return self.erode_radius + self.bilateral_radius

    def erode(self, depth, engine=None) -> torch.Tensor:
        """The first filter on a whole map ``depth (H,W)`` (row bands through ``engine``).

        Args:
            depth: (H,W) float32 metres (tensor or numpy array).
            engine: optional Engine; the row bands then run as its stage "depth.erode".

        Returns:
            (H,W) float32 eroded depth in metres on the depth's device.
        """
        return erode_depth(depth, self.erode_radius, self.depth_diff_thres, self.ratio_thres, self.zfar, engine)

    def bilateral(self, depth, engine=None) -> torch.Tensor:
        """The second filter on a whole (eroded) map ``depth (H,W)``.

        Args:
            depth: (H,W) float32 metres (tensor or numpy array).
            engine: optional Engine; the row bands then run as its stage "depth.bilateral".

        Returns:
            (H,W) float32 filtered depth in metres on the depth's device.
        """
        return bilateral_filter_depth(depth, self.bilateral_radius, self.sigma_d, self.sigma_r, self.zfar, engine)

    def dense(self, depth, engine=None) -> torch.Tensor:
        """Cleaned depth (H,W) of a whole map ``depth (H,W)`` (row bands through ``engine``).

        Args:
            depth: (H,W) float32 raw depth in metres (tensor or numpy array).
            engine: optional Engine running both filters' row bands.

        Returns:
            (H,W) float32 cleaned depth in metres on the depth's device.
        """
        return self.bilateral(self.erode(depth, engine), engine)


@dataclass(frozen=True)
class OnDemandClean:
    """Raw depth cleaned at the sampled pixels only (tracking: one hypothesis reads a few
    thousand pixels of a frame of millions).

    The raw window handed to xyz_crops (at its ``origin``) must hold the ROI and
    ``cleanup.halo`` pixels around it, clipped to the frame.

    Attributes:
        roi: (x0, y0, x1, y1) ints, end-exclusive: the full-frame pixels crops may read (outside:
            no depth).
        full_size: (H, W) of the full frame in pixels.
        cleanup: the CleanUp parameters (default: FoundationPose's).
    """

    roi: tuple
    full_size: tuple
    cleanup: CleanUp = CleanUp()


# ----------------------------------------------------------------------------- validation
def as_depth_tensor(depth, name: str = "depth") -> torch.Tensor:
    """``depth (H,W)`` float32 tensor (numpy arrays are wrapped without a copy when possible).

    Args:
        depth: (H,W) tensor or numpy array in metres; float dtypes other than float32 are converted.
        name: the argument's name for error messages.

    Returns:
        (H,W) float32 tensor (same device as a tensor input).

    Raises:
        ValueError: not a tensor/array, not 2-D, or an integer dtype (raw sensor units).
    """
    if isinstance(depth, np.ndarray):
        depth = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))
    if not isinstance(depth, torch.Tensor):
        raise ValueError(f"{name} must be a (H,W) float32 tensor or array, got {type(depth).__name__}")
    if depth.dim() != 2:
        raise ValueError(f"{name} must be (H,W), got shape {tuple(depth.shape)}; squeeze channel axes first")
    if depth.dtype != torch.float32:
        if depth.dtype in (torch.uint16, torch.int16, torch.int32, torch.int64):
            raise ValueError(f"{name} must be float32 metres, got {depth.dtype}; divide raw millimetres by 1000")
        depth = depth.float()
    return depth


def intrinsics(K) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) of ``K (3,3)`` as Python floats holding float32 values: every
    implementation then rounds them the same way.

    Args:
        K: (3,3) intrinsics in pixels (tensor or array-like).

    Returns:
        (fx, fy, cx, cy) floats in pixels.

    Raises:
        ValueError: K is not (3,3), not finite, or has a non-positive focal length.
    """
    K = K.detach().cpu().double().numpy() if isinstance(K, torch.Tensor) else np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"K must be a (3,3) intrinsics matrix, got shape {K.shape}")
    if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"K must be finite with positive focal lengths, got fx={K[0, 0]}, fy={K[1, 1]}")
    return tuple(float(np.float32(v)) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))


def _check_radius(radius: int) -> int:
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius}")
    return int(radius)


# ----------------------------------------------------------------------------- torch path
def _window_views(depth: torch.Tensor, row_start: int, row_end: int, radius: int):
    """The band's centre rows and a zero-padded halo block; yields (dy, dx, neighbour view)."""
    H, W = depth.shape
    a, b = max(row_start - radius, 0), min(row_end + radius, H)
    top, bottom = radius - (row_start - a), radius - (b - row_end)
    padded = F.pad(depth[a:b][None, None], (radius, radius, top, bottom), value=0.0)[0, 0]
    n = row_end - row_start

    def neighbours():
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                yield dy, dx, padded[radius + dy: radius + dy + n, radius + dx: radius + dx + W]

    return depth[row_start:row_end], neighbours


def _inside_counts(H: int, W: int, row_start: int, row_end: int, radius: int, device) -> torch.Tensor:
    """Number of window pixels inside the image, per pixel of the band (n,W) int32."""
    v = torch.arange(row_start, row_end, device=device, dtype=torch.int32)
    u = torch.arange(W, device=device, dtype=torch.int32)
    rows = (v + radius).clamp(max=H - 1) - (v - radius).clamp(min=0) + 1
    cols = (u + radius).clamp(max=W - 1) - (u - radius).clamp(min=0) + 1
    return rows[:, None] * cols[None, :]


def _erode_rows_torch(depth, row_start, row_end, radius, diff_thres, ratio_thres, zfar):
    H, W = depth.shape
    centre, neighbours = _window_views(depth, row_start, row_end, radius)
    bad = torch.zeros(centre.shape, dtype=torch.int32, device=depth.device)
    for _, _, nb in neighbours():
        # Padding is 0 and so counts as bad: corrected below with the inside counts.
        bad += (nb < MIN_DEPTH) | (nb >= zfar) | ((nb - centre).abs() > diff_thres)
    inside = _inside_counts(H, W, row_start, row_end, radius, depth.device)
    bad -= (2 * radius + 1) ** 2 - inside
    ratio = bad.float() / inside.float()
    reject = (ratio > ratio_thres) | (centre < MIN_DEPTH) | (centre >= zfar)
    return torch.where(reject, torch.zeros((), dtype=depth.dtype, device=depth.device), centre)


def _bilateral_rows_torch(depth, row_start, row_end, radius, sigma_d, sigma_r, zfar):
    centre, neighbours = _window_views(depth, row_start, row_end, radius)
    zero = torch.zeros((), dtype=depth.dtype, device=depth.device)
    total = torch.zeros_like(centre)
    count = torch.zeros(centre.shape, dtype=torch.int32, device=depth.device)
    for _, _, nb in neighbours():
        valid = (nb >= MIN_DEPTH) & (nb < zfar)
        total += torch.where(valid, nb, zero)
        count += valid
    mean = total / count.float()
    del total
    # The same float32 constants as the C++ kernel.
    two_sd2 = np.float32(2.0) * np.float32(sigma_d) * np.float32(sigma_d)
    two_sr2 = float(np.float32(2.0) * np.float32(sigma_r) * np.float32(sigma_r))
    sw = torch.zeros_like(centre)
    swd = torch.zeros_like(centre)
    for dy, dx, nb in neighbours():
        ok = (nb >= MIN_DEPTH) & (nb < zfar) & ((nb - mean).abs() < 0.01)
        spatial = float(np.float32(dx * dx + dy * dy) / two_sd2)
        diff = centre - nb
        w = torch.exp(-spatial - diff * diff / two_sr2)
        sw += torch.where(ok, w, zero)
        swd += torch.where(ok, w * nb, zero)
    keep = (count > 0) & (sw > 0)
    return torch.where(keep, swd / sw, zero)


# ----------------------------------------------------------------------------- band ops
def erode_rows(rows: torch.Tensor, *, depth: torch.Tensor, radius: int = 2, depth_diff_thres: float = 0.001,
               ratio_thres: float = 0.8, zfar: float = 100.0) -> torch.Tensor:
    """Eroded depth of the consecutive image rows ``rows (n,)`` of ``depth (H,W)`` -> (n,W).

    The band reads its halo from the full ``depth``, so the result does not depend on banding
    (the op erode_depth maps over rows).

    Args:
        rows: (n,) int tensor of consecutive row indices (only the first and last are read).
        depth: (H,W) float32 metres, the whole map.
        radius: window radius in pixels.
        depth_diff_thres: metres, see erode_depth.
        ratio_thres: fraction, see erode_depth.
        zfar: metres, see erode_depth.

    Returns:
        (n,W) float32 eroded depth in metres.
    """
    if rows.numel() == 0:
        return depth.new_empty((0, depth.shape[1]))
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    if _ext.use_ext(depth.device):
        return _ext.ops().erode_depth(depth, r0, r1, radius, depth_diff_thres, ratio_thres, zfar)
    return _erode_rows_torch(depth, r0, r1, radius, depth_diff_thres, ratio_thres, zfar)


def bilateral_rows(rows: torch.Tensor, *, depth: torch.Tensor, radius: int = 2, sigma_d: float = 2.0,
                   sigma_r: float = 1e5, zfar: float = 100.0) -> torch.Tensor:
    """Bilateral-filtered depth of the consecutive rows ``rows (n,)`` of ``depth (H,W)`` -> (n,W).

    Args:
        rows: (n,) int tensor of consecutive row indices (only the first and last are read).
        depth: (H,W) float32 metres, the whole map.
        radius: window radius in pixels.
        sigma_d: spatial sigma in pixels.
        sigma_r: depth sigma in metres.
        zfar: metres; depths >= zfar are invalid.

    Returns:
        (n,W) float32 filtered depth in metres.
    """
    if rows.numel() == 0:
        return depth.new_empty((0, depth.shape[1]))
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    if _ext.use_ext(depth.device):
        return _ext.ops().bilateral_filter_depth(depth, r0, r1, radius, sigma_d, sigma_r, zfar)
    return _bilateral_rows_torch(depth, r0, r1, radius, sigma_d, sigma_r, zfar)


def band_hints(width: int, radius: int, device="cpu") -> dict:
    """Cost hints for engine.map over rows of a map ``width`` pixels wide.

    The csrc kernels allocate just their output rows; the torch path keeps about a dozen (n,W)
    float32 temporaries per band plus a zero-padded halo of 2*radius rows.

    Args:
        width: map width W in pixels.
        radius: filter radius in pixels.
        device: where the filter runs (decides csrc or torch path).

    Returns:
        dict of Engine.map keyword arguments: per_item_bytes, fixed_bytes and out_per_item_bytes
        (bytes per row).
    """
    out = {"out_per_item_bytes": 4 * int(width)}  # one float32 output row
    if _ext.use_ext(device):
        return {"per_item_bytes": 4 * int(width), "fixed_bytes": 0, **out}
    return {"per_item_bytes": 14 * 4 * int(width), "fixed_bytes": 4 * 2 * int(radius) * int(width) * 4, **out}


def _run_rows(fn, depth, engine, name, **params):
    rows = torch.arange(depth.shape[0], device=depth.device)
    if engine is None:
        return fn(rows, depth=depth, **params)
    return engine.map(fn, rows, name=name, depth=depth, **band_hints(depth.shape[1], params["radius"], depth.device),
                      **params)


# ----------------------------------------------------------------------------- public API
def erode_depth(depth, radius: int = 2, depth_diff_thres: float = 0.001, ratio_thres: float = 0.8,
                zfar: float = 100.0, engine=None) -> torch.Tensor:
    """Erode ``depth (H,W)`` metres -> (H,W).

    A pixel keeps its depth unless more than ``ratio_thres`` of the pixels of its window inside
    the image are bad (depth < 0.001, >= zfar, or farther than ``depth_diff_thres`` from the
    centre); invalid centres become 0.

    Args:
        depth: (H,W) float32 metres (tensor or numpy array).
        radius: window radius in pixels (default 2: a 5x5 window).
        depth_diff_thres: metres (default 0.001).
        ratio_thres: fraction of bad window pixels tolerated (default 0.8).
        zfar: metres; depths >= zfar are invalid (default 100).
        engine: optional Engine; the row bands then run as its stage "depth.erode".

    Returns:
        (H,W) float32 eroded depth in metres on the depth's device.

    Raises:
        ValueError: bad depth (see as_depth_tensor) or a negative / non-integer radius.
    """
    depth = as_depth_tensor(depth).contiguous()
    radius = _check_radius(radius)
    return _run_rows(erode_rows, depth, engine, "depth.erode", radius=radius,
                     depth_diff_thres=float(depth_diff_thres), ratio_thres=float(ratio_thres), zfar=float(zfar))


def bilateral_filter_depth(depth, radius: int = 2, sigma_d: float = 2.0, sigma_r: float = 1e5,
                           zfar: float = 100.0, engine=None) -> torch.Tensor:
    """Hole-filling bilateral filter of ``depth (H,W)`` -> (H,W).

    The mean of the valid window depths (0.001 <= d < zfar), then the mean of the valid window
    depths within 0.01 m of it, weighted by exp(-(du^2+dv^2)/(2 sigma_d^2) -
    (d_centre-d)^2/(2 sigma_r^2)); 0 where the window holds no valid depth.

    Args:
        depth: (H,W) float32 metres (tensor or numpy array).
        radius: window radius in pixels (default 2).
        sigma_d: spatial sigma in pixels (default 2).
        sigma_r: depth sigma in metres (default 1e5: effectively no depth weighting).
        zfar: metres; depths >= zfar are invalid (default 100).
        engine: optional Engine; the row bands then run as its stage "depth.bilateral".

    Returns:
        (H,W) float32 filtered depth in metres on the depth's device.

    Raises:
        ValueError: bad depth (see as_depth_tensor) or a negative / non-integer radius.
    """
    depth = as_depth_tensor(depth).contiguous()
    radius = _check_radius(radius)
    return _run_rows(bilateral_rows, depth, engine, "depth.bilateral", radius=radius,
                     sigma_d=float(sigma_d), sigma_r=float(sigma_r), zfar=float(zfar))


def depth_to_xyz(depth, K, out: torch.Tensor | None = None, row_offset: int = 0) -> torch.Tensor:
    """Point map of ``depth (h,W)`` -> ``out (h,W,3)`` camera-frame metres, written in place.

    ``xyz = ((u - cx) z / fx, (v - cy) z / fy, z)``, zero where z < MIN_DEPTH. ``row_offset`` is
    the full-frame row of depth's first row, so a band of rows can be written into the matching
    band of a preallocated full-frame map: ``depth_to_xyz(depth[a:b], K, out=xyz[a:b], row_offset=a)``.

    Args:
        depth: (h,W) float32 metres (tensor or numpy array).
        K: (3,3) full-frame intrinsics in pixels.
        out: optional (h,W,3) float32 tensor on the depth's device; None allocates one.
        row_offset: full-frame row index of depth's first row (default 0).

    Returns:
        ``out``: (h,W,3) float32 camera-frame points in metres.

    Raises:
        ValueError: bad depth or K, or ``out`` of the wrong shape, dtype or device.
    """
    depth = as_depth_tensor(depth)
    fx, fy, cx, cy = intrinsics(K)
    h, W = depth.shape
    if out is None:
        out = torch.empty((h, W, 3), dtype=torch.float32, device=depth.device)
    elif out.shape != (h, W, 3) or out.dtype != torch.float32 or out.device != depth.device:
        raise ValueError(f"out must be a float32 (H,W,3) = {(h, W, 3)} tensor on {depth.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if _ext.use_ext(depth.device):
        _ext.ops().depth_to_xyz_out(depth, fx, fy, cx, cy, int(row_offset), out)
        return out
    u = torch.arange(W, dtype=torch.float32, device=depth.device)
    v = torch.arange(row_offset, row_offset + h, dtype=torch.float32, device=depth.device)[:, None]
    backproject_into((out[..., 0], out[..., 1], out[..., 2]), u, v, depth, fx, fy, cx, cy)
    return out
