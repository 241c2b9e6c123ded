"""Weight-free refiner and scorer: projective point-to-plane ICP and depth/silhouette agreement.

Both work per hypothesis on 160x160 crops (the same crop windows as the learned pair), so
everything that grows with the number of hypotheses is one fused `engine.map` per
iteration: render the chunk, sample the observed crops, solve, return only the small
result ((b,4,4) poses or (b,) scores). No (B x H x W) tensor and no chunk size here.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from chunkpose.pipeline.base import ObservedFrame, Refiner, Scorer
from chunkpose.pipeline.posemath import so3_exp


def _crop_windows(poses, frame: ObservedFrame, crop_ratio: float, size: int):
    from chunkpose.ops.crops import crop_windows

    return crop_windows(poses, frame.K, frame.diameter, crop_ratio, size=size)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(b,3,s,s) -> (b,s*s,3)."""
    return x.flatten(2).transpose(1, 2)


def icp_step(
    poses: torch.Tensor,
    transforms: torch.Tensor,
    *,
    frame: ObservedFrame,
    renderer,
    size: int,
    thresholds: Sequence[float],
    align_depth: bool,
    damping: float,
    min_pairs: int,
    max_rotation: float,
    max_translation: float,
) -> torch.Tensor:
    """One render + several Gauss-Newton ICP steps for each hypothesis.

    poses (b,4,4) re-centred object in camera, transforms (b,3,3) full frame -> crop.
    The model is rendered once (points p, normals n in the camera frame); each inner step
    moves them by the current increment, finds the observed point q by projecting into
    the observed crop (projective association, nearest pixel), keeps pairs with
    |p - q| < threshold (one threshold per inner step, Tukey-weighted) and solves the
    damped 6x6 normal equations of sum w (n.(p - q))^2 for a rotation about the object
    centre and a translation. Returns the updated poses (b,4,4).
    """
    b = poses.shape[0]
    dtype, device = poses.dtype, poses.device
    rendered = renderer.render_crops(poses, frame.K, transforms, size)
    P = _flat(rendered["xyz"].to(dtype))  # (b,N,3)
    Nrm = _flat(rendered["normals"].to(dtype))
    M = rendered["mask"].flatten(1)  # (b,N)
    del rendered
    Q = _flat(frame.xyz_crops(transforms, size, semantics="refiner").to(dtype))
    Qvalid = (Q[..., 2] >= 0.001) & frame.mask_crops(transforms, size).flatten(1)

    # Crop camera: camera point -> crop pixel (homogeneous), for projective association.
    KT = transforms.to(dtype) @ frame.K.to(dtype)  # (b,3,3)
    scale = frame.diameter / 2.0  # rotation columns in metres -> O(1) like translation
    R_acc = torch.eye(3, dtype=dtype, device=device).expand(b, 3, 3).clone()
    t_acc = torch.zeros(b, 3, dtype=dtype, device=device)
    centre0 = poses[:, :3, 3]

    if align_depth:
        # Registration starts every hypothesis at the mask's median depth, i.e. on the
        # visible surface; slide it along its viewing ray so rendered and observed depths
        # agree (median over pixels where both exist) before the distance gates apply.
        both = M & Qvalid
        gap = torch.where(both, Q[..., 2] - P[..., 2], torch.full_like(Q[..., 2], float("nan")))
        dz = torch.nanmedian(gap, dim=1).values
        dz = torch.where(both.sum(1) >= min_pairs, dz, torch.zeros_like(dz))
        t_acc = centre0 * (dz / centre0[:, 2].clamp_min(1e-6))[:, None]

    for threshold in thresholds:
        p = P @ R_acc.transpose(1, 2) + t_acc[:, None]
        n = Nrm @ R_acc.transpose(1, 2)
        uvw = p @ KT.transpose(1, 2)
        z = uvw[..., 2]
        front = z > 1e-6
        zs = torch.where(front, z, torch.ones_like(z))
        ix = torch.round(uvw[..., 0] / zs)
        iy = torch.round(uvw[..., 1] / zs)
        inside = front & (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size) & M
        index = (iy.clamp(0, size - 1) * size + ix.clamp(0, size - 1)).long()
        q = torch.gather(Q, 1, index[..., None].expand(-1, -1, 3))
        pair = inside & torch.gather(Qvalid, 1, index)
        diff = p - q
        dist = diff.norm(dim=-1)
        pair = pair & (dist < threshold)
        weight = torch.where(pair, (1 - (dist / threshold) ** 2) ** 2, torch.zeros_like(dist))
        residual = (n * diff).sum(-1)  # (b,N) point-to-plane distance
        centre = (R_acc @ centre0[:, :, None])[:, :, 0] + t_acc  # object centre now
        arm = torch.cross(p - centre[:, None], n, dim=-1) / scale
        J = torch.cat([arm, n], dim=-1)  # (b,N,6)
        Jw = J * weight[..., None]
        A = torch.einsum("bni,bnj->bij", Jw, J)
        g = torch.einsum("bni,bn->bi", Jw, residual)
        # Levenberg-style damping relative to the system's own scale keeps thin or
        # planar views (rank-deficient A) from producing wild steps.
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
        dR = so3_exp(w)
        # x -> dR (x - centre) + centre + v, composed onto the accumulated increment
        R_acc = dR @ R_acc
        t_acc = (dR @ (t_acc - centre)[:, :, None])[:, :, 0] + centre + v

    out = poses.clone()
    out[:, :3, :3] = R_acc @ poses[:, :3, :3]
    out[:, :3, 3] = (R_acc @ poses[:, :3, 3:4])[:, :, 0] + t_acc
    return out


