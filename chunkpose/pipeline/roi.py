"""The region of interest of a call: which full-frame pixels go on the device, and their bytes.

Only the region some crop can read ever lives on the device. A registration's ROI is the
mask's box united with a box around the translation guess, a tracking call's a box around
the last pose; each box spans `margin` crop windows (the largest crop ratio of the refiner
and the scorer), because crops follow the poses as they are refined. The same functions
give the real call's ROI and the what-if of any scale (chunkpose.pipeline.sizing), so the
decision to downscale is taken on the region the call will really upload.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from chunkpose.ops.crops import crop_windows
from chunkpose.ops.depth import CleanUp

#: The ROI around the expected object covers this many crop windows' widths (registration:
#: the guess can be off by about a radius; tracking: the object moves between frames).
REGISTER_ROI_MARGIN = 2.0
TRACK_ROI_MARGIN = 3.0
#: The clean-up every frame gets (FoundationPose's erode + bilateral filter).
CLEANUP = CleanUp()

Box = Tuple[int, int, int, int]


def box_around_point(center_cam, K, diameter: float, crop_ratio: float) -> Box:
    """(x0, y0, x1, y1), unclipped and end-exclusive: the full-frame pixels a "box_3d" crop window
    of ``crop_ratio`` x ``diameter`` centred on the camera point ``center_cam (3,)`` can read.

    chunkpose.ops.crops.crop_windows' own window, so the two never disagree; a centre nearer
    than 1 mm in z is moved to z = 1 mm.

    Args:
        center_cam: (3,) camera-frame point in metres.
        K: (3,3) intrinsics in pixels.
        diameter: object diameter in metres.
        crop_ratio: window side as a multiple of the diameter.

    Returns:
        (x0, y0, x1, y1) ints in full-frame pixels (may lie outside the image).
    """
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, 3] = torch.as_tensor(np.asarray(center_cam, dtype=np.float64))
    pose[2, 3] = max(float(pose[2, 3]), 1e-3)
    return crop_windows(pose[None], np.asarray(K, dtype=np.float64), float(diameter), float(crop_ratio)).roi


def clip_box(box, size) -> Box:
    """``box`` (x0,y0,x1,y1) end-exclusive, clipped to an image of ``size=(H,W)``; never empty.

    Args:
        box: (x0, y0, x1, y1) pixels, end-exclusive.
        size: (H, W) of the image in pixels.

    Returns:
        (x0, y0, x1, y1) ints with at least one pixel inside the image.
    """
    H, W = size
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0 = min(max(x0, 0), W - 1), min(max(y0, 0), H - 1)
    x1, y1 = min(max(x1, x0 + 1), W), min(max(y1, y0 + 1), H)
    return x0, y0, x1, y1


def union_box(a, b) -> Box:
    """The smallest box holding boxes ``a`` and ``b``.

    Args:
        a: (x0, y0, x1, y1) end-exclusive.
        b: (x0, y0, x1, y1) end-exclusive.

    Returns:
        (x0, y0, x1, y1).
    """
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def mask_box(mask: np.ndarray) -> Box:
    """(x0,y0,x1,y1) end-exclusive bounding box of a non-empty mask (H,W).

    Args:
        mask: (H,W) bool numpy array with at least one True pixel.

    Returns:
        (x0, y0, x1, y1) ints in pixels.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def scale_box(box, factor_x: float, factor_y: float) -> Box:
    """A full-frame box in an image resized by (factor_x, factor_y): floor of the start, ceil of
    the end, so the resized box covers the resized pixels of the original.

    Args:
        box: (x0, y0, x1, y1) pixels, end-exclusive.
        factor_x: resize factor of the x axis.
        factor_y: resize factor of the y axis.

    Returns:
        (x0, y0, x1, y1) ints in the resized image's pixels.
    """
    x0, y0, x1, y1 = box
    return (int(np.floor(x0 * factor_x)), int(np.floor(y0 * factor_y)),
            int(np.ceil(x1 * factor_x)), int(np.ceil(y1 * factor_y)))


def halo_box(box, size, halo: int) -> Box:
    """``box`` grown by ``halo`` pixels, clipped to the image of ``size=(H,W)``.

    Args:
        box: (x0, y0, x1, y1) pixels, end-exclusive.
        size: (H, W) of the image in pixels.
        halo: pixels added on every side.

    Returns:
        (x0, y0, x1, y1) ints.
    """
    H, W = size
    x0, y0, x1, y1 = box
    return max(0, x0 - halo), max(0, y0 - halo), min(W, x1 + halo), min(H, y1 + halo)


