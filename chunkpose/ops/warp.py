"""Many crops from ONE full-resolution image, without B copies of it.

Crop pixel q (integer coordinates, pixel centres) of hypothesis b samples the full frame at
``p = T_b^-1 q`` (the align_corners=False convention of kornia's warp_perspective). Positions
are computed in float64 from the float64 inverse of the transforms; "nearest" rounds half to
even, as grid_sample(mode="nearest") does (std::nearbyint / rint), so an exact tie such as
40.5 goes to 40 and 41.5 to 42.

Only the region that crops read needs to be passed: ``image`` may be the window of the full
frame starting at ``origin=(x0, y0)`` (see crops.crop_roi); transforms stay full-frame and
positions outside the window read zero, exactly like positions outside the full image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext
from .crops import inverse_transforms, sampling_maps
from .depth import OnDemandClean, as_depth_tensor, intrinsics
from .geometry import backproject_into

SEMANTICS = {"refiner": 0, "scorer": 1}


# ----------------------------------------------------------------------------- validation
def _check_transforms(transforms) -> torch.Tensor:
    if not isinstance(transforms, torch.Tensor):
        transforms = torch.as_tensor(transforms)
    if transforms.dim() == 2:
        transforms = transforms[None]
    if transforms.dim() != 3 or transforms.shape[1:] != (3, 3):
        raise ValueError(f"transforms must be (B,3,3) full-image -> crop pixel maps, got shape {tuple(transforms.shape)}")
    return transforms


def _check_size(size) -> int:
    if int(size) != size or size <= 0:
        raise ValueError(f"size must be a positive integer (crop side in pixels), got {size}")
    return int(size)


def _check_origin(origin) -> tuple[int, int]:
    if origin is None:
        return 0, 0
    if len(origin) != 2 or any(int(v) != v for v in origin):
        raise ValueError(f"origin must be integer (x0, y0) full-frame pixel of the image's first pixel, got {origin}")
    return int(origin[0]), int(origin[1])


# ----------------------------------------------------------------------------- sampling positions
def _crop_grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.arange(size, dtype=torch.float64, device=device)
    return q[None, None, :], q[None, :, None]  # qx (1,1,s), qy (1,s,1)


def _apply(M: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Unrounded ``M (B,3,3) float64`` applied to (x, y): ((a*x + b*y) + c) / ((g*x + h*y) + i),
    the operation order of the C++/CUDA kernels (csrc/pixel_math.h). x, y may be float32
    (integer-valued positions): they are promoted to float64 exactly. In-place steps keep the
    temporaries to one (B,s,s) buffer at a time."""
    m = M[:, :, :, None, None]

    def affine_row(i):
        acc = x * m[:, i, 0]
        term = y * m[:, i, 1]
        acc = acc.add_(term) if acc.shape == torch.broadcast_shapes(acc.shape, term.shape) else acc + term
        return acc.add_(m[:, i, 2])

    den = affine_row(2)
    px = affine_row(0).div_(den)
    py = affine_row(1).div_(den)
    return px, py


