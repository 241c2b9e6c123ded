"""Weight-free refiner and scorer: point-to-plane ICP and depth/silhouette agreement.

Refiner: batched point-to-plane ICP between the model rendered at each hypothesis and the
observed point map, re-rendering every iteration; pairs come from the closest observed
point in a small pixel window around each model point's projection, with a distance gate
shrinking from a quarter of the diameter. Scorer: depth-consistent overlap, silhouette
IoU, depth closeness and a penalty for model surface in front of what the camera sees.

Both work per hypothesis on square "box_3d" crops (the learned pair's windows; 96x96 by
default: ICP and the agreement scores are averages over thousands of pixels, and fewer
pixels make them several times faster on a CPU). Everything that grows with the number of
hypotheses is one fused `engine.map` per iteration: render the chunk, sample the observed
crops, solve, return only the small result ((b,4,4) poses or (b,) scores). No
(B x H x W) tensor and no chunk size here.

Over 400 lines mostly because of the Args/Returns documentation of its public API; the code
is one concern and splitting it would scatter it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from chunkpose.ops.crops import crop_windows
from chunkpose.ops.geometry import MIN_DEPTH, so3_exp
from chunkpose.engine import MapGroup
from chunkpose.pipeline.base import ObjectJob, ObservedFrame, Refiner, Scorer


def _map_over_crops(engine, op, jobs: Sequence[ObjectJob], crop_ratio: float, size: int, name: str,
                    own: Sequence[dict], **kwargs) -> list:
    """One engine stage of a per-hypothesis crop op over several objects' jobs:
    op(poses, transforms, frame=, renderer=, size=, **kwargs, **own[j]) over each job's poses
    (B_j,4,4) and their crop transforms; a list of each job's output."""
    groups = []
    for job, extra in zip(jobs, own):
        windows = crop_windows(job.poses, job.frame.K, job.frame.diameter, crop_ratio, size=size)
        groups.append(MapGroup((job.poses, windows.transforms.to(job.poses.dtype)),
                               dict(frame=job.frame, renderer=job.renderer, **extra)))
    return engine.map_groups(op, groups, name=name, size=size, **kwargs)


def _cross(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """a x b along `dim` (size 3), written out: faster than torch.cross on CPU."""
    a0, a1, a2 = a.unbind(dim)
    b0, b1, b2 = b.unbind(dim)
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], dim=dim)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(b,3,s,s) -> (b,s*s,3)."""
    return x.flatten(2).transpose(1, 2)


def surface_normals(xyz: torch.Tensor, mask: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Unit normals (b,3,s,s) from a rendered point map xyz (b,3,s,s) by central differences,
    oriented towards the camera; ``fallback`` where a neighbour is off the object.

    Rendered vertex normals are interpolated across faces (wrong on boxes and other flat
    faced meshes); differences of the rendered points are the true surface direction.

    Args:
        xyz: (b,3,s,s) rendered camera-frame points in metres.
        mask: (b,s,s) bool rendered silhouette.
        fallback: (b,3,s,s) normals used where the differences are undefined (e.g. the rendered
            vertex normals).

    Returns:
        (b,3,s,s) unit normals in xyz's dtype, facing the camera.
    """
    pad_xyz = torch.nn.functional.pad(xyz, (1, 1, 1, 1))
    pad_m = torch.nn.functional.pad(mask, (1, 1, 1, 1))
    dx = pad_xyz[:, :, 1:-1, 2:] - pad_xyz[:, :, 1:-1, :-2]
    dy = pad_xyz[:, :, 2:, 1:-1] - pad_xyz[:, :, :-2, 1:-1]
    ok = mask & pad_m[:, 1:-1, 2:] & pad_m[:, 1:-1, :-2] & pad_m[:, 2:, 1:-1] & pad_m[:, :-2, 1:-1]
    n = _cross(dx, dy, dim=1)
    length = (n * n).sum(1, keepdim=True).sqrt()
    ok = ok & (length[:, 0] > 1e-12)
    n = n / length.clamp_min(1e-12)
    # face the camera: a visible surface's normal points against the viewing ray
    flip = (n * xyz).sum(1, keepdim=True) > 0
    n = torch.where(flip, -n, n)
    return torch.where(ok[:, None], n, fallback)


