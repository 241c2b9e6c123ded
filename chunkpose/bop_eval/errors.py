"""BOP19 pose-error functions: VSD, MSSD, MSPD (and the symmetry sets they use).

Definitions as in bop_toolkit (pose_error.py, misc.py, visibility.py), written anew:

- MSSD = min over symmetries S of max over model vertices x of
  ||(R_e x + t_e) - (R_g S x + t_g)|| (S applied in the model frame), model units (mm).
- MSPD = the same with the vertices projected by K: max pixel distance, min over S.
- VSD (cost "step", BOP19 visibility): render the model at both poses, compare distance
  images inside the visible masks: with V_g the visible mask at the GT pose and V_e the one
  at the estimate (which also keeps V_g's pixels the estimate covers), the error for a
  tolerance tau is (#{p in V_g & V_e : |d_g - d_e| / diameter >= tau} + #(V_g xor V_e)) /
  #(V_g | V_e), and 1 when the union is empty.
- Symmetries for MSSD/MSPD: models_info.json's discrete ones (plus the identity) combined
  with continuous ones discretised into ceil(pi / max_sym_disc_step) rotations, 0.01 in
  BOP19 (315 steps), including the identity.

Shortcuts bop_toolkit takes and we take too (they change results only in corner cases):
MSSD is infinite when the two model centres are a diameter or more apart; VSD is 1 when
the bounding spheres' projections do not overlap (BOP's approximate test).

Poses here are R (3,3) and t (3,) in the models' unit (mm); depths in mm.
"""
from __future__ import annotations

import math

import numpy as np

from chunkpose.io.bop_gt import distance_image, render_box_depth_mm, visible_mask
from chunkpose.io.bop_reader import bop_symmetry_transforms

MAX_SYM_DISC_STEP = 0.01
VSD_DELTA_MM = 15.0
VSD_DELTA_MM_BY_DATASET = {"itodd": 5.0, "itoddmv": 5.0}
# The thresholds exactly as bop_toolkit builds them (np.arange, so 0.15000000000000002 etc.).
VSD_TAUS = tuple(float(v) for v in np.arange(0.05, 0.51, 0.05))
VSD_THRESHOLDS = tuple(float(v) for v in np.arange(0.05, 0.51, 0.05))
MSSD_THRESHOLDS = tuple(float(v) for v in np.arange(0.05, 0.51, 0.05))
MSPD_THRESHOLDS = tuple(float(v) for v in np.arange(5, 51, 5))
MSPD_REFERENCE_WIDTH = 640.0
# Symmetry transforms handled at once (memory: chunk x vertices x 3 doubles).
_SYM_CHUNK = 32


def eval_symmetries(model_info: dict, max_sym_disc_step: float = MAX_SYM_DISC_STEP) -> np.ndarray:
    """(S,4,4) symmetries of a models_info.json entry in the model's unit (mm), identity
    first, discretised as BOP19's evaluation does (see the module docstring).

    chunkpose.io.bop_reader.bop_symmetry_transforms builds the same set (continuous after
    discrete, identity included); only the step differs (5 degrees there for registration,
    2 pi / ceil(pi / max_sym_disc_step) here), so it is called with BOP's step.
    """
    if not max_sym_disc_step > 0:
        raise ValueError(f"max_sym_disc_step: expected a positive fraction, got {max_sym_disc_step}")
    steps = int(math.ceil(math.pi / float(max_sym_disc_step)))
    return bop_symmetry_transforms(model_info, scale=1.0, continuous_step_deg=360.0 / steps)


def _as_rt(R, t):
    R = np.asarray(R, dtype=np.float64).reshape(3, 3)
    t = np.asarray(t, dtype=np.float64).reshape(3)
    return R, t


def _gt_sym_points(R_g, t_g, syms, pts):
    """(k, N, 3) model points at the GT pose composed with each symmetry of ``syms``."""
    R = np.einsum("ij,kjl->kil", R_g, syms[:, :3, :3])
    t = syms[:, :3, 3] @ R_g.T + t_g
    return np.einsum("kij,nj->kni", R, pts) + t[:, None, :]


def mssd(R_e, t_e, R_g, t_g, pts, syms) -> float:
    """Maximum symmetry-aware surface distance (model units).

    Args:
        R_e, t_e, R_g, t_g: estimated and ground-truth rotation (3,3), translation (3,).
        pts: (N,3) model vertices. syms: (S,4,4) symmetries (eval_symmetries).
    """
    R_e, t_e = _as_rt(R_e, t_e)
    R_g, t_g = _as_rt(R_g, t_g)
    pts = np.asarray(pts, dtype=np.float64)
    syms = np.asarray(syms, dtype=np.float64).reshape(-1, 4, 4)
    est = pts @ R_e.T + t_e
    best = np.inf
    for start in range(0, len(syms), _SYM_CHUNK):
        gt = _gt_sym_points(R_g, t_g, syms[start:start + _SYM_CHUNK], pts)
        best = min(best, float(np.linalg.norm(gt - est[None], axis=2).max(axis=1).min()))
    return best


def _project(points, K):
    uvw = points @ np.asarray(K, dtype=np.float64).T
    return uvw[..., :2] / uvw[..., 2:3]


def mspd(R_e, t_e, R_g, t_g, K, pts, syms) -> float:
    """Maximum symmetry-aware projection distance (pixels of the given K).

    Args: as mssd, plus K (3,3) the image's intrinsics.
    """
    R_e, t_e = _as_rt(R_e, t_e)
    R_g, t_g = _as_rt(R_g, t_g)
    pts = np.asarray(pts, dtype=np.float64)
    syms = np.asarray(syms, dtype=np.float64).reshape(-1, 4, 4)
    est = _project(pts @ R_e.T + t_e, K)
    best = np.inf
    for start in range(0, len(syms), _SYM_CHUNK):
        gt = _project(_gt_sym_points(R_g, t_g, syms[start:start + _SYM_CHUNK], pts), K)
        best = min(best, float(np.linalg.norm(gt - est[None], axis=2).max(axis=1).min()))
    return best