def _nearest_index(M, x, y, x0: int, y0: int, w: int, h: int):
    """Rounded positions (px, py) float64 (B,s,s) of M applied to (x, y), and the flat index
    into the (h,w) window at (x0,y0), -1 outside (csrc nearest_index)."""
    px, py = _apply(M, x, y)
    torch.round(px, out=px)  # half to even, like nearbyint
    torch.round(py, out=py)
    px.sub_(x0)  # window coordinates (exact: integer-valued doubles)
    py.sub_(y0)
    valid = (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
    flat = (py * w).add_(px).masked_fill_(~valid, -1.0)
    flat = flat.long()
    px.add_(x0)
    py.add_(y0)
    return px, py, flat


def sample_positions(transforms: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-frame positions (px, py) (B,size,size) float64 that the crop pixels sample (unrounded).

    Args:
        transforms: (B,3,3) or (3,3) full-image pixel -> crop pixel maps.
        size: crop side in pixels.

    Returns:
        (px, py): two (B,size,size) float64 tensors of full-frame pixel coordinates (exact
        sampling: crop pixel q reads T^-1 q), on the transforms' device.

    Raises:
        ValueError: bad transforms shape or size.
    """
    transforms = _check_transforms(transforms)
    Ti = inverse_transforms(transforms)
    qx, qy = _crop_grid(_check_size(size), Ti.device)
    return _apply(Ti, qx, qy)


# ----------------------------------------------------------------------------- image crops
def _bilinear_torch(image: torch.Tensor, inverses: torch.Tensor, size: int, origin: tuple[int, int]) -> torch.Tensor:
    """Bilinear crops (B,C,s,s) float32 of ``image (C,h,w)`` (any dtype) by gathering the four
    neighbours: positions, weights and sums in float64 in the order of the csrc kernel
    (bilinear_sample), so both give the same floats and only the crops are ever float."""
    C, h, w = image.shape
    B = inverses.shape[0]
    qx, qy = _crop_grid(size, image.device)
    lx, ly = _apply(inverses, qx, qy)
    lx.sub_(origin[0])
    ly.sub_(origin[1])
    finite = torch.isfinite(lx) & torch.isfinite(ly)
    lx, ly = torch.where(finite, lx, -2.0), torch.where(finite, ly, -2.0)  # outside: every corner misses
    fx, fy = torch.floor(lx), torch.floor(ly)
    ax, ay = lx.sub_(fx), ly.sub_(fy)
    ix, iy = fx.long(), fy.long()
    del fx, fy
    flat_image = image.reshape(C, h * w)
    out = torch.empty((B, C, size, size), dtype=torch.float32, device=image.device)
    corners = ((0, 0, 1.0 - ax, 1.0 - ay), (1, 0, ax, 1.0 - ay), (0, 1, 1.0 - ax, ay), (1, 1, ax, ay))
    acc = [torch.zeros((B, size, size), dtype=torch.float64, device=image.device) for _ in range(C)]
    for dx, dy, wx, wy in corners:
        cx, cy = ix + dx, iy + dy
        inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
        index = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).reshape(-1)
        weight = wx * wy
        for c in range(C):
            value = flat_image[c].index_select(0, index).reshape(B, size, size).double()
            acc[c] = acc[c] + torch.where(inside, weight * value, torch.zeros((), dtype=torch.float64,
                                                                                device=image.device))
    for c in range(C):
        out[:, c] = acc[c]
    return out


def _warp_op(inverses: torch.Tensor, *, image: torch.Tensor, size: int, mode: str, origin: tuple[int, int]):
    """Crops (B,C,s,s) of ``image (C,h,w)`` (the window at ``origin``) for ``inverses (B,3,3)``:
    nearest in image's dtype, bilinear in float32."""
    C, h, w = image.shape
    B = inverses.shape[0]
    qx, qy = _crop_grid(size, image.device)
    if mode == "nearest":
        _, _, flat = _nearest_index(inverses, qx, qy, origin[0], origin[1], w, h)
        valid = flat >= 0
        vals = image.reshape(C, h * w)[:, flat.clamp_(min=0).reshape(-1)].reshape(C, B, size, size)
        vals = torch.where(valid[None], vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
        return vals.permute(1, 0, 2, 3).contiguous()
    if image.requires_grad:
        return _bilinear_grid_sample(image, inverses, size, origin)
    if _ext.use_ext(image.device) and image.dtype in (torch.uint8, torch.float32):
        return _ext.ops().warp_bilinear(image, inverses, size, origin[0], origin[1])
    return _bilinear_torch(image, inverses, size, origin)


def _bilinear_grid_sample(image, inverses, size, origin):
    """Differentiable bilinear crops through grid_sample (when autograd needs the image)."""
    C, h, w = image.shape
    B = inverses.shape[0]
    qx, qy = _crop_grid(size, image.device)
    px, py = _apply(inverses, qx, qy)
    # Normalised coordinates of grid_sample(align_corners=False): -1 and 1 are the outer pixel edges.
    px.sub_(origin[0]).mul_(2.0).add_(1.0).div_(w).sub_(1.0)
    py.sub_(origin[1]).mul_(2.0).add_(1.0).div_(h).sub_(1.0)
    grid = torch.stack([px.to(image.dtype), py.to(image.dtype)], dim=-1)  # (B,s,s,2)
    del px, py
    # One grid of B*s rows over the batch-1 image: no expanded copy, image-sized gradient.
    out = F.grid_sample(image[None], grid.reshape(1, B * size, size, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False)  # (1,C,B*s,s)
    return out.reshape(C, B, size, size).permute(1, 0, 2, 3).contiguous()


def _warp_item_bytes(image: torch.Tensor, size: int, mode: str) -> int:
    """Peak bytes per crop of _warp_op: the output, the float64 positions and, on the torch
    path, the float64 weights, sums and gathers of the bilinear gather."""
    C = image.shape[0]
    pixels = size * size
    if mode == "nearest":
        return pixels * (8 * 4 + image.element_size() * C * 2)
    if _ext.use_ext(image.device):
        return pixels * 4 * C
    return pixels * (8 * 10 + 8 * C + 4 * C)


def warp_crops(image: torch.Tensor, transforms, size: int, mode: str = "bilinear", origin=(0, 0),
               engine=None, sampling: str = "exact", source_size=None) -> torch.Tensor:
    """Crops of one image under many transforms, without B copies of it.

    With "exact" this equals ``kornia.geometry.transform.warp_perspective(image.expand(B,C,H,W),
    transforms, (size,size), mode=mode, align_corners=False)`` of kornia >= 0.7.3 (bilinear to
    float rounding; nearest exactly except where kornia's float32 position lands on the other
    side of an exact .5 tie): the B sampling grids are folded into one grid over the batch-1 image.

    Args:
        image: (C,H,W) (float, uint8 or bool), the full frame or its window starting at ``origin``.
        transforms: (B,3,3) (or (3,3)) full-image pixel -> crop pixel.
        size: crop side in pixels.
        mode: "bilinear" (default) or "nearest" (round half to even, as grid_sample).
        origin: (x0, y0) integer full-frame pixel of ``image``'s first pixel (default (0, 0)).
        engine: optional Engine; the crops then run as its stage "crops.warp_<mode>".
        sampling: "exact" (crop pixel q reads T^-1 q) or "kornia_0.7.2" (the position kornia
            0.7.2 reads, see chunkpose.ops.crops.sampling_maps); the latter needs
            ``source_size``.
        source_size: (H, W) of the full frame in pixels (for "kornia_0.7.2"); None otherwise.

    Returns:
        (B,C,size,size) on the image's device: bilinear float32 (the image's dtype when autograd
        needs the image), nearest in the image's dtype; zero outside the image.

    Raises:
        ValueError: ``image`` is not (C,H,W), an unknown ``mode`` or ``sampling``, bad transforms,
            size or origin.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError(f"image must be a (C,H,W) tensor, got {getattr(image, 'shape', type(image))}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    transforms = _check_transforms(transforms)
    size = _check_size(size)
    origin = _check_origin(origin)
    _, inverses = sampling_maps(transforms, size, source_size, sampling)
    inverses = inverses.to(image.device)
    kwargs = dict(image=image, size=size, mode=mode, origin=origin)
    if engine is None:
        return _warp_op(inverses, **kwargs)
    return engine.map(_warp_op, inverses, name=f"crops.warp_{mode}", per_item_bytes=_warp_item_bytes(image, size, mode),
                      **kwargs)


# ----------------------------------------------------------------------------- xyz crops
def _xyz_crops_torch(depth, transforms, inverses, intr, size, code, origin):
    h, w = depth.shape
    B = transforms.shape[0]
    qx, qy = _crop_grid(size, depth.device)
    px, py, flat = _nearest_index(inverses, qx, qy, origin[0], origin[1], w, h)
    valid = flat >= 0
    zero = torch.zeros((), dtype=depth.dtype, device=depth.device)
    # Refiner semantics: the depth at the nearest full-frame pixel. For the scorer this is also
    # the observed depth crop (crop pixel r holds depth[nearest(T^-1 r)]).
    z = torch.where(valid, depth.reshape(-1)[flat.clamp_(min=0)], zero)
    del flat
    u, v = px.float(), py.float()  # integer-valued positions: exact in float32 where valid
    del px, py
    if code == SEMANTICS["scorer"]:
        # r = nearest(T p) inside the crop; depth there is the crop's depth at r.
        rx, ry, r_flat = _nearest_index(transforms, u, v, 0, 0, size, size)
        del rx, ry
        ok = valid & (r_flat >= 0)
        z = torch.where(ok, z.reshape(B, -1).gather(1, r_flat.clamp_(min=0).reshape(B, -1)).reshape(B, size, size),
                        zero)
        del r_flat, ok
    out = torch.empty((B, 3, size, size), dtype=torch.float32, device=depth.device)
    backproject_into((out[:, 0], out[:, 1], out[:, 2]), u, v, z, *intr)
    return out


def _xyz_crops_op(transforms, inverses, *, depth, intr, size, code, origin, clean=None):
    """The observed xyz crops (B,3,s,s) for ``transforms/inverses (B,3,3) float64``."""
    if clean is not None:
        return _xyz_crops_cleaned(transforms, inverses, depth, intr, size, code, origin, clean)
    if _ext.use_ext(depth.device):
        fx, fy, cx, cy = intr
        return _ext.ops().xyz_crops(depth, transforms, inverses, fx, fy, cx, cy, size, code, origin[0], origin[1])
    return _xyz_crops_torch(depth, transforms, inverses, intr, size, code, origin)


def _xyz_crops_cleaned(transforms, inverses, raw, intr, size, code, origin, clean: OnDemandClean):
    """xyz crops of raw depth cleaned at the sampled pixels (csrc), or, on the torch path, of
    the raw window cleaned densely and cut to the ROI (the same values)."""
    x0, y0, x1, y1 = (int(v) for v in clean.roi)
    H, W = (int(v) for v in clean.full_size)
    cu = clean.cleanup
    if _ext.use_ext(raw.device):
        fx, fy, cx, cy = intr
        return _ext.ops().xyz_crops_cleaned(raw, transforms, inverses, fx, fy, cx, cy, size, code, x0, y0, x1 - x0,
                                            y1 - y0, origin[0], origin[1], H, W, cu.erode_radius, cu.depth_diff_thres,
                                            cu.ratio_thres, cu.bilateral_radius, cu.sigma_d, cu.sigma_r, cu.zfar)
    cleaned = cu.dense(raw)
    roi = cleaned[y0 - origin[1]: y1 - origin[1], x0 - origin[0]: x1 - origin[0]].contiguous()
    return _xyz_crops_torch(roi, transforms, inverses, intr, size, code, (x0, y0))


def xyz_crops(depth, K, transforms, size: int, semantics: str = "refiner", origin=(0, 0),
              engine=None, sampling: str = "exact", source_size=None, clean: OnDemandClean | None = None
              ) -> torch.Tensor:
    """The observed point map inside each crop, camera-frame metres.

    For axis-aligned crops (box_3d) and exact sampling the scorer's round trip returns to p, so
    both semantics agree there except at exact .5 ties.

    Args:
        depth: (H,W) float32 metres (tensor or numpy array), the full frame or its window at
            ``origin``.
        K: (3,3) full-frame intrinsics in pixels.
        transforms: (B,3,3) (or (3,3)) full-image pixel -> crop pixel.
        size: crop side in pixels.
        semantics: with p = nearest(T^-1 q),
            "refiner" (default): xyz_full[p] (the nearest warp of the full point map);
            "scorer": backproject(p, depth_crop[nearest(T p)]) where depth_crop is the
            nearest warp of the depth: the crop -> full frame -> crop round trip upstream
            makes through per-hypothesis full-resolution buffers, computed here per crop
            pixel (memory O(B*size*size), never O(B*H*W)).
        origin: (x0, y0) integer full-frame pixel of ``depth``'s first pixel (default (0, 0)).
        engine: optional Engine (stage "crops.xyz_<semantics>").
        sampling: "exact" or "kornia_0.7.2" (each warp of the chain with kornia 0.7.2's
            offset for its own source, see chunkpose.ops.crops.sampling_maps); the latter
            needs ``source_size``.
        source_size: (H, W) of the full frame in pixels (for "kornia_0.7.2"); None otherwise.
        clean: None when ``depth`` is cleaned already; an OnDemandClean when ``depth`` is the
            RAW depth of a window (at ``origin``) holding its ROI and the filters' halo: each
            sampled depth is then cleaned on the spot, exactly as cleaning the frame first.

    Returns:
        (B,3,size,size) float32 camera-frame points in metres on the depth's device, zero where
        the depth is < MIN_DEPTH or the position falls outside the image.

    Raises:
        ValueError: an unknown ``semantics`` or ``sampling``, bad depth, K, transforms, size or
            origin.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be 'refiner' or 'scorer', got {semantics!r}")
    depth = as_depth_tensor(depth).contiguous()
    intr = intrinsics(K)
    transforms = _check_transforms(transforms)
    size = _check_size(size)
    origin = _check_origin(origin)
    forward, inverses = sampling_maps(transforms, size, source_size, sampling)
    T64 = forward.to(depth.device).contiguous()
    Ti64 = inverses.to(depth.device).contiguous()
    kwargs = dict(depth=depth, intr=intr, size=size, code=SEMANTICS[semantics], origin=origin, clean=clean)
    if engine is None:
        return _xyz_crops_op(T64, Ti64, **kwargs)
    ext = _ext.use_ext(depth.device)
    per_item = size * size * (12 if ext else 12 + 8 * 8)
    return engine.map(_xyz_crops_op, T64, Ti64, name=f"crops.xyz_{semantics}", per_item_bytes=per_item,
                      fixed_bytes=0, **kwargs)
