"""Initial pose hypotheses: translation guess from the mask, rotations from an icosphere."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from chunkpose.ops.geometry import MIN_DEPTH, look_at_rotations, make_pose, rotation_about_z


def icosphere_vertices(subdivisions: int = 1) -> np.ndarray:
    """Unit-sphere vertices (N,3) of an icosphere: 12 at subdivision 0, 42 at 1, 162 at 2.

    Args:
        subdivisions: number of subdivisions of the icosahedron (default 1).

    Returns:
        (N,3) float64 numpy array of unit vectors.
    """
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


def _view_grid(subdivisions: int, n_inplane: int) -> torch.Tensor:
    """Icosphere views x n_inplane in-plane rotations (V*n_inplane,3,3) float64, views outer."""
    views = torch.as_tensor(icosphere_vertices(subdivisions), dtype=torch.float64)
    angles = torch.arange(n_inplane, dtype=torch.float64) * (2 * math.pi / n_inplane)
    # in-plane rotation is about the camera axis, so it multiplies on the left
    return (rotation_about_z(angles)[None, :] @ look_at_rotations(views)[:, None]).reshape(-1, 3, 3)


def _angles_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic angles (len(a), len(b)) in radians between two sets of rotations."""
    trace = torch.einsum("aij,bij->ab", a, b)
    return torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0))