def mask_centroid(frame: ObservedFrame):
    """Full-frame pixel (u, v) of the observed mask's centroid (floats), from its row and column
    counts (exact integer sums; no per-pixel index tensors beside the frame).

    Args:
        frame: an ObservedFrame with a non-empty mask.

    Returns:
        (u, v) Python floats in full-frame pixels.
    """
    mask = frame.mask
    count = int(mask.sum())
    cols = torch.arange(mask.shape[1], device=mask.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    u = int((mask.sum(0, dtype=torch.int64) * cols).sum()) / count
    v = int((mask.sum(1, dtype=torch.int64) * rows).sum()) / count
    return u + frame.origin[0], v + frame.origin[1]


#: Window offsets searched at once in the association (the rest of the window in later
#: groups): fewer, larger ops, at a bounded memory of this many candidates per point.
SEARCH_GROUP = 5


def _rendered_points(poses, transforms, frame: ObservedFrame, renderer, size: int):
    """Render the model into the crops and keep only its pixels: points P, normals Nrm
    (b,N,3), their mask M (b,N) (padding False) and flat crop pixel indices (b,N), with N
    the chunk's largest silhouette (typically a quarter of the crop)."""
    dtype = poses.dtype
    rendered = renderer.render_crops(poses, frame.K, transforms, size)
    xyz = rendered["xyz"].to(dtype)
    P = _flat(xyz)  # (b,s*s,3)
    Nrm = _flat(surface_normals(xyz, rendered["mask"], rendered["normals"].to(dtype)))
    M = rendered["mask"].flatten(1)  # (b,s*s)
    del rendered, xyz
    keep = int(M.sum(1).max()) if M.numel() else 0
    pixel = torch.argsort(M.to(torch.uint8), dim=1, descending=True, stable=True)[:, : max(keep, 1)]
    P = torch.gather(P, 1, pixel[..., None].expand(-1, -1, 3))
    Nrm = torch.gather(Nrm, 1, pixel[..., None].expand(-1, -1, 3))
    M = torch.gather(M, 1, pixel)
    return P, Nrm, M, pixel


def _observed_points(transforms, frame: ObservedFrame, size: int, dtype):
    """Observed crop points Q (b,s*s,3), invalid ones moved 1e6 away (no distance gate
    accepts them, so the search needs no validity lookup), and their validity (b,s*s)."""
    Q = _flat(frame.xyz_crops(transforms, size, semantics="refiner").to(dtype))
    valid = (Q[..., 2] >= MIN_DEPTH) & frame.mask_crops(transforms, size).flatten(1)
    return torch.where(valid[..., None], Q, torch.full_like(Q, 1e6)), valid


def _project(points, KT, size: int):
    """Crop pixels (ix, iy) (rounded, float) of camera points (b,N,3) under the crop cameras
    KT (b,3,3), and whether they are in front and inside the crop."""
    uvw = points @ KT.transpose(1, 2)
    z = uvw[..., 2]
    front = z > 1e-6
    zs = torch.where(front, z, torch.ones_like(z))
    ix = torch.round(uvw[..., 0] / zs)
    iy = torch.round(uvw[..., 1] / zs)
    inside = front & (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    return ix, iy, inside


def _align_to_mask(P, M, pixel, poses, transforms, KT, Q, Qvalid, frame: ObservedFrame, size: int, target,
                   min_pairs: int):
    """Registration's first move of every hypothesis (t_acc (b,3)): its rendered silhouette's
    centroid onto the observed mask's (lateral; projective ICP corrects lateral offsets only
    slowly), then rendered and observed depths into agreement (median where both exist),
    before the distance gates apply. Only the part of the silhouette inside the image
    counts: the mask of an object cut off by the border is cut off too."""
    dtype = poses.dtype
    centre0 = poses[:, :3, 3]
    target_u, target_v = target
    seen = torch.gather(frame.inside_crops(transforms, size).flatten(1), 1, pixel)
    weight = (M & seen).to(dtype)
    count = weight.sum(1).clamp_min(1.0)
    cu = (weight * (pixel % size).to(dtype)).sum(1) / count  # crop pixels
    cv = (weight * torch.div(pixel, size, rounding_mode="floor").to(dtype)).sum(1) / count
    inv = torch.linalg.inv(transforms.to(dtype))
    full = inv @ torch.stack([cu, cv, torch.ones_like(cu)], -1)[:, :, None]
    u_r, v_r = full[:, 0, 0] / full[:, 2, 0], full[:, 1, 0] / full[:, 2, 0]
    z = centre0[:, 2].clamp_min(1e-6)
    K = frame.K.to(dtype)
    lateral = torch.stack([(target_u - u_r) * z / K[0, 0], (target_v - v_r) * z / K[1, 1], torch.zeros_like(z)], -1)
    has = weight.sum(1) >= min_pairs
    t_acc = torch.where(has[:, None], lateral, torch.zeros_like(lateral))
    # depth: compare at the pixel each shifted point now projects to
    p = P + t_acc[:, None]
    uvw = p @ KT.transpose(1, 2)
    zs = uvw[..., 2].clamp_min(1e-6)
    ix = torch.round(uvw[..., 0] / zs)
    iy = torch.round(uvw[..., 1] / zs)
    inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size) & M
    index = (iy.clamp(0, size - 1) * size + ix.clamp(0, size - 1)).long()
    qz = torch.gather(Q[..., 2], 1, index)
    both = inside & torch.gather(Qvalid, 1, index)
    gap = torch.where(both, qz - p[..., 2], torch.full_like(qz, float("nan")))
    dz = torch.nanmedian(gap, dim=1).values
    dz = torch.where(both.sum(1) >= min_pairs, dz, torch.zeros_like(dz))
    centre = centre0 + t_acc
    return t_acc + centre * (dz / centre[:, 2].clamp_min(1e-6))[:, None]


def window_offsets(radius: int, device) -> tuple:
    """The (2k+1)^2 search window's pixel offsets, centre first (so that ties keep the projective
    pair), as groups of SEARCH_GROUP offsets each.

    Args:
        radius: k, the window's half side in pixels (0: the projective pixel alone).
        device: device of the tensors.

    Returns:
        tuple of (2,g) float32 tensors, rows (dx, dy), g <= SEARCH_GROUP.
    """
    k = int(radius)
    pairs = [(0, 0)] + [(dx, dy) for dy in range(-k, k + 1) for dx in range(-k, k + 1) if (dx, dy) != (0, 0)]
    table = torch.tensor(pairs, dtype=torch.float32, device=device).T.contiguous()
    return tuple(table[:, i: i + SEARCH_GROUP] for i in range(0, len(pairs), SEARCH_GROUP))


def _window_candidates(pixel, shift, size: int, chunk_base):
    """Flat observed indices (b,N,g) (with the chunk's offset) of the candidates pixel + shift
    ((b,N,2,1) + (b,1,2,g)), clamped into the crop, and which of them fell off it (b,N,g).
    A function of its own so that its (b,N,2,g) coordinates are freed before the distances
    are computed (the association's memory peak)."""
    cand_xy = pixel + shift
    inside = cand_xy.clamp(0, size - 1)
    off_window = (inside != cand_xy).any(dim=2)
    inside[:, :, 1].mul_(size)  # rows -> flat offsets: x + y * size
    return inside.sum(dim=2).long() + chunk_base, off_window


def _associate(p, ix, iy, Q_flat, base, KT, centre_z, size: int, threshold: float, offsets):
    """Flat observed index (b,N) paired with each moved model point p (b,N,3): the closest
    observed point among a (2k+1)^2 window around its projection (ix, iy) (``offsets``:
    window_offsets), the window's stride following the gate (projective association alone
    has no grip on sliding along flat faces, the nearest point near an edge does). Offsets
    are searched SEARCH_GROUP at a time; ties keep the earliest offset, as a sequential scan.

    Every op here runs once per group and inner step of every chunk, so the loop is written
    for few ops (x and y as one tensor, indices kept with the chunk's offset until the end):
    with small chunks the per-op cost, not the arithmetic, is what a chunk costs."""
    last = size - 1
    index = (iy.clamp(0, last) * size + ix.clamp(0, last)).long()
    if len(offsets) == 1 and offsets[0].shape[1] == 1:
        return index
    k = max(1, int(round(float(offsets[-1][0].abs().max()))))
    gate_px = threshold * KT[:, 0, 0] / centre_z.clamp_min(1e-6)
    stride = torch.clamp(torch.round(gate_px / (2 * k)), min=1.0)[:, None, None, None]  # (b,1,1,1)
    pixel = torch.stack([ix, iy], dim=-1)[..., None]  # (b,N,2,1)
    chunk_base = base[..., None]  # (b,1,1)
    best_d2 = torch.full_like(ix[..., None], float("inf"))  # (b,N,1)
    best = index.add_(base)[..., None]  # in place: index is used only as best's start
    p_ = p[:, :, None]
    for offset in offsets:
        cand, off_window = _window_candidates(pixel, offset * stride, size, chunk_base)
        d2 = (p_ - Q_flat[cand]).square_().sum(-1).masked_fill_(off_window, float("inf"))
        group_d2, pick = d2.min(dim=-1, keepdim=True)
        better = group_d2 < best_d2
        best_d2 = torch.where(better, group_d2, best_d2)
        best = torch.where(better, torch.gather(cand, -1, pick), best)
    return best.sub_(chunk_base)[..., 0]


def _gauss_newton_step(p, n, q, inside, centre, scale: float, threshold: float, damping: float, min_pairs: int,
                       max_rotation: float, max_translation: float):
    """One damped point-to-plane Gauss-Newton step: rotation w (b,3) about the object centre
    and translation v (b,3), from the pairs (p, q) within ``threshold`` (Tukey weights),
    clipped to a trust region. No step where fewer than min_pairs pairs exist."""
    dtype, device = p.dtype, p.device
    diff = p - q
    dist = (diff * diff).sum(-1).sqrt()
    pair = inside & (dist < threshold)  # invalid observed points are 1e6 away
    weight = torch.where(pair, (1 - (dist / threshold) ** 2) ** 2, torch.zeros_like(dist))
    residual = (n * diff).sum(-1)  # (b,N) point-to-plane distance
    lever = (p - centre[:, None]) / scale
    J = torch.cat([_cross(lever, n, dim=-1), n], dim=-1)  # (b,N,6)
    Jw = J * weight[..., None]
    A = torch.einsum("bni,bnj->bij", Jw, J)
    g = torch.einsum("bni,bn->bi", Jw, residual)
    # Levenberg-style damping relative to the system's own scale keeps thin or planar views
    # (rank-deficient A) from producing wild steps.
    level = A.diagonal(dim1=1, dim2=2).sum(-1) / 6 + 1e-12
    A = A + (damping * level)[:, None, None] * torch.eye(6, dtype=dtype, device=device)
    x = torch.linalg.solve(A, -g[..., None])[..., 0]
    enough = pair.sum(1) >= min_pairs
    x = torch.where(enough[:, None], x, torch.zeros_like(x))
    w = x[:, :3] / scale
    v = x[:, 3:]
    # Trust region: one step never turns by more than max_rotation or moves more than
    # max_translation (bad associations early on can ask for huge steps).
    angle = w.norm(dim=-1, keepdim=True)
    w = w * torch.clamp(max_rotation / angle.clamp_min(1e-12), max=1.0)
    shift = v.norm(dim=-1, keepdim=True)
    v = v * torch.clamp(max_translation / shift.clamp_min(1e-12), max=1.0)
    return w, v


def icp_step(
    poses: torch.Tensor,
    transforms: torch.Tensor,
    *,
    frame: ObservedFrame,
    renderer,
    size: int,
    thresholds: Sequence[float],
    align_to,
    damping: float,
    min_pairs: int,
    max_rotation: float,
    max_translation: float,
    search_radius: int = 0,
) -> torch.Tensor:
    """One render + several Gauss-Newton ICP steps for each hypothesis.

    The model is rendered once (points p in the camera frame, normals n from the rendered
    points); each inner step moves them by the current increment, pairs each with an observed
    point (_associate) and solves the damped 6x6 normal equations of sum w (n.(p - q))^2
    (_gauss_newton_step). The op GeometricRefiner maps over the hypotheses.

    Args:
        poses: (b,4,4) re-centred object-in-camera poses, metres.
        transforms: (b,3,3) full frame pixel -> crop pixel.
        frame: the prepared ObservedFrame.
        renderer: a renderer of the re-centred mesh.
        size: crop side in pixels.
        thresholds: the distance gate of each inner step (metres).
        align_to: None, or the observed mask centroid (u, v) in full-frame pixels: first move
            each hypothesis so silhouettes and depths roughly agree (registration, first round).
        damping: Levenberg damping relative to the mean diagonal of the normal equations.
        min_pairs: fewest pairs for a hypothesis to move (fewer: no step).
        max_rotation: trust region of one step, radians.
        max_translation: trust region of one step, metres.
        search_radius: half side k in pixels of the association's (2k+1)^2 window (default 0:
            projective association).

    Returns:
        (b,4,4) updated poses, poses' dtype and device.
    """
    b = poses.shape[0]
    dtype, device = poses.dtype, poses.device
    P, Nrm, M, pixel = _rendered_points(poses, transforms, frame, renderer, size)
    Q, Qvalid = _observed_points(transforms, frame, size, dtype)
    Q_flat = Q.reshape(-1, 3)  # flat (b*s*s,3) for fast index_select
    base = (torch.arange(b, device=device) * (size * size))[:, None]
    KT = transforms.to(dtype) @ frame.K.to(dtype)  # crop camera: camera point -> crop pixel
    scale = frame.diameter / 2.0  # rotation columns in metres -> O(1) like translation
    centre0 = poses[:, :3, 3]
    offsets = window_offsets(search_radius, device)
    R_acc = torch.eye(3, dtype=dtype, device=device).expand(b, 3, 3).clone()
    t_acc = torch.zeros(b, 3, dtype=dtype, device=device)
    if align_to is not None:
        t_acc = _align_to_mask(P, M, pixel, poses, transforms, KT, Q, Qvalid, frame, size, align_to, min_pairs)
    for threshold in thresholds:
        p = P @ R_acc.transpose(1, 2) + t_acc[:, None]
        n = Nrm @ R_acc.transpose(1, 2)
        ix, iy, inside = _project(p, KT, size)
        inside = inside & M
        index = _associate(p, ix, iy, Q_flat, base, KT, centre0[:, 2], size, threshold, offsets)
        q = Q_flat.index_select(0, (index + base).reshape(-1)).view(b, -1, 3)
        centre = (R_acc @ centre0[:, :, None])[:, :, 0] + t_acc  # object centre now
        w, v = _gauss_newton_step(p, n, q, inside, centre, scale, threshold, damping, min_pairs, max_rotation,
                                  max_translation)
        dR = so3_exp(w)
        # x -> dR (x - centre) + centre + v, composed onto the accumulated increment
        R_acc = dR @ R_acc
        t_acc = (dR @ (t_acc - centre)[:, :, None])[:, :, 0] + centre + v

    out = poses.clone()
    out[:, :3, :3] = R_acc @ poses[:, :3, :3]
    out[:, :3, 3] = (R_acc @ poses[:, :3, 3:4])[:, :, 0] + t_acc
    return out


class GeometricRefiner(Refiner):
    """Batched projective point-to-plane ICP against the observed depth, re-rendering the model
    each iteration.

    Association: closest observed point within a small pixel window around each model point's
    projection (pure projective association cannot correct sliding along flat faces). Distance
    gates shrink geometrically over all steps, from ``start_threshold`` to ``end_threshold``.
    Registration (mask given) starts wide and aligns each hypothesis' depth first; tracking (no
    mask) starts narrower because the last pose is close and the gate is what keeps the
    background out.

    Args:
        crop_ratio: crop window side as a multiple of the diameter (default 1.2).
        crop_size: crop side in pixels (default 96).
        inner_steps: Gauss-Newton steps per render (default 3).
        start_threshold: first distance gate at registration, fraction of the diameter.
        end_threshold: last distance gate, fraction of the diameter.
        track_start_threshold: first distance gate when tracking, fraction of the diameter.
        damping: Levenberg damping relative to the normal equations' scale.
        min_pairs: fewest point pairs for a hypothesis to move.
        max_rotation_deg: largest rotation of one step, degrees.
        max_translation: largest translation of one step, fraction of the diameter.
        search_radius: association window half side in pixels.
        polish_candidates: best-scored hypotheses refined again by polish() (0: none).
        polish_iterations: iterations of polish().
        polish_start_threshold: first distance gate of polish(), fraction of the diameter.
    """

    stage_name = "refine.geometric"

    def __init__(
        self,
        crop_ratio: float = 1.2,
        crop_size: int = 96,
        inner_steps: int = 3,
        start_threshold: float = 0.25,
        end_threshold: float = 0.03,
        track_start_threshold: float = 0.15,
        damping: float = 1e-3,
        min_pairs: int = 30,
        max_rotation_deg: float = 20.0,
        max_translation: float = 0.25,
        search_radius: int = 2,
        polish_candidates: int = 3,
        polish_iterations: int = 5,
        polish_start_threshold: float = 0.06,
    ):
        self.crop_ratio = crop_ratio
        self.crop_size = crop_size
        self.inner_steps = inner_steps
        self.start_threshold = start_threshold
        self.end_threshold = end_threshold
        self.track_start_threshold = track_start_threshold
        self.damping = damping
        self.min_pairs = min_pairs
        self.max_rotation = math.radians(max_rotation_deg)
        self.max_translation = max_translation
        self.search_radius = search_radius
        self.polish_candidates = polish_candidates
        self.polish_iterations = polish_iterations
        self.polish_start_threshold = polish_start_threshold

    def thresholds(self, iterations: int, start: float) -> list:
        """Distance gates (fractions of the diameter) shrinking geometrically from ``start`` to
        end_threshold, one per inner step of every iteration.

        Args:
            iterations: number of renders (iterations).
            start: first gate, fraction of the diameter.

        Returns:
            list of max(1, iterations * inner_steps) floats.
        """
        steps = max(1, iterations * self.inner_steps)
        ratio = self.end_threshold / start
        return [start * ratio ** (j / max(1, steps - 1)) for j in range(steps)]

    def refine_many(self, jobs, engine, iterations: int) -> list:
        """``iterations`` rounds of ICP over several objects' hypotheses (refine is the one-object
        case), every round one engine stage "refine.geometric" over all of them (chunks may hold
        several objects' hypotheses).

        With a mask (registration) the first round aligns each hypothesis to the mask centroid and
        the gates start at start_threshold; without (tracking) at track_start_threshold.

        Args:
            jobs: one chunkpose.pipeline.base.ObjectJob per object.
            engine: the Engine (required).
            iterations: number of rounds.

        Returns:
            list of (B_j,4,4) refined poses.
        """
        registration = [job.frame.mask is not None for job in jobs]
        targets = [mask_centroid(job.frame) if r else None for job, r in zip(jobs, registration)]
        starts = [self.start_threshold if r else self.track_start_threshold for r in registration]
        return self._run(jobs, engine, iterations, starts, targets)

    def polish_many(self, jobs, engine) -> list:
        """polish_iterations more rounds from a narrow gate, no initial alignment (the best-scored
        hypotheses are close already and only need to converge further), over several objects'
        poses, one engine stage per round over all of them.

        Args:
            jobs: one chunkpose.pipeline.base.ObjectJob per object.
            engine: the Engine (required).

        Returns:
            list of (B_j,4,4) refined poses.
        """
        return self._run(jobs, engine, self.polish_iterations, [self.polish_start_threshold] * len(jobs),
                         [None] * len(jobs))

    def _run(self, jobs, engine, iterations, starts, targets):
        gates = [[g * job.frame.diameter for g in self.thresholds(iterations, start)]
                 for job, start in zip(jobs, starts)]
        steps = self.inner_steps
        for k in range(iterations):
            own = [dict(thresholds=tuple(g[k * steps: (k + 1) * steps]), align_to=target if k == 0 else None,
                        max_translation=self.max_translation * job.frame.diameter)
                   for job, g, target in zip(jobs, gates, targets)]
            poses = _map_over_crops(engine, icp_step, jobs, self.crop_ratio, self.crop_size, self.stage_name, own,
                                    damping=self.damping, min_pairs=self.min_pairs, max_rotation=self.max_rotation,
                                    search_radius=self.search_radius)
            jobs = [job._replace(poses=p) for job, p in zip(jobs, poses)]
        return [job.poses for job in jobs]


def score_step(
    poses: torch.Tensor,
    transforms: torch.Tensor,
    *,
    frame: ObservedFrame,
    renderer,
    size: int,
    tolerance: float,
    weights: Sequence[float],
) -> torch.Tensor:
    """Agreement of each rendered hypothesis with the observation, (b,) higher is better.

    Inside the crop: R = rendered mask (where the crop sees the image), O = observed mask,
    V = valid observed depth, e = rendered depth - observed depth::

        fit       |R & O & V & |e| < tol| / |R | O|   (depth-consistent overlap)
        iou       |R & O| / |R | O|                   (silhouette)
        closeness mean of exp(-(e/tol)^2) over R & O & V, divided by |R| (precision)
        violation |R & V & e < -3 tol| / |R|          (model in front of what the camera sees)

    score = w0 fit + w1 iou + w2 closeness - w3 violation. Poses that look the same
    (symmetries) render the same and get the same score.

    Args:
        poses: (b,4,4) re-centred object-in-camera poses, metres.
        transforms: (b,3,3) full frame pixel -> crop pixel.
        frame: the prepared ObservedFrame.
        renderer: a renderer of the re-centred mesh.
        size: crop side in pixels.
        tolerance: tol, metres.
        weights: (w0, w1, w2, w3).

    Returns:
        (b,) float32 scores; -1 for a hypothesis that renders nothing in its crop.
    """
    rendered = renderer.render_crops(poses, frame.K, transforms, size)
    # Outside the image nothing is observed: the rendered object there is neither right nor wrong.
    R = rendered["mask"].flatten(1) & frame.inside_crops(transforms, size).flatten(1)
    Dr = rendered["depth"].flatten(1).to(torch.float32)
    del rendered
    Do = frame.xyz_crops(transforms, size, semantics="refiner")[:, 2].flatten(1).to(torch.float32)
    O = frame.mask_crops(transforms, size).flatten(1)
    V = Do >= MIN_DEPTH
    e = Dr - Do
    f = lambda m: m.sum(1).to(torch.float32)  # noqa: E731
    union = f(R | O).clamp_min(1.0)
    rendered_px = f(R).clamp_min(1.0)
    both = R & O & V
    fit = f(both & (e.abs() < tolerance)) / union
    iou = f(R & O) / union
    closeness = torch.where(both, torch.exp(-((e / tolerance) ** 2)), torch.zeros_like(e)).sum(1) / rendered_px
    violation = f(R & V & (e < -3 * tolerance)) / rendered_px
    w0, w1, w2, w3 = weights
    score = w0 * fit + w1 * iou + w2 * closeness - w3 * violation
    # A hypothesis that renders nothing in its crop is not a candidate.
    return torch.where(R.any(1), score, torch.full_like(score, -1.0))


class GeometricScorer(Scorer):
    """Weight-free scorer: depth agreement, silhouette IoU and a visibility penalty.

    Args:
        crop_ratio: crop window side as a multiple of the diameter (default 1.1).
        crop_size: crop side in pixels (default 96).
        tolerance: depth tolerance as a fraction of the diameter (default 0.02).
        weights: (fit, iou, closeness, violation) weights of score_step.
    """

    stage_name = "score.geometric"

    def __init__(self, crop_ratio: float = 1.1, crop_size: int = 96, tolerance: float = 0.02,
                 weights=(0.4, 0.3, 0.3, 1.0)):
        self.crop_ratio = crop_ratio
        self.crop_size = crop_size
        self.tolerance = tolerance
        self.weights = tuple(weights)

    def score_many(self, jobs, engine) -> list:
        """score_step of several objects' hypotheses as one engine stage "score.geometric" (chunks
        may mix objects; score is the one-object case).

        Args:
            jobs: one chunkpose.pipeline.base.ObjectJob per object.
            engine: the Engine (required).

        Returns:
            list of (B_j,) float32 scores.
        """
        own = [dict(tolerance=self.tolerance * job.frame.diameter) for job in jobs]
        return _map_over_crops(engine, score_step, jobs, self.crop_ratio, self.crop_size, self.stage_name, own,
                               weights=self.weights)
