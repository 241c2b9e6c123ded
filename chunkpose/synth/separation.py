"""Keeping the scene's objects apart: what the rule needs of a mesh (Shape) and the tests
of the rule (oriented boxes, separating planes, silhouette-hull overlap).

Rule for the objects of the scene: in every frame their convex hulls do not intersect (no
interpenetration), and the convex hulls of their silhouettes overlap by at most
``MAX_OBJECT_OVERLAP`` of the smaller hull's area. A silhouette lies inside its hull, so one
object hides at most that area of another: each keeps nearly all of its silhouette (about
85% or more even for the hollow mug; most never touch at all).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from chunkpose.io.mesh import Mesh

if TYPE_CHECKING:
    from .placement import Track

# Objects of the scene: their silhouettes' convex hulls overlap by at most this fraction
# of the smaller hull.
MAX_OBJECT_OVERLAP = 0.1


@dataclass(frozen=True)
class Shape:
    """What the placement rules need of a mesh.

    Attributes:
        hull: (P,3) convex-hull vertices relative to the bounding-box centre, metres (they bound
            the silhouette's extent from any view).
        half: (3,) half sizes of the bounding box, metres.
        radius: the hull's radius about the centre, metres.
    """

    hull: np.ndarray
    half: np.ndarray
    radius: float

    @classmethod
    def of(cls, mesh: Mesh) -> "Shape":
        """The Shape of ``mesh`` (all vertices for a flat mesh without a 3D hull).

        Args:
            mesh: a Mesh.

        Returns:
            Shape.
        """
        from scipy.spatial import ConvexHull

        vertices = np.asarray(mesh.vertices, np.float64) - mesh.center
        try:
            hull = vertices[ConvexHull(vertices).vertices]
        except Exception:  # flat meshes have no 3D hull: all their vertices will do
            hull = vertices
        return cls(hull, (vertices.max(axis=0) - vertices.min(axis=0)) / 2.0,
                   float(np.linalg.norm(hull, axis=1).max()))

    def points(self, rotation, center) -> np.ndarray:
        """(P,3) hull vertices at this pose (camera frame).

        Args:
            rotation: (3,3) rotation.
            center: (3,) bounding-box centre in the camera frame, metres.

        Returns:
            (P,3) float64 metres.
        """
        return self.hull @ np.asarray(rotation).T + center

    def outline(self, K, rotation, center) -> np.ndarray:
        """(P,2) float32 convex polygon (pixels) holding the silhouette at this pose.

        Args:
            K: (3,3) intrinsics in pixels.
            rotation: (3,3) rotation.
            center: (3,) bounding-box centre in the camera frame, metres (in front of the camera).

        Returns:
            (Q,2) float32 hull polygon in pixels.
        """
        import cv2

        points = self.points(rotation, center)
        pixels = (points @ K.T)[:, :2] / points[:, 2:3]
        return cv2.convexHull(pixels.astype(np.float32)).reshape(-1, 2)


def boxes_intersect(rot_a, center_a, half_a, rot_b, center_b, half_b) -> bool:
    """Whether two oriented boxes intersect: no separating axis among the 15 candidates.

    Args:
        rot_a: (3,3) rotation whose columns are box a's axes.
        center_a: (3,) centre of box a.
        half_a: (3,) half sizes of box a.
        rot_b: (3,3) axes of box b.
        center_b: (3,) centre of box b.
        half_b: (3,) half sizes of box b.

    Returns:
        bool.
    """
    axes = [rot_a[:, i] for i in range(3)] + [rot_b[:, i] for i in range(3)]
    axes += [np.cross(rot_a[:, i], rot_b[:, j]) for i in range(3) for j in range(3)]
    offset = center_b - center_a
    for axis in axes:
        norm = np.linalg.norm(axis)
        if norm < 1e-9:  # parallel edges: covered by the face axes
            continue
        axis = axis / norm
        reach_a = np.abs(rot_a.T @ axis) @ half_a
        reach_b = np.abs(rot_b.T @ axis) @ half_b
        if abs(offset @ axis) > reach_a + reach_b:
            return False
    return True


def separable(points_a: np.ndarray, points_b: np.ndarray) -> bool:
    """Whether a plane separates two point sets, i.e. their convex hulls are disjoint.

    A feasibility linear program for w, b with w.p >= b + 1 on one side and w.q <= b - 1 on the
    other.

    Args:
        points_a: (P,3) points.
        points_b: (Q,3) points.

    Returns:
        bool.
    """
    from scipy.optimize import linprog

    middle = (points_a.mean(axis=0) + points_b.mean(axis=0)) / 2.0
    scale = max(np.abs(points_a - middle).max(), np.abs(points_b - middle).max(), 1e-9)
    a, b = (points_a - middle) / scale, (points_b - middle) / scale  # well conditioned
    rows = np.vstack([np.hstack([-a, np.ones((len(a), 1))]), np.hstack([b, -np.ones((len(b), 1))])])
    result = linprog(np.zeros(4), A_ub=rows, b_ub=-np.ones(len(rows)), bounds=[(None, None)] * 4, method="highs")
    return result.status == 0


def solids_apart(a: "Shape", rot_a, center_a, b: "Shape", rot_b, center_b) -> bool:
    """Whether two objects' convex hulls are disjoint at these poses: bounding spheres, then
    oriented boxes, then (only when those cannot tell) a separating plane.

    Args:
        a: Shape of the first object.
        rot_a: (3,3) its rotation.
        center_a: (3,) its centre, metres.
        b: Shape of the second object.
        rot_b: (3,3) its rotation.
        center_b: (3,) its centre, metres.

    Returns:
        bool.
    """
    if np.linalg.norm(center_a - center_b) >= a.radius + b.radius:
        return True
    if not boxes_intersect(rot_a, center_a, a.half, rot_b, center_b, b.half):
        return True
    return separable(a.points(rot_a, center_a), b.points(rot_b, center_b))


def outlines_overlap(outline_a, outline_b, overlap: float = MAX_OBJECT_OVERLAP) -> bool:
    """Whether two silhouette hulls (convex polygons, pixels) overlap by more than ``overlap`` of
    the smaller one's area.

    Args:
        outline_a: (P,2) float32 convex polygon, pixels.
        outline_b: (Q,2) float32 convex polygon, pixels.
        overlap: allowed fraction (default MAX_OBJECT_OVERLAP).

    Returns:
        bool.
    """
    import cv2

    area, _ = cv2.intersectConvexConvex(outline_a, outline_b)
    smaller = min(cv2.contourArea(outline_a), cv2.contourArea(outline_b))
    return area > overlap * max(smaller, 1.0)


def apart(a: Track, a_rotations, a_centers, b: Track, K, frames=None) -> bool:
    """Whether object ``a`` on the path (a_rotations, a_centers) and object ``b`` on its own path
    keep the placement rule (see the module docstring) in ``frames``.

    Frames in which either object is hidden are skipped.

    Args:
        a: the first object's Track (its shape and hidden frames are used).
        a_rotations: [(3,3)] per frame for ``a``.
        a_centers: [(3,)] per frame for ``a``, metres.
        b: the other Track (its own rotations and centres).
        K: (3,3) intrinsics in pixels.
        frames: frame indices to check (default all).

    Returns:
        bool.
    """
    frames = range(len(a_centers)) if frames is None else frames
    for k in frames:
        if k in a.hidden or k in b.hidden:
            continue
        if outlines_overlap(a.shape.outline(K, a_rotations[k], a_centers[k]),
                            b.shape.outline(K, b.rotations[k], b.centers[k])):
            return False
        if not solids_apart(a.shape, a_rotations[k], a_centers[k], b.shape, b.rotations[k], b.centers[k]):
            return False
    return True
