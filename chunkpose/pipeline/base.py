"""The small interface every refiner/scorer pair implements, and the observed frame they read.

The pipeline (hypotheses -> refine -> score -> best) is written once against these two
classes; the weight-free pair (geometric.py) and the learned pair (learned.py) plug in
behind them. All poses here are of the *re-centred* mesh (vertices minus the bbox centre),
object-in-camera, float32 torch tensors on the engine's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from chunkpose.ops.crops import inverse_transforms
from chunkpose.ops.depth import OnDemandClean
from chunkpose.ops.warp import sample_positions, warp_crops, xyz_crops


@dataclass
class ObservedFrame:
    """One RGB-D observation, with only the region crops can read on the device.

    rgb (3,h,w) uint8 and mask (h,w) bool or None (None when tracking: no mask is given)
    cover the ROI whose top-left full-frame pixel is `origin` = (x0, y0). depth holds
    metres (0 invalid), either cleaned (eroded and bilateral-filtered) over the same ROI,
    or, with `on_demand` set, RAW over the window at `depth_origin` that holds the ROI and
    the filters' halo: each crop then cleans just the pixels it samples (the same values).
    K (3,3) float32 is the full-frame intrinsics: crop transforms are full-frame and the
    ops take the origins to index into the windows. `full_size` = (H, W) of the whole
    frame. `diameter` is the object's diameter in metres (the scale of crops, thresholds
    and xyz normalisation).
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
        """What the per-hypothesis cost of work on this frame depends on (the engine's plan
        cache key): the tensors' kinds and whether depth is cleaned on demand, not the ROI's
        size or place, which change every tracked frame."""
        return (str(self.rgb.dtype), str(self.depth.dtype), self.mask is not None, self.on_demand is not None,
                str(self.device))

    def tensors(self) -> tuple:
        """The device tensors the frame holds (what a call keeps resident)."""
        return tuple(t for t in (self.rgb, self.depth, self.mask, self.K) if t is not None)

    # Helpers so that every refiner/scorer prepares observed crops the same way.
    # transforms (B,3,3) map full-frame pixels to crop pixels (chunkpose.ops.crops).

    def rgb_crops(self, transforms: torch.Tensor, size: int, sampling: str = "exact") -> torch.Tensor:
        """Observed colour in each crop, bilinear: (B,3,size,size) float32 0..255.

        sampling: "exact" or "kornia_0.7.2" (upstream's sub-pixel offset, see
        chunkpose.ops.crops.sampling_maps)."""
        return warp_crops(self.rgb, transforms, size, mode="bilinear", origin=self.origin, sampling=sampling,
                          source_size=self.full_size)

    def xyz_crops(self, transforms: torch.Tensor, size: int, semantics: str = "refiner",
                  sampling: str = "exact") -> torch.Tensor:
        """Observed camera-frame points in each crop: (B,3,size,size) float32.

        semantics "refiner": nearest full-frame pixel; "scorer": FoundationPose's double
        nearest round trip (see chunkpose.ops.warp.xyz_crops). sampling as rgb_crops.
        """
        origin = self.origin if self.on_demand is None else self.depth_origin
        return xyz_crops(self.depth, self.K, transforms, size, semantics=semantics, origin=origin,
                         sampling=sampling, source_size=self.full_size, clean=self.on_demand)

    def mask_crops(self, transforms: torch.Tensor, size: int) -> torch.Tensor:
        """Observed object mask in each crop, nearest: (B,size,size) bool (all True if no mask)."""
        if self.mask is None:
            return torch.ones(transforms.shape[0], size, size, dtype=torch.bool, device=transforms.device)
        return warp_crops(self.mask[None], transforms, size, mode="nearest", origin=self.origin)[:, 0]

    def inside_crops(self, transforms: torch.Tensor, size: int) -> torch.Tensor:
        """Which crop pixels see the image at all (nearest position inside the full frame):
        (B,size,size) bool. Outside it nothing is observed, so neither absence of mask nor
        of depth there says anything about a hypothesis (objects cut off by the border)."""
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


class _Stage:
    """What refiners and scorers share: their crop windows and the name of the engine stage
    that runs their per-hypothesis work (chunkpose.pipeline.sizing reads its cost model)."""

    crop_ratio: float
    crop_size: int
    stage_name: str = ""


class Refiner(_Stage):
    """Improves pose hypotheses against one observed frame.

    crop_ratio: crop window size as a multiple of the object diameter ("box_3d" windows).
    refine(poses (B,4,4), frame, renderer, engine, iterations) -> (B,4,4): runs
    `iterations` render-compare-update rounds; every stage that grows with B must go
    through `engine.map` (no chunk sizes here).
    """

    crop_ratio: float = 1.2
    crop_size: int = 160
    #: After scoring, the registration refines this many best-scored hypotheses again with
    #: polish() and scores them once more (0: no second pass, FoundationPose's algorithm).
    polish_candidates: int = 0

    def refine(self, poses: torch.Tensor, frame: ObservedFrame, renderer, engine, iterations: int) -> torch.Tensor:
        raise NotImplementedError

    def polish(self, poses: torch.Tensor, frame: ObservedFrame, renderer, engine) -> torch.Tensor:
        """Extra refinement of a few already-good poses (B,4,4) -> (B,4,4)."""
        return poses


class Scorer(_Stage):
    """Scores refined hypotheses; higher is better.

    score(poses (B,4,4), frame, renderer, engine) -> (B,) float32. Per-hypothesis work
    goes through `engine.map`; anything needing all hypotheses at once (e.g. cross
    attention) runs once on the gathered per-hypothesis features.
    """

    crop_ratio: float = 1.1
    crop_size: int = 160

    def score(self, poses: torch.Tensor, frame: ObservedFrame, renderer, engine) -> torch.Tensor:
        raise NotImplementedError
