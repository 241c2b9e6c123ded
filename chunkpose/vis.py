"""Pictures people look at: pose overlays and crop grids (numpy in, uint8 RGB out).

The overlay draws the object's 3D bounding box and its x/y/z axes (red/green/blue)
projected with K over the image; line widths grow with the image so that a 3072x2048
picture is as readable as a 640x480 one.
"""
from __future__ import annotations

import cv2
import numpy as np

# The 12 edges of a box whose corners are indexed by the bits (x, y, z) of 0..7.
_BOX_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]
_AXIS_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
#: Box colour of a pose on a frame where its track is lost (and not found again).
LOST_COLOUR = (255, 40, 40)


def box_corners(bounds) -> np.ndarray:
    """bounds (2,3) min/max corner -> corners (8,3); corner i takes max along axis k if bit k of i.

    Args:
        bounds: (2,3) array-like: min corner, max corner.

    Returns:
        (8,3) float64 corners in the bounds' units.
    """
    bounds = np.asarray(bounds, dtype=np.float64).reshape(2, 3)
    idx = np.arange(8)
    return np.stack([bounds[(idx >> k) & 1, k] for k in range(3)], axis=1)


def project(points, pose, K) -> tuple[np.ndarray, np.ndarray]:
    """points (N,3) in the model frame -> pixels (N,2) and camera depths (N,).

    Args:
        points: (N,3) model-frame points, metres.
        pose: (4,4) model-in-camera pose, metres.
        K: (3,3) intrinsics in pixels.

    Returns:
        (uv, z): (N,2) float64 pixels and (N,) float64 camera z in metres (may be <= 0).
    """
    pose = np.asarray(pose, dtype=np.float64)
    cam = np.asarray(points, dtype=np.float64) @ pose[:3, :3].T + pose[:3, 3]
    z = cam[:, 2]
    safe = np.where(np.abs(z) < 1e-9, 1e-9, z)
    uv = (cam @ np.asarray(K, dtype=np.float64).T)[:, :2] / safe[:, None]
    return uv, z


def _line_width(image) -> int:
    return max(1, int(round(max(image.shape[:2]) / 480)))


def _draw_segment(image, p0, p1, colour, width):
    # cv2 wants int pixel coordinates in a sane range; clip far-away points so a pose behind
    # or beside the camera cannot overflow.
    lim = 4 * max(image.shape[:2])
    a = tuple(int(round(v)) for v in np.clip(p0, -lim, lim))
    b = tuple(int(round(v)) for v in np.clip(p1, -lim, lim))
    cv2.line(image, a, b, colour, width, cv2.LINE_AA)


def draw_pose(image, pose, K, bounds, colour=(0, 255, 0), axis_length=None, width=None, label=None) -> np.ndarray:
    """Draw the box ``bounds`` (2,3) (model frame, metres) and axes at ``pose`` (4,4) into a copy.

    Edges with an end behind the camera are skipped.

    Args:
        image: (H,W,3) uint8 RGB.
        pose: (4,4) model-in-camera pose, metres.
        K: (3,3) intrinsics in pixels.
        bounds: (2,3) min/max corner of the box in the model frame, metres.
        colour: RGB box colour (default green).
        axis_length: axis length in metres; None = half the box diagonal.
        width: line width in pixels; None grows with the image (1 per 480 pixels).
        label: optional text written at the top left.

    Returns:
        (H,W,3) uint8 RGB new array.
    """
    out = np.ascontiguousarray(np.array(image, dtype=np.uint8, copy=True))
    width = width or _line_width(out)
    bounds = np.asarray(bounds, dtype=np.float64).reshape(2, 3)
    corners = box_corners(bounds)
    uv, z = project(corners, pose, K)
    for a, b in _BOX_EDGES:
        if z[a] > 1e-3 and z[b] > 1e-3:
            _draw_segment(out, uv[a], uv[b], colour, width)
    if axis_length is None:
        axis_length = 0.5 * float(np.linalg.norm(bounds[1] - bounds[0]))
    centre = bounds.mean(axis=0)
    axes = np.vstack([centre, centre + np.eye(3) * axis_length])
    uv, z = project(axes, pose, K)
    for k in range(3):
        if z[0] > 1e-3 and z[k + 1] > 1e-3:
            _draw_segment(out, uv[0], uv[k + 1], _AXIS_COLOURS[k], width + 1)
    return draw_label(out, label, width) if label else out


def draw_label(image, label: str, width=None) -> np.ndarray:
    """Write ``label`` at the top left of ``image`` (in place when it is a writable uint8 array).

    Args:
        image: (H,W,3) uint8 RGB.
        label: the text.
        width: stroke width in pixels; None grows with the image.

    Returns:
        (H,W,3) uint8 RGB (``image`` itself when it could be drawn into).
    """
    out = np.ascontiguousarray(image, dtype=np.uint8)
    width = width or _line_width(out)
    scale = width * 0.5
    cv2.putText(out, label, (10 * width, 30 * width), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), width + 1, cv2.LINE_AA)
    cv2.putText(out, label, (10 * width, 30 * width), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), max(1, width - 1), cv2.LINE_AA)
    return out


