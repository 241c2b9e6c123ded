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
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from chunkpose.pipeline.base import ObservedFrame, Refiner, Scorer
from chunkpose.pipeline.posemath import so3_exp


def _map_over_crops(engine, op, poses, frame: ObservedFrame, renderer, crop_ratio: float, size: int,
                    name: str, **kwargs):
    """engine.map of a per-hypothesis crop op: op(poses, transforms, frame=, renderer=,
    size=, **kwargs) over the poses (B,4,4) and their crop transforms."""
    from chunkpose.ops.crops import crop_windows

    windows = crop_windows(poses, frame.K, frame.diameter, crop_ratio, size=size)
    return engine.map(op, poses, windows.transforms.to(poses.dtype), name=name, frame=frame,
                      renderer=renderer, size=size, **kwargs)


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
    oriented towards the camera; `fallback` where a neighbour is off the object.

    Rendered vertex normals are interpolated across faces (wrong on boxes and other flat
    faced meshes); differences of the rendered points are the true surface direction.
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
    """Full-frame pixel (u, v) of the observed mask's centroid (floats)."""
    vs, us = torch.nonzero(frame.mask, as_tuple=True)
    return (float(us.double().mean()) + frame.origin[0], float(vs.double().mean()) + frame.origin[1])


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

    poses (b,4,4) re-centred object in camera, transforms (b,3,3) full frame -> crop.
    align_to: None, or the observed mask centroid (u, v) full-frame pixels: first move
    each hypothesis so silhouettes and depths roughly agree (registration, first round).
    The model is rendered once (points p in the camera frame, normals n from the rendered
    points); each inner step moves them by the current increment and pairs each p with
    the closest observed point q among a (2k+1)^2 pixel window (k = search_radius, stride
    following the gate) around p's projection into the observed crop; pairs with
    |p - q| < threshold (one threshold per inner step) get Tukey weights, and the damped
    6x6 normal equations of sum w (n.(p - q))^2 give a rotation about the object centre
    and a translation. Returns the updated poses (b,4,4).
    """
    b = poses.shape[0]
    dtype, device = poses.dtype, poses.device
    rendered = renderer.render_crops(poses, frame.K, transforms, size)
    P = _flat(rendered["xyz"].to(dtype))  # (b,N,3)
    Nrm = _flat(surface_normals(rendered["xyz"].to(dtype), rendered["mask"], rendered["normals"].to(dtype)))
    M = rendered["mask"].flatten(1)  # (b,N)
    del rendered
    # Keep only the rendered object pixels (typically a quarter of the crop), padded to
    # the chunk's largest count; padding has M False and weight 0 everywhere below.
    keep = int(M.sum(1).max()) if M.numel() else 0
    pixel = torch.argsort(M.to(torch.uint8), dim=1, descending=True, stable=True)[:, : max(keep, 1)]
    P = torch.gather(P, 1, pixel[..., None].expand(-1, -1, 3))
    Nrm = torch.gather(Nrm, 1, pixel[..., None].expand(-1, -1, 3))
    M = torch.gather(M, 1, pixel)
    Q = _flat(frame.xyz_crops(transforms, size, semantics="refiner").to(dtype))
    Qvalid = (Q[..., 2] >= 0.001) & frame.mask_crops(transforms, size).flatten(1)
    # Invalid observed points moved far away: no distance gate ever accepts them, so the
    # search needs no separate validity lookup. Flat (b*s*s,3) for fast index_select.
    Q = torch.where(Qvalid[..., None], Q, torch.full_like(Q, 1e6))
    Q_flat = Q.reshape(-1, 3)
    base = (torch.arange(b, device=device) * (size * size))[:, None]

    # Crop camera: camera point -> crop pixel (homogeneous), for projective association.
    KT = transforms.to(dtype) @ frame.K.to(dtype)  # (b,3,3)
    scale = frame.diameter / 2.0  # rotation columns in metres -> O(1) like translation
    R_acc = torch.eye(3, dtype=dtype, device=device).expand(b, 3, 3).clone()
    t_acc = torch.zeros(b, 3, dtype=dtype, device=device)
    centre0 = poses[:, :3, 3]

    if align_to is not None:
        # Registration starts every hypothesis at the mask's bbox centre and median depth,
        # i.e. on the visible surface and wherever this rotation's silhouette happens to
        # put its centre. Move each hypothesis so that (1) its rendered silhouette's
        # centroid lands on the observed mask's centroid (lateral; projective ICP corrects
        # lateral offsets only slowly) and (2) rendered and observed depths agree (median
        # over pixels where both exist), before the distance gates apply.
        target_u, target_v = align_to
        # only the part of the silhouette inside the image: the mask of an object cut off
        # by the border is cut off too
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
        t_acc = t_acc + centre * (dz / centre[:, 2].clamp_min(1e-6))[:, None]

    k = int(search_radius)
    # centre first so that ties keep the projective pair
    window = [(0, 0)] + [(dx, dy) for dy in range(-k, k + 1) for dx in range(-k, k + 1) if (dx, dy) != (0, 0)]
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
        if search_radius > 0:
            # Closest observed point among a (2k+1)^2 window around the projection, the
            # window's stride following the gate: projective association alone has no
            # grip on sliding along flat faces, the nearest point near an edge does.
            gate_px = threshold * KT[:, 0, 0] / centre0[:, 2].clamp_min(1e-6)
            stride = torch.clamp(torch.round(gate_px / (2 * search_radius)), min=1.0)  # (b,)
            # one window offset at a time, keeping the running best: memory O(pixels)
            best_d2 = torch.full_like(ix, float("inf"))
            index = (iy.clamp(0, size - 1) * size + ix.clamp(0, size - 1)).long()
            for dx, dy in window:
                cx = ix + dx * stride[:, None]
                cy = iy + dy * stride[:, None]
                ok = (cx >= 0) & (cx < size) & (cy >= 0) & (cy < size)
                cand = (cy.clamp(0, size - 1) * size + cx.clamp(0, size - 1)).long()
                qc = Q_flat.index_select(0, (cand + base).reshape(-1)).view(b, -1, 3)
                e = p - qc
                d2 = e[..., 0] * e[..., 0] + e[..., 1] * e[..., 1] + e[..., 2] * e[..., 2]
                better = ok & (d2 < best_d2)
                best_d2 = torch.where(better, d2, best_d2)
                index = torch.where(better, cand, index)
        else:
            index = (iy.clamp(0, size - 1) * size + ix.clamp(0, size - 1)).long()
        q = Q_flat.index_select(0, (index + base).reshape(-1)).view(b, -1, 3)
        diff = p - q
        dist = (diff * diff).sum(-1).sqrt()
        pair = inside & (dist < threshold)  # invalid observed points are 1e6 away
        weight = torch.where(pair, (1 - (dist / threshold) ** 2) ** 2, torch.zeros_like(dist))
        residual = (n * diff).sum(-1)  # (b,N) point-to-plane distance
        centre = (R_acc @ centre0[:, :, None])[:, :, 0] + t_acc  # object centre now
        lever = (p - centre[:, None]) / scale
        J = torch.cat([_cross(lever, n, dim=-1), n], dim=-1)  # (b,N,6)
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

    Association: closest observed point within a small pixel window around each model
    point's projection (pure projective association cannot correct sliding along flat
    faces). Distance gates shrink geometrically over all steps, from `start_threshold` to
    `end_threshold` (fractions of the diameter). Registration (mask given) starts wide and
    aligns each hypothesis' depth first; tracking (no mask) starts narrower because the
    last pose is close and the gate is what keeps the background out.
    """

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

    def item_bytes(self) -> int:
        # measured ~115 B per crop pixel per hypothesis (render outputs, observed crops,
        # compacted ICP arrays); twice that for objects filling more of the crop
        return 250 * self.crop_size * self.crop_size

    def thresholds(self, iterations: int, start: float) -> list:
        """Distance gates (fractions of the diameter) shrinking geometrically from `start`
        to end_threshold, one per inner step of every iteration."""
        steps = max(1, iterations * self.inner_steps)
        ratio = self.end_threshold / start
        return [start * ratio ** (j / max(1, steps - 1)) for j in range(steps)]

    def refine(self, poses, frame: ObservedFrame, renderer, engine, iterations: int):
        registration = frame.mask is not None
        target = mask_centroid(frame) if registration else None
        start = self.start_threshold if registration else self.track_start_threshold
        return self._run(poses, frame, renderer, engine, iterations, start, target)

    def polish(self, poses, frame: ObservedFrame, renderer, engine):
        """polish_iterations more rounds from a narrow gate, no initial alignment: the
        best-scored hypotheses are close already and only need to converge further."""
        return self._run(poses, frame, renderer, engine, self.polish_iterations, self.polish_start_threshold, None)

    def _run(self, poses, frame, renderer, engine, iterations, start, target):
        gates = [g * frame.diameter for g in self.thresholds(iterations, start)]
        for k in range(iterations):
            poses = _map_over_crops(
                engine,
                icp_step,
                poses,
                frame,
                renderer,
                self.crop_ratio,
                self.crop_size,
                name="refine.geometric",
                thresholds=tuple(gates[k * self.inner_steps : (k + 1) * self.inner_steps]),
                align_to=target if k == 0 else None,
                damping=self.damping,
                min_pairs=self.min_pairs,
                max_rotation=self.max_rotation,
                max_translation=self.max_translation * frame.diameter,
                search_radius=self.search_radius,
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

    Inside the crop: R = rendered mask (where the crop sees the image), O = observed
    mask, V = valid observed depth,
    e = rendered depth - observed depth.
      fit       |R & O & V & |e| < tol| / |R | O|   (depth-consistent overlap)
      iou       |R & O| / |R | O|                   (silhouette)
      closeness mean of exp(-(e/tol)^2) over R & O & V, divided by |R| (precision)
      violation |R & V & e < -3 tol| / |R|          (model in front of what the camera sees)
    score = w0 fit + w1 iou + w2 closeness - w3 violation. Poses that look the same
    (symmetries) render the same and get the same score.
    """
    rendered = renderer.render_crops(poses, frame.K, transforms, size)
    # Outside the image nothing is observed: the rendered object there is neither right nor wrong.
    R = rendered["mask"].flatten(1) & frame.inside_crops(transforms, size).flatten(1)
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

    def __init__(self, crop_ratio: float = 1.1, crop_size: int = 96, tolerance: float = 0.02,
                 weights=(0.4, 0.3, 0.3, 1.0)):
        self.crop_ratio = crop_ratio
        self.crop_size = crop_size
        self.tolerance = tolerance
        self.weights = tuple(weights)

    def item_bytes(self) -> int:
        return 250 * self.crop_size * self.crop_size

    def score(self, poses, frame: ObservedFrame, renderer, engine):
        return _map_over_crops(engine, score_step, poses, frame, renderer, self.crop_ratio, self.crop_size,
                               name="score.geometric", tolerance=self.tolerance * frame.diameter,
                               weights=self.weights)
