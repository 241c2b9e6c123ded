"""The small interface every refiner/scorer pair implements, and the observed frame they read.

The pipeline (hypotheses -> refine -> score -> best) is written once against these two
classes; the weight-free pair (geometric.py) and the learned pair (learned.py) plug in
behind them. All poses here are of the *re-centred* mesh (vertices minus the bbox centre),
object-in-camera, float32 torch tensors on the engine's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from chunkpose.ops.crops import inverse_transforms
from chunkpose.ops.depth import OnDemandClean
from chunkpose.ops.warp import sample_positions, warp_crops, xyz_crops


@dataclass
class ObservedFrame:
    """One RGB-D observation, with only the region crops can read on the device.

    depth is either cleaned (eroded and bilateral-filtered) over the ROI, or, with
    ``on_demand`` set, RAW over the window at ``depth_origin`` that holds the ROI and the
    filters' halo: each crop then cleans just the pixels it samples (the same values).
    Crop transforms are full-frame and the ops take the origins to index into the windows.

    Attributes:
        rgb: (3,h,w) uint8 colour of the ROI, whose top-left full-frame pixel is ``origin``.
        depth: float32 metres (0 invalid): (h,w) cleaned over the ROI, or the raw window at
            ``depth_origin`` when ``on_demand`` is set.
        mask: (h,w) bool object mask over the ROI, or None (tracking: no mask is given).
        K: (3,3) float32 full-frame intrinsics in pixels.
        origin: (x0, y0) full-frame pixel of the ROI's first pixel.
        full_size: (H, W) of the whole frame in pixels.
        diameter: the object's diameter in metres (the scale of crops, thresholds and xyz
            normalisation).
        depth_origin: (x0, y0) of the raw depth window when cleaned on demand, else None.
        on_demand: the OnDemandClean of a raw depth window, or None when depth is cleaned.
    """

    rgb: torch.Tensor
    depth: torch.Tensor
    mask: Optional[torch.Tensor]
    K: torch.Tensor
    origin: Tuple[int, int]
    full_size: Tuple[int, int]
    diameter: float
    depth_origin: Optional[Tuple[int, int]] = None
    on_demand: Optional[OnDemandClean] = None

    @property
    def device(self) -> torch.device:
        return self.depth.device

    @property
    def roi(self) -> Tuple[int, int, int, int]:
        """(x0, y0, x1, y1) full-frame pixels of the ROI, end-exclusive."""
        h, w = self.rgb.shape[-2:]
        return self.origin[0], self.origin[1], self.origin[0] + w, self.origin[1] + h

    def cost_signature(self) -> tuple:
        """What the per-hypothesis cost of work on this frame depends on (the engine's plan cache key).

        The tensors' kinds and whether depth is cleaned on demand, not the ROI's size or place,
        which change every tracked frame.

        Returns:
            tuple of (rgb dtype, depth dtype, has mask, on demand, device) as str/bool.
        """
        return (str(self.rgb.dtype), str(self.depth.dtype), self.mask is not None, self.on_demand is not None,
                str(self.device))

    def tensors(self) -> tuple:
        """The device tensors the frame holds (what a call keeps resident).

        Returns:
            tuple of rgb, depth, mask (when present) and K.
        """
        return tuple(t for t in (self.rgb, self.depth, self.mask, self.K) if t is not None)

    # Helpers so that every refiner/scorer prepares observed crops the same way.
    # transforms (B,3,3) map full-frame pixels to crop pixels (chunkpose.ops.crops).

    def rgb_crops(self, transforms: torch.Tensor, size: int, sampling: str = "exact") -> torch.Tensor:
        """Observed colour in each crop, bilinear: (B,3,size,size) float32 0..255.

        Args:
            transforms: (B,3,3) full-frame pixel -> crop pixel.
            size: crop side in pixels.
            sampling: "exact" (default) or "kornia_0.7.2" (upstream's sub-pixel offset, see
                chunkpose.ops.crops.sampling_maps).

        Returns:
            (B,3,size,size) float32 in 0..255 on the frame's device; 0 outside the ROI.
        """
        return warp_crops(self.rgb, transforms, size, mode="bilinear", origin=self.origin, sampling=sampling,
                          source_size=self.full_size)

    def xyz_crops(self, transforms: torch.Tensor, size: int, semantics: str = "refiner",
                  sampling: str = "exact") -> torch.Tensor:
        """Observed camera-frame points in each crop: (B,3,size,size) float32.

        Args:
            transforms: (B,3,3) full-frame pixel -> crop pixel.
            size: crop side in pixels.
            semantics: "refiner" (default): nearest full-frame pixel; "scorer": FoundationPose's
                double nearest round trip (see chunkpose.ops.warp.xyz_crops).
            sampling: "exact" (default) or "kornia_0.7.2", as rgb_crops.

        Returns:
            (B,3,size,size) float32 camera-frame points in metres on the frame's device, 0 where there
            is no valid depth.
        """
        origin = self.origin if self.on_demand is None else self.depth_origin
        return xyz_crops(self.depth, self.K, transforms, size, semantics=semantics, origin=origin,
                         sampling=sampling, source_size=self.full_size, clean=self.on_demand)

    def mask_crops(self, transforms: torch.Tensor, size: int) -> torch.Tensor:
        """Observed object mask in each crop, nearest: (B,size,size) bool (all True if no mask).

        Args:
            transforms: (B,3,3) full-frame pixel -> crop pixel.
            size: crop side in pixels.

        Returns:
            (B,size,size) bool on the transforms' device.
        """
        if self.mask is None:
            return torch.ones(transforms.shape[0], size, size, dtype=torch.bool, device=transforms.device)
        return warp_crops(self.mask[None], transforms, size, mode="nearest", origin=self.origin)[:, 0]

    def inside_crops(self, transforms: torch.Tensor, size: int) -> torch.Tensor:
        """Which crop pixels see the image at all (nearest position inside the full frame).

        Outside it nothing is observed, so neither absence of mask nor of depth there says anything
        about a hypothesis (objects cut off by the border).

        Args:
            transforms: (B,3,3) full-frame pixel -> crop pixel.
            size: crop side in pixels.

        Returns:
            (B,size,size) bool on the transforms' device.
        """
        H, W = self.full_size
        Ti = inverse_transforms(transforms).cpu()
        q = torch.arange(size, dtype=torch.float64)
        if bool((Ti[:, 2, :2] == 0).all() & (Ti[:, 0, 1] == 0).all() & (Ti[:, 1, 0] == 0).all()):
            # box crops (scale + shift): columns and rows separately, no (B,s,s) float buffer
            px = torch.round((Ti[:, 0, 0, None] * q + Ti[:, 0, 2, None]) / Ti[:, 2, 2, None])
            py = torch.round((Ti[:, 1, 1, None] * q + Ti[:, 1, 2, None]) / Ti[:, 2, 2, None])
            inside = ((py >= 0) & (py <= H - 1))[:, :, None] & ((px >= 0) & (px <= W - 1))[:, None, :]
        else:
            px, py = sample_positions(transforms.cpu(), size)
            inside = (torch.round(px) >= 0) & (torch.round(px) <= W - 1)
            inside &= (torch.round(py) >= 0) & (torch.round(py) <= H - 1)
        return inside.to(transforms.device)


class ObjectJob(NamedTuple):
    """One object's hypotheses in a frame, for the ``*_many`` methods that run the hypotheses of
    several objects as one engine stage (Engine.map_groups: one plan, chunks across objects).

    Attributes:
        poses: (B,4,4) float32 re-centred object-in-camera poses, metres, on the frame's device.
        frame: the object's ObservedFrame (its mask and diameter; the frame's tensors may be
            shared with other objects').
        renderer: a renderer of the object's re-centred mesh.
    """

    poses: torch.Tensor
    frame: "ObservedFrame"
    renderer: object


class _Stage:
    """What refiners and scorers share: their crop windows and the name of the engine stage
    that runs their per-hypothesis work (chunkpose.pipeline.sizing reads its cost model)."""

    crop_ratio: float
    crop_size: int
    stage_name: str = ""


class Refiner(_Stage):
    """Improves pose hypotheses against one observed frame.

    Every stage that grows with B must go through ``engine.map`` (no chunk sizes here).

    Attributes:
        crop_ratio: crop window size as a multiple of the object diameter ("box_3d" windows).
        crop_size: crop side in pixels.
        polish_candidates: after scoring, the registration refines this many best-scored
            hypotheses again with polish() and scores them once more (0: no second pass,
            FoundationPose's algorithm).
        stage_name: name of the engine stage of the per-hypothesis work (for the sizing).
    """

    crop_ratio: float = 1.2
    crop_size: int = 160
    #: After scoring, the registration refines this many best-scored hypotheses again with
    #: polish() and scores them once more (0: no second pass, FoundationPose's algorithm).
    polish_candidates: int = 0

    def refine(self, poses: torch.Tensor, frame: ObservedFrame, renderer, engine, iterations: int) -> torch.Tensor:
        """Run ``iterations`` render-compare-update rounds on every hypothesis.

        Args:
            poses: (B,4,4) float32 object-in-camera poses of the re-centred mesh, metres, on the
                frame's device.
            frame: the prepared ObservedFrame.
            renderer: a Renderer of the re-centred mesh.
            engine: the Engine that runs the per-hypothesis stages (None: unbudgeted, in one go).
            iterations: number of rounds (0 returns the poses as they are).

        Returns:
            (B,4,4) float32 refined poses, same device.
        """
        if type(self).refine_many is Refiner.refine_many:
            raise NotImplementedError(f"{type(self).__name__} implements neither refine nor refine_many")
        return self.refine_many([ObjectJob(poses, frame, renderer)], engine, iterations)[0]

    def polish(self, poses: torch.Tensor, frame: ObservedFrame, renderer, engine) -> torch.Tensor:
        """Extra refinement of a few already-good poses (B,4,4) -> (B,4,4).

        The default returns the poses unchanged.

        Args:
            poses: (B,4,4) float32 poses of the re-centred mesh, metres.
            frame: the prepared ObservedFrame.
            renderer: a Renderer of the re-centred mesh.
            engine: the Engine (or None).

        Returns:
            (B,4,4) float32 poses.
        """
        if type(self).polish_many is Refiner.polish_many:
            return poses
        return self.polish_many([ObjectJob(poses, frame, renderer)], engine)[0]

    # A refiner implements refine or refine_many (and polish or polish_many): one that maps its
    # rounds with Engine.map_groups implements the *_many ones, so that several objects'
    # hypotheses share every round's plan, and refine/polish come from them; otherwise the
    # *_many ones run the objects one by one.

    def refine_many(self, jobs: Sequence[ObjectJob], engine, iterations: int) -> List[torch.Tensor]:
        """``refine`` of several objects' hypotheses in one frame.

        Args:
            jobs: one ObjectJob per object.
            engine: the Engine (or None).
            iterations: number of rounds, the same for every object.

        Returns:
            list of (B_j,4,4) refined poses, one per job.
        """
        return [self.refine(job.poses, job.frame, job.renderer, engine, iterations) for job in jobs]

    def polish_many(self, jobs: Sequence[ObjectJob], engine) -> List[torch.Tensor]:
        """``polish`` of several objects' poses in one frame.

        Args:
            jobs: one ObjectJob per object.
            engine: the Engine (or None).

        Returns:
            list of (B_j,4,4) poses, one per job.
        """
        return [self.polish(job.poses, job.frame, job.renderer, engine) for job in jobs]


class Scorer(_Stage):
    """Scores refined hypotheses; higher is better.

    Per-hypothesis work goes through ``engine.map``; anything needing all hypotheses at once
    (e.g. cross attention) runs once on the gathered per-hypothesis features.

    Attributes:
        crop_ratio: crop window size as a multiple of the object diameter.
        crop_size: crop side in pixels.
        stage_name: name of the engine stage of the per-hypothesis work (for the sizing).
    """

    crop_ratio: float = 1.1
    crop_size: int = 160

    def score(self, poses: torch.Tensor, frame: ObservedFrame, renderer, engine) -> torch.Tensor:
        """Score every hypothesis against the frame.

        Args:
            poses: (B,4,4) float32 object-in-camera poses of the re-centred mesh, metres.
            frame: the prepared ObservedFrame.
            renderer: a Renderer of the re-centred mesh.
            engine: the Engine that runs the per-hypothesis stages (None: unbudgeted).

        Returns:
            (B,) float32 scores, higher is better.
        """
        if type(self).score_many is Scorer.score_many:
            raise NotImplementedError(f"{type(self).__name__} implements neither score nor score_many")
        return self.score_many([ObjectJob(poses, frame, renderer)], engine)[0]

    # Splitting a frame's hypotheses over devices (chunkpose.pipeline.shards) needs the score
    # in two steps: what each hypothesis gives on its own device, and what compares them all.
    # A scorer without a cross-hypothesis step keeps these defaults.

    def hypothesis_features(self, poses: torch.Tensor, frame: ObservedFrame, renderer, engine) -> torch.Tensor:
        """What the score needs of each hypothesis alone, computable on any shard of them.

        The default is the score itself.

        Args:
            poses: (B,4,4) float32 object-in-camera poses of the re-centred mesh, metres.
            frame: the prepared ObservedFrame.
            renderer: a Renderer of the re-centred mesh.
            engine: the Engine (or None).

        Returns:
            (B, ...) tensor, one row per hypothesis.
        """
        return self.score(poses, frame, renderer, engine)

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """Scores (B,) from the gathered hypothesis_features (B, ...) of all hypotheses, in order.

        The default returns them unchanged.

        Args:
            features: (B, ...) rows of hypothesis_features, concatenated in hypothesis order.

        Returns:
            (B,) float32 scores, higher is better.
        """
        return features

    def score_many(self, jobs: Sequence[ObjectJob], engine) -> List[torch.Tensor]:
        """``score`` of several objects' hypotheses in one frame (scores compare hypotheses of one
        object only). A scorer implements score or score_many: one whose per-hypothesis work runs
        through Engine.map_groups implements score_many, so that the objects share the stage's
        plan, and score comes from it; otherwise this scores the objects one by one.

        Args:
            jobs: one ObjectJob per object.
            engine: the Engine (or None).

        Returns:
            list of (B_j,) float32 scores, one per job.
        """
        return [self.score(job.poses, job.frame, job.renderer, engine) for job in jobs]


def stage_modules(stage) -> list:
    """The torch modules a refiner or scorer holds (the networks of a learned pair).

    Args:
        stage: a Refiner or Scorer.

    Returns:
        list of torch.nn.Module attributes of ``stage``.
    """
    return [value for value in vars(stage).values() if isinstance(value, torch.nn.Module)]


def pair_resident(refiner, scorer, renderer) -> list:
    """What a refiner/scorer pair and its renderer hold on the device for a whole call.

    Args:
        refiner: a Refiner.
        scorer: a Scorer.
        renderer: the renderer the pair draws with.

    Returns:
        list of the pair's modules and the renderer's tensors (its mesh buffers; none for a
        renderer without ``device_tensors``), for ``Engine.call(resident=...)``.
    """
    tensors = getattr(renderer, "device_tensors", None)
    return [*stage_modules(refiner), *stage_modules(scorer), *(tensors() if callable(tensors) else ())]