def centres_within_diameter(t_e, t_g, diameter: float) -> bool:
    """bop_toolkit's MSSD / ADD shortcut: the two model origins are less than a diameter apart."""
    return float(np.linalg.norm(np.ravel(t_e) - np.ravel(t_g))) < diameter


def sphere_projections_overlap(t_e, t_g, radius: float) -> bool:
    """bop_toolkit's approximate VSD shortcut: do the image projections of two spheres of
    ``radius`` centred at the two model origins overlap (t in the unit of radius)?"""
    p1, p2 = np.ravel(t_e).astype(np.float64), np.ravel(t_g).astype(np.float64)
    if p1[2] == 0 or p2[2] == 0:
        return False
    dist = np.linalg.norm(p1[:2] / p1[2] - p2[:2] / p2[2])
    return bool(dist < radius * (1.0 / p1[2] + 1.0 / p2[2]))


def vsd_from_depths(depth_est, depth_gt, depth_test, K, delta: float, taus, diameter: float,
                    normalized_by_diameter: bool = True) -> list[float]:
    """VSD errors (one per tau) from depth maps of one image region.

    Args:
        depth_est, depth_gt: (H, W) the model rendered at the estimated / GT pose (mm, 0 =
            background); depth_test: (H, W) the test depth (mm, 0 = missing).
        K: (3,3) intrinsics of that region (a crop's K has its principal point shifted).
        delta: visibility tolerance (mm); taus: misalignment tolerances (fractions of the
            diameter when normalized_by_diameter, else mm); diameter: the object's (mm).
    Returns:
        [error per tau] in [0, 1].
    """
    dist_test = distance_image(depth_test, K)
    dist_gt = distance_image(depth_gt, K)
    dist_est = distance_image(depth_est, K)
    visib_gt = visible_mask(dist_test, dist_gt, delta)
    visib_est = visible_mask(dist_test, dist_est, delta) | (visib_gt & (dist_est > 0))
    inter = visib_gt & visib_est
    union_count = int((visib_gt | visib_est).sum())
    if union_count == 0:
        return [1.0] * len(taus)
    complement = union_count - int(inter.sum())
    dists = np.abs(dist_gt[inter] - dist_est[inter])
    if normalized_by_diameter:
        dists = dists / float(diameter)
    return [float((np.count_nonzero(dists >= tau) + complement) / union_count) for tau in taus]


def image_box(vertices_m, pose_m, K, width: int, height: int):
    """(x0, y0, w, h) of the part of the image the model can cover at ``pose_m`` (4,4
    metres): its projected vertex box grown by a pixel, clipped to the image (the whole
    image when a vertex is behind the camera). w or h is 0 when it misses the image."""
    pose_m = np.asarray(pose_m, dtype=np.float64)
    cam = np.asarray(vertices_m, dtype=np.float64) @ pose_m[:3, :3].T + pose_m[:3, 3]
    if not len(cam) or not (cam[:, 2] > 1e-6).all():
        return 0, 0, int(width), int(height)
    uv = _project(cam, K)
    x0 = max(0, int(np.floor(uv[:, 0].min())) - 1)
    y0 = max(0, int(np.floor(uv[:, 1].min())) - 1)
    x1 = min(int(width), int(np.ceil(uv[:, 0].max())) + 2)
    y1 = min(int(height), int(np.ceil(uv[:, 1].max())) + 2)
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def render_in_image(renderer, vertices_m, pose_m, K, width: int, height: int):
    """The model's depth (mm) where it falls in the image, and the box (x0, y0, w, h).

    Renders only the box of image_box (the rest of the image is background), which keeps
    VSD cheap at 3072x2048. Returns (depth (h, w) mm or None when the box is empty, box).
    """
    box = image_box(vertices_m, pose_m, K, width, height)
    if box[2] == 0 or box[3] == 0:
        return None, box
    return render_box_depth_mm(renderer, pose_m, K, box), box


def vsd_from_renders(render_est, render_gt, depth_test, K, delta: float, taus, diameter: float) -> list[float]:
    """VSD from two render_in_image results over the full test depth (H, W) mm.

    The renders are pasted into the union of their boxes and VSD is computed there (outside
    it both renders are background, which adds nothing to VSD)."""
    boxes = [box for depth, box in (render_est, render_gt) if depth is not None]
    if not boxes:
        return [1.0] * len(taus)
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)

    def paste(render):
        out = np.zeros((y1 - y0, x1 - x0))
        depth, (bx, by, bw, bh) = render
        if depth is not None:
            out[by - y0:by - y0 + bh, bx - x0:bx - x0 + bw] = depth
        return out

    K_box = np.array(K, dtype=np.float64, copy=True)
    K_box[0, 2] -= x0
    K_box[1, 2] -= y0
    test = np.asarray(depth_test, dtype=np.float64)[y0:y1, x0:x1]
    return vsd_from_depths(paste(render_est), paste(render_gt), test, K_box, delta, taus, diameter)


__all__ = [
    "MAX_SYM_DISC_STEP", "MSPD_REFERENCE_WIDTH", "MSPD_THRESHOLDS", "MSSD_THRESHOLDS", "VSD_DELTA_MM",
    "VSD_DELTA_MM_BY_DATASET", "VSD_TAUS", "VSD_THRESHOLDS", "centres_within_diameter", "eval_symmetries",
    "image_box", "mspd", "mssd", "render_in_image", "sphere_projections_overlap", "vsd_from_depths",
    "vsd_from_renders",
]
