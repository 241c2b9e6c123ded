"""What a register or track call will hold on the device, before it runs.

The downscale decision, ``PoseEstimator.required_budget_gb`` and the what-if of a frame all
come from here, and here from the same pieces the real call is made of:

- the call's region (chunkpose.pipeline.roi) and the bytes its prepared frame holds,
- the dense clean-up's peak (raw window and filter output, one band of the filter's own
  cost hint, chunkpose.ops.depth),
- each pipeline stage's cost model as the engine's planner holds it (by stage name), after
  a calibration run of the stages on a few hypotheses of a small copy of the frame,
- what stays resident for the whole call (networks, renderer tensors) and what is held
  outside torch (renderer framebuffers), as the estimator declares them to the engine.

The stages' per-item costs are crop-sized, so a calibration on a small frame holds at any
resolution; only the region's bytes grow with the scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from chunkpose.engine.planner import CostModel, Planner
from chunkpose.ops.depth import band_hints
from chunkpose.ops.geometry import scale_intrinsics, scaled_size
from chunkpose.pipeline.roi import CLEANUP, Box, CallRegion, call_region, merge_regions, scale_box


#: Headroom kept when fitting a call to a budget: the what-if itemises the frame, the
#: hypotheses' poses and transforms and every stage's model, not the few kB of K, index
#: and per-call small tensors a real call adds; a scale chosen at the boundary must still
#: plan.
SLACK_BYTES = 256 * 1024


def scaled_geometry(size, K, factor: float) -> Tuple[Tuple[int, int], np.ndarray]:
    """((h, w), K) of an image of ``size=(H, W)`` resized by ``factor``, the way
    chunkpose.pipeline.frame.resize_inputs resizes it.

    Args:
        size: (H, W) in pixels.
        K: (3,3) intrinsics in pixels.
        factor: scale of both image axes.

    Returns:
        ((h, w), K): the truncated size (at least 2 x 2) and the (3,3) float64 scaled K.
    """
    h, w = scaled_size(int(size[0]), int(size[1]), factor)
    return (max(2, h), max(2, w)), scale_intrinsics(K, factor)


def hypothesis_state_bytes(count: int) -> int:
    """Bytes a stage's inputs hold per call besides the frame: the poses (4x4) and their crop
    transforms (3x3), float32.

    Args:
        count: number of hypotheses.

    Returns:
        int bytes.
    """
    return int(count) * (16 + 9) * torch.float32.itemsize


@dataclass(frozen=True)
class CallGeometry:
    """What a call's footprint depends on.

    Attributes:
        mode: "register" or "track".
        size: (H, W) of the image in pixels.
        K: (3,3) float64 intrinsics in pixels.
        center: (3,) camera point in metres where the object is expected.
        mask_bbox: (x0, y0, x1, y1) end-exclusive box of the mask (registration), else None.
        hypotheses: number of pose hypotheses the call runs.
        diameter: the object's diameter in metres.
        crop_ratio: the largest crop ratio of the object's refiner and scorer.
    """

    mode: str
    size: Tuple[int, int]
    K: np.ndarray
    center: np.ndarray
    mask_bbox: Optional[Box]
    hypotheses: int
    diameter: float
    crop_ratio: float

    def region(self, factor: float = 1.0) -> CallRegion:
        """The CallRegion the call would have for this object on its input resized by ``factor``.

        Args:
            factor: scale of both image axes (default 1.0).

        Returns:
            CallRegion on the resized image.
        """
        size, K = scaled_geometry(self.size, self.K, factor)
        mask_bbox = None
        if self.mask_bbox is not None:
            mask_bbox = scale_box(self.mask_bbox, size[1] / self.size[1], size[0] / self.size[0])
        return call_region(self.mode, size, K, self.diameter, self.crop_ratio, self.center, mask_bbox=mask_bbox)


class CallSizing:
    """Predicts a call's peak device bytes at any scale of its input, for the objects it poses
    together (one CallGeometry each; their regions merged as the call merges them).

    Args:
        planner: the engine's Planner (stage models are read from ``planner.by_name``).
        static_bytes: bytes resident for the whole call (networks, renderer tensors, rotation
            sets) plus those held outside torch (renderer framebuffers).
        stages: the pipeline stage names the call runs.
    """

    def __init__(self, planner: Planner, static_bytes: int, stages: Sequence[str]):
        self.planner = planner
        self.static_bytes = int(static_bytes)
        self.stages = tuple(stages)

    @staticmethod
    def regions(geometries: Sequence[CallGeometry], factor: float = 1.0) -> list:
        """The call's merged regions (chunkpose.pipeline.roi.merge_regions) at ``factor``.

        Args:
            geometries: one CallGeometry per object (at full resolution).
            factor: scale of both image axes (default 1.0).

        Returns:
            list of (CallRegion, member indices).
        """
        return merge_regions([g.region(factor) for g in geometries])

    def models(self) -> Dict[str, CostModel]:
        """The stage models the prediction uses (missing ones: not calibrated yet).

        Returns:
            dict of stage name -> CostModel.
        """
        return {name: self.planner.by_name[name] for name in self.stages if name in self.planner.by_name}

    def peak_bytes(self, geometries: Sequence[CallGeometry], factor: float = 1.0, usable: Optional[int] = None,
                   smallest: bool = False) -> int:
        """Predicted peak of the call at ``factor``.

        The static bytes plus the larger of the clean-ups' peaks (one merged region at a time,
        those before it held) and the frames, hypotheses and the largest stage over all
        objects' hypotheses. Chunks as the planner would size them under ``usable`` bytes
        (None: whole batches), or of one item with ``smallest`` (the minimum the call needs).

        Args:
            geometries: one CallGeometry per object (at full resolution).
            factor: scale of both image axes (default 1.0).
            usable: usable budget in bytes the planner sizes chunks under; None = whole batches.
            smallest: chunks (and clean-up bands) of one item (default False).

        Returns:
            int bytes.
        """
        clusters = self.regions(geometries, factor)
        n = sum(g.hypotheses for g in geometries)
        frames = [region.frame_bytes(masks=len(members) if region.has_mask else 0) for region, members in clusters]
        base = self.static_bytes + sum(frames) + hypothesis_state_bytes(n)
        stage_peak = 0
        for model in self.models().values():
            pending = model.pending_bytes(n, 0, False)
            if smallest:
                chunk = 1
            elif usable is None:
                chunk = n
            else:
                chunk = max(1, self.planner.chunk_size(model, base, pending, n, usable=usable))
            stage_peak = max(stage_peak, base + pending + model.transient_bytes(chunk))
        cleanup = max((self._cleanup_peak(region, self.static_bytes + sum(frames[:i]), usable, smallest)
                       for i, (region, _) in enumerate(clusters)), default=0)
        return int(max(stage_peak, cleanup, base))

    @staticmethod
    def _cleanup_peak(region: CallRegion, held: int, usable: Optional[int], smallest: bool) -> int:
        """Peak of one region's dense clean-up with ``held`` bytes live besides it."""
        if region.on_demand:
            return 0
        width = region.raw[2] - region.raw[0]
        rows = region.raw[3] - region.raw[1]
        hints = band_hints(width, CLEANUP.bilateral_radius)
        live = held + 2 * torch.float32.itemsize * region.raw_pixels
        if smallest:
            band_rows = 1
        elif usable is None:
            band_rows = rows
        else:
            band_rows = max(1, min(rows, (usable - live - hints["fixed_bytes"]) // max(1, hints["per_item_bytes"])))
        return live + hints["fixed_bytes"] + band_rows * hints["per_item_bytes"]

    def minimum_bytes(self, geometries: Sequence[CallGeometry], factor: float = 1.0) -> int:
        """The smallest device footprint of the call at ``factor`` (chunks of one item), with
        SLACK_BYTES of headroom.

        Args:
            geometries: one CallGeometry per object (at full resolution).
            factor: scale of both image axes (default 1.0).

        Returns:
            int bytes.
        """
        return self.peak_bytes(geometries, factor, smallest=True) + SLACK_BYTES