def overlay(image, poses, K, bounds, gt_poses=None, label=None, colour=None) -> np.ndarray:
    """Estimated poses in green (and ground truth in yellow when given) over ``image``.

    Args:
        image: (H,W,3) uint8 RGB.
        poses: one (4,4) pose (metres) or a list of them.
        K: (3,3) intrinsics in pixels.
        bounds: one (2,3) box (model frame, metres) or a list matching poses.
        gt_poses: optional (4,4) or list (entries may be None).
        label: optional text written with the first pose.
        colour: RGB colour of the estimated poses (default green).

    Returns:
        (H,W,3) uint8 RGB new array.
    """
    poses = [poses] if np.ndim(poses) == 2 else list(poses)
    bounds_list = [bounds] * len(poses) if np.ndim(bounds) == 2 else list(bounds)
    out = np.asarray(image, dtype=np.uint8)
    if gt_poses is not None:
        gt_list = [gt_poses] if np.ndim(gt_poses) == 2 else list(gt_poses)
        for gt, b in zip(gt_list, bounds_list):
            if gt is not None:
                out = draw_pose(out, gt, K, b, colour=(255, 220, 0))
    for i, (pose, b) in enumerate(zip(poses, bounds_list)):
        out = draw_pose(out, pose, K, b, colour=colour or (0, 255, 0), label=label if i == 0 else None)
    return out


def overlay_objects(image, K, objects, label: str = "") -> np.ndarray:
    """Several objects' poses over ``image``: each box green, or LOST_COLOUR where its track is
    lost, with its ground truth in yellow when given, and ``label`` at the top left.

    Args:
        image: (H,W,3) uint8 RGB.
        K: (3,3) intrinsics in pixels.
        objects: iterable of (pose (4,4), bounds (2,3), ground-truth pose (4,4) or None, lost bool).
        label: text to write (nothing when empty).

    Returns:
        (H,W,3) uint8 RGB new array.
    """
    out = np.asarray(image, dtype=np.uint8)
    for pose, bounds, gt, lost in objects:
        out = overlay(out, pose, K, bounds, gt_poses=gt, colour=LOST_COLOUR if lost else None)
    return draw_label(out, label) if label else out.copy()


def _to_uint8_hwc(crop) -> np.ndarray:
    """One crop (C,h,w) (C = 1 or 3, values 0..1 or 0..255, or metres for 1 channel) -> (h,w,3) uint8."""
    crop = crop.detach().cpu().numpy() if hasattr(crop, "detach") else np.asarray(crop)
    crop = crop.astype(np.float32)
    if crop.ndim == 2:
        crop = crop[None]
    if crop.shape[0] not in (1, 3) and crop.shape[-1] in (1, 3):
        crop = np.moveaxis(crop, -1, 0)
    if crop.shape[0] == 1:  # depth or mask: stretch its own range
        c = crop[0]
        valid = c > 0
        if valid.any():
            lo, hi = c[valid].min(), c[valid].max()
            c = np.where(valid, (c - lo) / max(hi - lo, 1e-6) * 0.8 + 0.2, 0)
        crop = np.repeat(c[None], 3, axis=0)
    elif crop.max(initial=0) > 1.5:
        crop = crop / 255.0
    return np.ascontiguousarray((np.clip(np.moveaxis(crop[:3], 0, -1), 0, 1) * 255).astype(np.uint8))


def crop_grid(crops, labels=None, columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile crops (B,C,h,w) (or a list of such batches shown side by side per item, e.g. observed
    and rendered) into one uint8 RGB picture.

    Crops of 3 channels are colour (0..1, or 0..255 when above 1.5); 1-channel crops (depth,
    masks) are stretched over their own valid range.

    Args:
        crops: (B,C,h,w) tensor or array (C = 1 or 3), or a list of such batches.
        labels: optional list of B short strings (e.g. scores) written in each tile.
        columns: tiles per row (default 8; at most B).
        pad: pixels between tiles (default 2).

    Returns:
        (rows*(h+pad)+pad, columns*(k*w+pad)+pad, 3) uint8 RGB, k = number of batches.

    Raises:
        ValueError: ``crops`` is empty.
    """
    batches = crops if isinstance(crops, (list, tuple)) else [crops]
    n = len(batches[0])
    if n == 0:
        raise ValueError("crops is empty: nothing to draw")
    tiles = []
    for i in range(n):
        parts = [_to_uint8_hwc(b[i]) for b in batches]
        tile = np.ascontiguousarray(np.concatenate(parts, axis=1))
        if labels is not None:
            cv2.putText(tile, str(labels[i]), (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    h, w = tiles[0].shape[:2]
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = tile
    return grid


def save_rgb(path, image) -> None:
    """Write an (H,W,3) uint8 RGB picture (cv2 wants BGR).

    Args:
        path: the image file (PNG, JPEG...).
        image: (H,W,3) uint8 RGB.

    Raises:
        OSError: cv2 cannot write the file.
    """
    ok = cv2.imwrite(str(path), cv2.cvtColor(np.asarray(image, np.uint8), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not write {path}")


__all__ = ["box_corners", "crop_grid", "draw_pose", "overlay", "project", "save_rgb"]
