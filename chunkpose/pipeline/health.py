"""Whether a pose still explains the frame: the tracking health figure, and where to look again.

The figure is the fraction of the pose's rendered silhouette (the part inside the image)
whose observed depth agrees with the rendered depth within ``tolerance`` x the diameter.
A tracked pose that follows the object scores near 1 (edges and sensor holes take a few
percent); an occluder in front of the object, an object that jumped away (its old place
shows the background) or one that left the view score near 0. It costs one render and one
crop of the observation per pose, at the refiner's crop size.

When a track is lost and the caller has no new mask, the search region for re-registration
is the convex hull of the last good pose's projected mesh, grown by a margin, restricted to
pixels whose raw depth lies within that pose's depth range (widened by the health tolerance):
an occluder in front and the background behind drop out, and so do the hulls of other objects tracked in the frame;
a still-hidden object then gives too few pixels to register on and the track stays lost
instead of latching onto the occluder or a neighbour.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from chunkpose.ops.crops import crop_windows
from chunkpose.pipeline.base import ObservedFrame

#: Default: a track is lost when less than this fraction of its silhouette agrees with the depth.
HEALTH_THRESHOLD = 0.7
#: Default depth agreement tolerance, as a fraction of the object diameter.
HEALTH_TOLERANCE = 0.1
#: Default growth of the last good silhouette for re-registration without a mask, as a
#: fraction of the object's image diameter.
SEARCH_MARGIN = 0.5


def silhouette_agreement(poses: torch.Tensor, *, frame: ObservedFrame, renderer, crop_ratio: float, size: int,
                         tolerance_m: float) -> torch.Tensor:
    """The health figure of each pose: agreeing fraction of its visible rendered silhouette.

    The op the engine maps over poses (stage "health").

    Args:
        poses: (n,4,4) float32 object-in-camera poses of the re-centred mesh, metres.
        frame: the prepared ObservedFrame.
        renderer: a renderer of the re-centred mesh.
        crop_ratio: crop window side as a multiple of the diameter.
        size: crop side in pixels.
        tolerance_m: largest |observed - rendered| depth, metres, that counts as agreement.

    Returns:
        (n,) float32 in [0, 1]; 0 when no part of the silhouette is inside the image.
    """
    transforms = crop_windows(poses, frame.K, frame.diameter, crop_ratio, size).transforms
    rendered = renderer.render_crops(poses, frame.K, transforms, size)
    z_rendered = rendered["depth"].to(frame.device)
    silhouette = rendered["mask"].to(frame.device) & frame.inside_crops(transforms, size)
    z_observed = frame.xyz_crops(transforms, size)[:, 2]
    agree = silhouette & (z_observed > 0) & ((z_observed - z_rendered).abs() <= tolerance_m)
    visible = silhouette.flatten(1).sum(1)
    return torch.where(visible > 0, agree.flatten(1).sum(1) / visible.clamp(min=1), torch.zeros_like(visible,
                       dtype=torch.float32)).float()


def hull_mask(vertices: np.ndarray, pose: np.ndarray, K: np.ndarray, shape, margin: float, diameter: float
              ) -> np.ndarray:
    """The convex hull of the posed mesh's projection, grown by ``margin`` x its image diameter.

    Args:
        vertices: (N,3) mesh vertices in the frame ``pose`` is of, metres.
        pose: (4,4) object-in-camera pose, metres.
        K: (3,3) intrinsics, pixels.
        shape: (H, W) of the mask.
        margin: growth as a fraction of the object's image diameter (0: the hull itself).
        diameter: the object's diameter, metres.

    Returns:
        (H,W) bool (all False when part of the mesh is behind the camera).
    """
    H, W = shape
    cam = vertices @ pose[:3, :3].T + pose[:3, 3]
    region = np.zeros((H, W), dtype=np.uint8)
    if (cam[:, 2] <= 0).any():
        return region > 0
    uv = (cam @ np.asarray(K, np.float64).T)[:, :2] / cam[:, 2:3]
    hull = cv2.convexHull(uv.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    centre = hull.mean(axis=0)
    grow = margin * diameter * float(K[0, 0]) / float(cam[:, 2].mean())
    offsets = hull - centre
    lengths = np.maximum(np.linalg.norm(offsets, axis=1, keepdims=True), 1e-6)
    lim = 4 * max(H, W)
    polygon = np.clip(np.round(centre + offsets * (1.0 + grow / lengths)), -lim, lim).astype(np.int32)
    cv2.fillConvexPoly(region, polygon, 1)
    return region > 0


def search_mask(vertices: np.ndarray, pose: np.ndarray, K: np.ndarray, depth: np.ndarray, diameter: float,
                margin: float = SEARCH_MARGIN, tolerance: float = HEALTH_TOLERANCE, others=()) -> np.ndarray:
    """Where to re-register a lost object without a given mask.

    Args:
        vertices: (N,3) mesh vertices in the frame ``pose`` is of, metres.
        pose: (4,4) last good object-in-camera pose, metres.
        K: (3,3) intrinsics of ``depth``, pixels.
        depth: (H,W) float32 raw depth, metres (0 = missing).
        diameter: the object's diameter, metres.
        margin: growth of the hull as a fraction of the object's image diameter.
        tolerance: how far beyond the posed mesh's nearest and farthest depth a pixel may be, as
            a fraction of the diameter.
        others: (vertices, pose, diameter) of other objects tracked in the frame, whose hulls
            are left out (a lost object is not to be found where its neighbour is).

    Returns:
        (H,W) bool: the grown hull's pixels whose depth lies within the posed mesh's depth range
        widened by ``tolerance`` x diameter, outside the other objects' hulls (all False when the
        pose is behind the camera).
    """
    region = hull_mask(vertices, pose, K, depth.shape, margin, diameter)
    if not region.any():
        return region
    cam_z = vertices @ pose[2, :3] + pose[2, 3]
    slack = tolerance * diameter
    region &= (depth >= cam_z.min() - slack) & (depth <= cam_z.max() + slack)
    for other_vertices, other_pose, other_diameter in others:
        region &= ~hull_mask(other_vertices, other_pose, K, depth.shape, 0.0, other_diameter)
    return region