class GeometricRefiner(Refiner):
    """Batched projective point-to-plane ICP against the observed depth, re-rendering the
    model each iteration.

    Distance gates shrink geometrically over all steps, from `start_threshold` to
    `end_threshold` (fractions of the diameter). Registration (mask given) starts wide and
    aligns each hypothesis' depth first; tracking (no mask) starts narrower because the
    last pose is close and the gate is what keeps the background out.
    """

    def __init__(
        self,
        crop_ratio: float = 1.2,
        crop_size: int = 160,
        inner_steps: int = 3,
        start_threshold: float = 0.25,
        end_threshold: float = 0.03,
        track_start_threshold: float = 0.15,
        damping: float = 1e-3,
        min_pairs: int = 30,
        max_rotation_deg: float = 20.0,
        max_translation: float = 0.25,
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

    def thresholds(self, iterations: int, registration: bool) -> list:
        """Distance gates (fractions of the diameter), one per inner step of every iteration."""
        start = self.start_threshold if registration else self.track_start_threshold
        steps = max(1, iterations * self.inner_steps)
        ratio = self.end_threshold / start
        return [start * ratio ** (j / max(1, steps - 1)) for j in range(steps)]

    def refine(self, poses, frame: ObservedFrame, renderer, engine, iterations: int):
        registration = frame.mask is not None
        gates = [g * frame.diameter for g in self.thresholds(iterations, registration)]
        for k in range(iterations):
            windows = _crop_windows(poses, frame, self.crop_ratio, self.crop_size)
            poses = engine.map(
                icp_step,
                poses,
                windows.transforms.to(poses.dtype),
                name="refine.geometric",
                frame=frame,
                renderer=renderer,
                size=self.crop_size,
                thresholds=tuple(gates[k * self.inner_steps : (k + 1) * self.inner_steps]),
                align_depth=registration and k == 0,
                damping=self.damping,
                min_pairs=self.min_pairs,
                max_rotation=self.max_rotation,
                max_translation=self.max_translation * frame.diameter,
            )
        return poses


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

    Inside the crop: R = rendered mask, O = observed mask, V = valid observed depth,
    e = rendered depth - observed depth.
      fit       |R & O & V & |e| < tol| / |R | O|   (depth-consistent overlap)
      iou       |R & O| / |R | O|                   (silhouette)
      closeness mean of exp(-(e/tol)^2) over R & O & V, divided by |R| (precision)
      violation |R & V & e < -3 tol| / |R|          (model in front of what the camera sees)
    score = w0 fit + w1 iou + w2 closeness - w3 violation. Poses that look the same
    (symmetries) render the same and get the same score.
    """
    rendered = renderer.render_crops(poses, frame.K, transforms, size)
    R = rendered["mask"].flatten(1)
    Dr = rendered["depth"].flatten(1).to(torch.float32)
    del rendered
    Do = frame.xyz_crops(transforms, size, semantics="refiner")[:, 2].flatten(1).to(torch.float32)
    O = frame.mask_crops(transforms, size).flatten(1)
    V = Do >= 0.001
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
    """Weight-free scorer: depth agreement, silhouette IoU and a visibility penalty."""

    def __init__(self, crop_ratio: float = 1.1, crop_size: int = 160, tolerance: float = 0.02,
                 weights=(0.4, 0.3, 0.3, 1.0)):
        self.crop_ratio = crop_ratio
        self.crop_size = crop_size
        self.tolerance = tolerance
        self.weights = tuple(weights)

    def score(self, poses, frame: ObservedFrame, renderer, engine):
        windows = _crop_windows(poses, frame, self.crop_ratio, self.crop_size)
        return engine.map(
            score_step,
            poses,
            windows.transforms.to(poses.dtype),
            name="score.geometric",
            frame=frame,
            renderer=renderer,
            size=self.crop_size,
            tolerance=self.tolerance * frame.diameter,
            weights=self.weights,
        )