def _farthest_subset(R: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rotations of R picked greedily, each farthest from those already picked."""
    D = _angles_between(R, R)
    picked = [0]
    nearest = D[0].clone()
    for _ in range(count - 1):
        k = int(torch.argmax(nearest))
        picked.append(k)
        nearest = torch.minimum(nearest, D[k])
    return R[picked]


@functools.lru_cache(maxsize=16)
def _spread_rotations(count: int) -> torch.Tensor:
    """`count` rotations spread over SO(3), float64: from the view x in-plane grids of
    icosphere subdivisions 0..2 (at least 6 in-plane angles, enough cells for `count`),
    a farthest-point subset of each; the one whose farthest rotation (measured against
    a dense grid) is closest wins, so any count gets as even a cover as the grids allow."""
    probe = _view_grid(2, 12)
    best, best_gap = None, math.inf
    for subdivisions in (0, 1, 2):
        n_views = len(icosphere_vertices(subdivisions))
        grid = _view_grid(subdivisions, max(6, math.ceil(count / n_views)))
        if len(grid) > 4 * max(count, 252):
            continue  # far too fine for this count
        subset = _farthest_subset(grid, count) if count < len(grid) else grid
        gap = float(_angles_between(probe, subset).amin(1).amax())
        if gap < best_gap - 1e-9:
            best, best_gap = subset, gap
    return best


def rotation_hypotheses(count: int = 252, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Object-in-camera rotations (count,3,3): icosphere views x in-plane rotations.

    252 = 42 views (subdivision 1) x 6 in-plane angles (0, 60, ..., 300 deg), the
    FoundationPose set. Other counts take an even farthest-point subset of such a
    views x in-plane grid (see _spread_rotations), so that a handful of hypotheses (tests,
    fast runs) still leaves no orientation far from every hypothesis.

    Args:
        count: number of rotations, >= 1 (default 252).
        device: device of the result (default "cpu").
        dtype: dtype of the result (default float32).

    Returns:
        (count,3,3) rotation matrices.

    Raises:
        ValueError: ``count`` < 1.
    """
    if count < 1:
        raise ValueError(f"hypotheses must be >= 1, got {count}")
    R = _view_grid(1, 6) if count == 252 else _spread_rotations(int(count))
    return R.to(device=device, dtype=dtype)


#: Hypotheses closer than this to a kept one, modulo the object's symmetries, are dropped
#: (upstream clusters its rotation grid at 30 degrees).
CLUSTER_ANGLE_DEG = 30.0


def symmetry_rotations(symmetry_tfs) -> torch.Tensor:
    """(S,3,3) float64 rotation parts of symmetry transforms (S,4,4) or (S,3,3) in the object
    frame, with the identity first (added when missing). None or empty: the identity alone.

    Args:
        symmetry_tfs: (S,4,4) or (S,3,3) array-like, or None.

    Returns:
        (S',3,3) float64 CPU tensor, identity first.

    Raises:
        ValueError: a wrong shape, or rotation parts that are not proper rotations.
    """
    eye = torch.eye(3, dtype=torch.float64)[None]
    if symmetry_tfs is None or len(symmetry_tfs) == 0:
        return eye
    S = torch.as_tensor(np.asarray(symmetry_tfs, dtype=np.float64))
    if S.ndim != 3 or S.shape[1:] not in ((4, 4), (3, 3)):
        raise ValueError(f"symmetry_tfs: expected (S,4,4) object-frame transforms, got shape {tuple(S.shape)}")
    R = S[:, :3, :3]
    det = torch.linalg.det(R)
    orthogonal = torch.allclose(R @ R.transpose(1, 2), eye.expand_as(R), atol=1e-4)
    if not orthogonal or bool((det < 0.999).any()):
        raise ValueError("symmetry_tfs: the rotation parts must be proper rotations (orthonormal, det +1)")
    is_eye = (R - eye).abs().amax(dim=(1, 2)) < 1e-9
    return torch.cat([eye, R[~is_eye]])


def cluster_rotations(R: torch.Tensor, symmetry_tfs=None, min_angle_deg: float = CLUSTER_ANGLE_DEG) -> torch.Tensor:
    """Upstream's clustering of object-in-camera rotations (N,3,3) under object symmetries.

    Greedily, in order: a rotation is kept unless R_i S is within ``min_angle_deg`` of a kept
    rotation for some symmetry S (rotation parts of ``symmetry_tfs``, identity included).
    Without symmetries, rotations at least ``min_angle_deg`` apart (the 252 grid) all stay.

    Args:
        R: (N,3,3) rotations (tensor).
        symmetry_tfs: (S,4,4) or (S,3,3) object-frame symmetries, or None.
        min_angle_deg: the clustering angle in degrees (default CLUSTER_ANGLE_DEG = 30).

    Returns:
        (M,3,3) kept rotations, M <= N, in R's dtype and device.

    Raises:
        ValueError: bad ``symmetry_tfs`` (see symmetry_rotations).
    """
    syms = symmetry_rotations(symmetry_tfs)
    Rd = R.detach().to("cpu", torch.float64)
    images = Rd[:, None] @ syms[None]  # (N,S,3,3): R_i S_s
    cos_limit = math.cos(math.radians(float(min_angle_deg)))
    kept: list[int] = []
    for i in range(len(Rd)):
        if kept:
            # cos of the angle between R_i S_s and each kept R_k: (trace(R_k^T R_i S_s) - 1) / 2
            trace = torch.einsum("kab,sab->ks", Rd[kept], images[i])
            if bool(((trace - 1) / 2 > cos_limit + 1e-12).any()):
                continue
        kept.append(i)
    return R[kept]


def translation_guess(mask: np.ndarray, depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Object centre guess (3,) in metres: mask bbox centre back-projected at the median depth.

    The median is over mask pixels with depth >= 1 mm; it lies on the visible surface, the
    refiner fixes the rest.

    Args:
        mask: (H,W) bool object mask.
        depth: (H,W) float depth in metres (0 invalid).
        K: (3,3) intrinsics in pixels.

    Returns:
        (3,) float64 camera-frame point in metres.

    Raises:
        ValueError: the mask is empty, or no mask pixel has valid depth.
    """
    vs, us = np.nonzero(mask)
    if len(us) == 0:
        raise ValueError("mask: no object pixels; pass a non-empty mask of the object")
    u = (us.min() + us.max()) / 2.0
    v = (vs.min() + vs.max()) / 2.0
    d = depth[vs, us]
    d = d[np.isfinite(d) & (d >= MIN_DEPTH)]
    if len(d) == 0:
        raise ValueError("depth: no valid depth (>= 1 mm) inside the mask; check depth/mask alignment")
    z = float(np.median(d))
    ray = np.linalg.solve(np.asarray(K, dtype=np.float64), np.array([u, v, 1.0]))
    return ray * z


def initial_poses(t: np.ndarray, count: int = 252, device="cpu", rotations: torch.Tensor | None = None) -> torch.Tensor:
    """Hypotheses (N,4,4) float32: every rotation at the shared translation guess t (3,).

    Args:
        t: (3,) translation in metres.
        count: number of rotation_hypotheses when ``rotations`` is None (default 252).
        device: device of the result (default "cpu").
        rotations: (N,3,3) rotation set (e.g. clustered under symmetries); None = the
            ``count`` rotation_hypotheses.

    Returns:
        (N,4,4) float32 object-in-camera poses on ``device``.
    """
    if rotations is None:
        R = rotation_hypotheses(count, device=device, dtype=torch.float32)
    else:
        R = rotations.to(device=device, dtype=torch.float32)
    tt = torch.as_tensor(np.asarray(t, dtype=np.float32), device=device).expand(len(R), 3)
    return make_pose(R, tt)
