"""Frames for the benchmarks: a synthetic sequence with ground truth, or a user's scene."""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from chunkpose.io.readers import YCBInEOATReader
from chunkpose.ops.geometry import scale_intrinsics, scaled_size

MODEL_POINTS = 4000


@dataclass
class Frames:
    """rgb/depth/masks: per frame (masks[0] is needed to register); K (3,3); poses: ground
    truth per frame or []; mesh: what PoseEstimator takes; model_points (N,3) for ADD."""

    rgb: list
    depth: list
    masks: list
    K: np.ndarray
    poses: list
    mesh: object
    model_points: np.ndarray
    diameter: float
    description: str

    @property
    def height(self) -> int:
        return int(self.rgb[0].shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb[0].shape[1])


def learned_pair(device: str, crop: int = 160):
    """The learned refiner and scorer with random weights in the upstream layout (seed 0):
    FoundationPose's compute and memory without its licensed checkpoints."""
    import torch

    from chunkpose.models import RefineNet, ScoreNetMultiPair, official_config
    from chunkpose.pipeline.learned import LearnedRefiner, LearnedScorer

    torch.manual_seed(0)
    size = [crop, crop]
    refiner = LearnedRefiner(RefineNet().eval().to(device), official_config("refiner", input_resize=size))
    scorer = LearnedScorer(ScoreNetMultiPair().eval().to(device), official_config("scorer", input_resize=size))
    return refiner, scorer


def make_estimator(mesh, budget_gb, device: str, args):
    """PoseEstimator with the benchmark's settings: args.hypotheses, args.refine_iters,
    args.track_iters (if any), args.no_polish (skip the geometric refiner's polish pass) and
    args.path ("geometric", or "learned": random upstream-layout weights, learned_pair)."""
    import chunkpose

    refiner = scorer = None
    health = {}
    if getattr(args, "path", "geometric") == "learned":
        refiner, scorer = learned_pair(device, getattr(args, "learned_crop", 160))
        # random weights cannot track: without health checks every tracked frame stays a track
        # call instead of being lost and re-registered
        health = {"health_threshold": None}
    elif getattr(args, "no_polish", False):
        from chunkpose.pipeline.geometric import GeometricRefiner

        refiner = GeometricRefiner(polish_candidates=0)
    return chunkpose.PoseEstimator(mesh, budget_gb=budget_gb, device=device, refiner=refiner, scorer=scorer,
                                   refine_iterations=args.refine_iters,
                                   track_iterations=getattr(args, "track_iters", 2), hypotheses=args.hypotheses,
                                   **health)


def _surface_points(trimesh_mesh, count: int = MODEL_POINTS) -> np.ndarray:
    """Surface samples for ADD, fixed by a seed so every case is scored on the same points."""
    import trimesh

    points, _ = trimesh.sample.sample_surface(trimesh_mesh, count, seed=0)
    return np.asarray(points, dtype=np.float64)


def synthetic_frames(width: int, height: int, frames: int, seed: int, mesh=None, footprint=None) -> Frames:
    from chunkpose.synth import make_scene

    scene = make_scene(mesh=mesh, width=width, height=height, frames=frames, seed=seed, footprint=footprint)
    return Frames(
        rgb=scene.rgb, depth=scene.depth, masks=scene.masks, K=scene.K, poses=scene.poses,
        mesh=scene.mesh, model_points=_surface_points(scene.mesh.trimesh), diameter=float(scene.mesh.diameter),
        description=f"synthetic seed {seed}, {width}x{height}, {frames} frames, footprint {scene.footprint:.3f}",
    )


def load_frames(scene_dir: str, mesh_path: str, frames: int) -> Frames:
    from chunkpose import load_mesh

    reader = YCBInEOATReader(scene_dir)
    mesh = load_mesh(mesh_path)
    loaded = [reader.frame(i, need_mask=(i == 0)) for i in range(min(frames, len(reader)))]
    poses = [f.gt_pose for f in loaded] if all(f.gt_pose is not None for f in loaded) else []
    return Frames(
        rgb=[f.rgb for f in loaded], depth=[f.depth for f in loaded], masks=[f.mask for f in loaded],
        K=loaded[0].K, poses=poses, mesh=mesh, model_points=_surface_points(mesh.trimesh),
        diameter=float(mesh.diameter), description=f"{scene_dir} ({len(loaded)} frames)",
    )


def resize_frames(frames: Frames, factor: float) -> Frames:
    """The seed article's advice: nearest-resize every image, scale K; poses stay metric."""
    h, w = scaled_size(frames.height, frames.width, factor)

    def nearest(image):
        if image is None:
            return None
        src = image.astype(np.uint8) if image.dtype == bool else image
        out = cv2.resize(src, (w, h), interpolation=cv2.INTER_NEAREST)
        return out.astype(bool) if image.dtype == bool else out

    return replace(
        frames, rgb=[nearest(x) for x in frames.rgb], depth=[nearest(x) for x in frames.depth],
        masks=[nearest(x) for x in frames.masks], K=scale_intrinsics(frames.K, factor),
        description=frames.description + f", downscaled x{factor}",
    )
