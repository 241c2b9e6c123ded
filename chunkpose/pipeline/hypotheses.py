"""Initial pose hypotheses: translation guess from the mask, rotations from an icosphere."""
from __future__ import annotations

import math

import numpy as np
import torch

from chunkpose.pipeline.posemath import look_at_rotations, make_pose, rotation_about_z


def icosphere_vertices(subdivisions: int = 1) -> np.ndarray:
    """Unit-sphere vertices (N,3) of an icosphere: 12 at subdivision 0, 42 at 1, 162 at 2."""
    phi = (1 + 5 ** 0.5) / 2
    verts = [
        (-1, phi, 0), (1, phi, 0), (-1, -phi, 0), (1, -phi, 0),
        (0, -1, phi), (0, 1, phi), (0, -1, -phi), (0, 1, -phi),
        (phi, 0, -1), (phi, 0, 1), (-phi, 0, -1), (-phi, 0, 1),
    ]
    faces = [
        (0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11),
        (1, 5, 9), (5, 11, 4), (11, 10, 2), (10, 7, 6), (7, 1, 8),
        (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9),
        (4, 9, 5), (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1),
    ]
    verts = [np.asarray(v, dtype=np.float64) / np.linalg.norm(v) for v in verts]
    for _ in range(subdivisions):
        midpoint = {}

        def mid(a, b):
            key = (min(a, b), max(a, b))
            if key not in midpoint:
                m = verts[a] + verts[b]
                verts.append(m / np.linalg.norm(m))
                midpoint[key] = len(verts) - 1
            return midpoint[key]

        new_faces = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new_faces += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new_faces
    return np.stack(verts)


def rotation_hypotheses(count: int = 252, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Object-in-camera rotations (count,3,3): icosphere views x in-plane rotations.

    252 = 42 views (subdivision 1) x 6 in-plane angles (0, 60, ..., 300 deg), the
    FoundationPose set. Other counts take the smallest icosphere with enough views and
    spread `count` rotations over views x in-plane angles (views first), so tests can run
    with a handful of hypotheses.
    """
    if count < 1:
        raise ValueError(f"hypotheses must be >= 1, got {count}")
    subdivisions = 0 if count <= 72 else 1 if count <= 252 else 2
    views = torch.as_tensor(icosphere_vertices(subdivisions), dtype=torch.float64)
    n_views = len(views)
    n_inplane = max(1, min(6, math.ceil(count / n_views)))
    angles = torch.arange(n_inplane, dtype=torch.float64) * (2 * math.pi / n_inplane)
    view_R = look_at_rotations(views)                    # (V,3,3)
    inplane_R = rotation_about_z(angles)                 # (P,3,3)
    # in-plane rotation is about the camera axis, so it multiplies on the left
    R = (inplane_R[None, :] @ view_R[:, None]).reshape(-1, 3, 3)
    if count < len(R):
        # Take an even spread over the whole set rather than the first views only.
        idx = torch.linspace(0, len(R) - 1, count).round().long()
        R = R[idx]
    return R.to(device=device, dtype=dtype)


def translation_guess(mask: np.ndarray, depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Object centre guess (3,) in metres: mask bbox centre back-projected at the median depth.

    mask (H,W) bool, depth (H,W) metres (0 invalid), K (3,3). The median is over mask
    pixels with depth >= 1 mm; it lies on the visible surface, the refiner fixes the rest.
    """
    vs, us = np.nonzero(mask)
    if len(us) == 0:
        raise ValueError("mask: no object pixels; pass a non-empty mask of the object")
    u = (us.min() + us.max()) / 2.0
    v = (vs.min() + vs.max()) / 2.0
    d = depth[vs, us]
    d = d[np.isfinite(d) & (d >= 0.001)]
    if len(d) == 0:
        raise ValueError("depth: no valid depth (>= 1 mm) inside the mask; check depth/mask alignment")
    z = float(np.median(d))
    ray = np.linalg.solve(np.asarray(K, dtype=np.float64), np.array([u, v, 1.0]))
    return ray * z


def initial_poses(t: np.ndarray, count: int = 252, device="cpu") -> torch.Tensor:
    """Hypotheses (count,4,4) float32: every rotation at the shared translation guess t (3,)."""
    R = rotation_hypotheses(count, device=device, dtype=torch.float32)
    tt = torch.as_tensor(np.asarray(t, dtype=np.float32), device=device).expand(len(R), 3)
    return make_pose(R, tt)
