"""The error arrays of one (image, object): every estimate against every ground-truth
instance of the object, for each metric evaluate() scores (VSD, MSSD, MSPD, ADD, ADD-S).

The pruning follows bop_toolkit: MSSD, ADD and ADD-S only where the centres are within a
diameter (else inf), VSD only where the bounding spheres' projections overlap (else 1).
"""
from __future__ import annotations

import numpy as np

from chunkpose import metrics
from chunkpose.bop_eval import errors as E

METRICS = ("vsd", "mssd", "mspd", "add", "adds")


def pose_m(R, t_mm) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = np.asarray(R, dtype=np.float64).reshape(3, 3)
    pose[:3, 3] = np.asarray(t_mm, dtype=np.float64).reshape(3) / 1000.0
    return pose


class ImageContext:
    """What the objects of one image share: K, the depth and the ground-truth renders.

    The depth is read only when an object of the image first has estimates, since images
    without any need no depth file; ground-truth renders are keyed by the instance's index
    in the image so each is rendered at most once however many estimates meet it.
    """

    def __init__(self, K: np.ndarray, read_depth, camera_width: float | None):
        self.K = K
        self._read_depth = read_depth
        self._camera_width = camera_width
        self.depth: np.ndarray | None = None
        self.width: float | None = None
        self.gt_renders: dict[int, object] = {}

    def load_depth(self) -> None:
        if self.depth is None:
            self.depth = self._read_depth()
            # MSPD is normalised by the camera's width, the depth image's when camera.json has none
            self.width = float(self._camera_width or self.depth.shape[1])

    def render(self, renderer, vertices, pose: np.ndarray):
        return E.render_in_image(renderer, vertices, pose, self.K, self.depth.shape[1], self.depth.shape[0])


def empty_errors(n_est: int, n_gt: int) -> dict[str, np.ndarray]:
    """The errors of pairs that are never computed: VSD 1 (per tau), the others inf."""
    errs = {"vsd": np.ones((n_est, n_gt, len(E.VSD_TAUS)))}
    for metric in METRICS[1:]:
        errs[metric] = np.full((n_est, n_gt, 1), np.inf)
    return errs


def object_errors(ests: list[dict], gts: list[dict], gt_ids: list[int], obj_id: int, models, image: ImageContext,
                  delta: float) -> dict[str, np.ndarray]:
    """{metric: (estimates, ground truths, 1 or VSD taus)} for estimates `ests` (rows of the
    results CSV) of object `obj_id` against the instances `gt_ids` of the image's `gts`."""
    errs = empty_errors(len(ests), len(gt_ids))
    if not ests:
        return errs
    # this order (model info, depth, then the mesh) decides which missing file is reported first
    diameter = models.diameter(obj_id)
    syms = models.symmetries(obj_id)
    pts = models.points_mm(obj_id)
    pts_m = pts / 1000.0
    image.load_depth()
    mesh = models.mesh(obj_id)
    renderer = models.renderer(obj_id)
    for e, est in enumerate(ests):
        pose_e = pose_m(est["R"], est["t"])
        render_e = None
        for j, g in enumerate(gt_ids):
            R_g = np.asarray(gts[g]["cam_R_m2c"], dtype=np.float64).reshape(3, 3)
            t_g = np.asarray(gts[g]["cam_t_m2c"], dtype=np.float64).reshape(3)
            pose_g = pose_m(R_g, t_g)
            if E.centres_within_diameter(est["t"], t_g, diameter):
                errs["mssd"][e, j, 0] = E.mssd(est["R"], est["t"], R_g, t_g, pts, syms) / diameter
                errs["add"][e, j, 0] = metrics.add_error(pose_e, pose_g, pts_m)
                errs["adds"][e, j, 0] = metrics.adds_error(pose_e, pose_g, pts_m)
            errs["mspd"][e, j, 0] = (E.MSPD_REFERENCE_WIDTH / image.width) * E.mspd(
                est["R"], est["t"], R_g, t_g, image.K, pts, syms)
            if E.sphere_projections_overlap(est["t"], t_g, 0.5 * diameter):
                if render_e is None:
                    render_e = image.render(renderer, mesh.vertices, pose_e)
                if g not in image.gt_renders:
                    image.gt_renders[g] = image.render(renderer, mesh.vertices, pose_g)
                errs["vsd"][e, j] = E.vsd_from_renders(render_e, image.gt_renders[g], image.depth, image.K, delta,
                                                       E.VSD_TAUS, diameter)
    return errs


__all__ = ["ImageContext", "METRICS", "empty_errors", "object_errors", "pose_m"]