@dataclass(frozen=True)
class CallRegion:
    """The device region of one register/track call on an image of ``size=(H,W)``.

    Attributes:
        roi: (x0, y0, x1, y1) end-exclusive: the pixels crops read (rgb, mask, depth).
        raw: the ROI plus the clean-up's halo (clipped): the raw depth the clean-up reads.
        size: (H, W) of the image in pixels.
        has_mask: whether the frame carries a mask (registration).
        on_demand: the depth is cleaned at the sampled pixels only (tracking), so the raw window
            stays on the device instead of a cleaned ROI.
    """

    roi: Box
    raw: Box
    size: Tuple[int, int]
    has_mask: bool
    on_demand: bool

    @property
    def roi_pixels(self) -> int:
        return (self.roi[2] - self.roi[0]) * (self.roi[3] - self.roi[1])

    @property
    def raw_pixels(self) -> int:
        return (self.raw[2] - self.raw[0]) * (self.raw[3] - self.raw[1])

    @classmethod
    def of_box(cls, box, size, has_mask: bool, on_demand: bool = False, cleanup: CleanUp = CLEANUP) -> "CallRegion":
        """The region of a given box (clipped to the image of ``size=(H,W)``) and its halo.

        Args:
            box: (x0, y0, x1, y1) pixels, end-exclusive, possibly outside the image.
            size: (H, W) of the image in pixels.
            has_mask: whether the frame carries a mask.
            on_demand: clean the depth at the sampled pixels only (default False).
            cleanup: the CleanUp whose halo the raw window adds (default CLEANUP).

        Returns:
            CallRegion.
        """
        roi = clip_box(box, size)
        return cls(roi=roi, raw=halo_box(roi, size, cleanup.halo), size=tuple(int(v) for v in size),
                   has_mask=bool(has_mask), on_demand=bool(on_demand))

    def frame_bytes(self, masks: Optional[int] = None) -> int:
        """Bytes the prepared ObservedFrame holds: rgb uint8 (3 channels) and bool masks over the ROI,
        float32 depth over the ROI (cleaned) or the raw window (on demand).

        Args:
            masks: number of object masks over the ROI (a region several objects share holds one
                each); None = one when the region has a mask, else none.

        Returns:
            int bytes.
        """
        masks = (1 if self.has_mask else 0) if masks is None else int(masks)
        rgb = 3 * torch.uint8.itemsize * self.roi_pixels
        mask = torch.bool.itemsize * self.roi_pixels * masks
        depth = torch.float32.itemsize * (self.raw_pixels if self.on_demand else self.roi_pixels)
        return rgb + mask + depth


def call_region(mode: str, size, K, diameter: float, crop_ratio: float, center_cam,
                mask: Optional[np.ndarray] = None, mask_bbox: Optional[Box] = None,
                cleanup: CleanUp = CLEANUP) -> CallRegion:
    """The CallRegion of a "register" or "track" call on an image of ``size=(H,W)`` with ``K``.

    Register: around ``center_cam`` and the mask's box (give ``mask`` or its ``mask_bbox``).
    Track: around the last pose's translation ``center_cam``, depth cleaned on demand. The box
    around the point spans REGISTER_ROI_MARGIN / TRACK_ROI_MARGIN crop windows.

    Args:
        mode: "register" or "track".
        size: (H, W) of the image in pixels.
        K: (3,3) intrinsics in pixels.
        diameter: object diameter in metres.
        crop_ratio: the largest crop ratio of the refiner and the scorer.
        center_cam: (3,) camera-frame point in metres (translation guess or last pose).
        mask: (H,W) bool mask (register, unless ``mask_bbox`` is given).
        mask_bbox: (x0, y0, x1, y1) end-exclusive box of the mask, instead of ``mask``.
        cleanup: the CleanUp whose halo the raw window adds (default CLEANUP).

    Returns:
        CallRegion.

    Raises:
        ValueError: an unknown ``mode``, or a register call without ``mask`` or ``mask_bbox``.
    """
    if mode not in ("register", "track"):
        raise ValueError(f"mode: expected 'register' or 'track', got {mode!r}")
    margin = REGISTER_ROI_MARGIN if mode == "register" else TRACK_ROI_MARGIN
    box = box_around_point(center_cam, K, diameter, crop_ratio * margin)
    if mode == "register":
        if mask_bbox is None:
            if mask is None:
                raise ValueError("mask: a registration's region needs the mask (or its mask_bbox)")
            mask_bbox = mask_box(mask)
        box = union_box(box, mask_bbox)
    return CallRegion.of_box(box, size, has_mask=mode == "register", on_demand=mode == "track", cleanup=cleanup)


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def merge_regions(regions: Sequence[CallRegion], cleanup: CleanUp = CLEANUP) -> List[Tuple[CallRegion, List[int]]]:
    """The regions of several objects in one frame, those whose raw windows overlap merged into one
    (the box around their ROIs), so that no pixel is uploaded or cleaned twice.

    A merged region covers the box around its members, so it may hold pixels none of them
    needs (objects side by side diagonally); regions apart stay apart, so objects far from each
    other never make one frame-sized region.

    Args:
        regions: CallRegions of one image (same size, mask and on-demand settings).
        cleanup: the CleanUp whose halo the merged raw windows add (default CLEANUP).

    Returns:
        list of (merged CallRegion, sorted indices of the regions it holds), ordered by their
        first member; a single region comes back as an equal region.
    """
    clusters = [(r.roi, [i]) for i, r in enumerate(regions)]
    size = regions[0].size
    merged = True
    while merged:
        merged = False
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                if _overlap(halo_box(clusters[a][0], size, cleanup.halo), halo_box(clusters[b][0], size, cleanup.halo)):
                    clusters[a] = (union_box(clusters[a][0], clusters[b][0]), clusters[a][1] + clusters[b][1])
                    del clusters[b]
                    merged = True
                    break
            if merged:
                break
    first = regions[0]
    return sorted(((CallRegion.of_box(box, size, first.has_mask, first.on_demand, cleanup), sorted(members))
                   for box, members in clusters), key=lambda cluster: cluster[1][0])
