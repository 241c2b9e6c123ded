"""Images of a synthetic scene: z-buffer compositing of full-frame renders, shading, the
depth sensor model and RGB noise, and the per-frame ground truth (visible masks, full
silhouettes) of every object.

Full-resolution renders are large (about 40 bytes per pixel), so each one is folded into a
running composite and dropped before the next is made.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation, maximum_filter, minimum_filter

LIGHT = np.array([0.35, -0.55, 1.0]) / np.linalg.norm([0.35, -0.55, 1.0])  # camera frame
# Depth sensor model (metres): sigma(z) = a + b z^2, quantised to 1 mm.
DEPTH_NOISE_A = 0.0005
DEPTH_NOISE_B = 0.0015
RGB_NOISE_SIGMA = 2.0  # in 0..255 units
# Layer id of occluders in a frame's composite (objects are 0 .. n-1; -1 = nothing).
OCCLUDER_ID = 1_000


def _shade(normals: np.ndarray) -> np.ndarray:
    """Lambertian shading with a fixed light near the camera (both normal orientations)."""
    cosine = np.abs(np.tensordot(LIGHT, normals, axes=(0, 0)))
    return 0.35 + 0.65 * cosine


class Canvas:
    """A z-buffer of full-frame renders.

    Args:
        width: image width W in pixels.
        height: image height H in pixels.

    Attributes:
        rgb: (H,W,3) float32 shaded colour in 0..1.
        depth: (H,W) float32 metres, inf where empty until ``finish``.
        ids: (H,W) int32 layer id (-1 = empty).
    """

    def __init__(self, width: int, height: int):
        self.depth = np.full((height, width), np.inf, dtype=np.float32)
        self.rgb = np.zeros((height, width, 3), dtype=np.float32)
        self.ids = np.full((height, width), -1, dtype=np.int32)

    def add(self, index: int, out: dict) -> dict:
        """Fold one render (a renderer's render_full dict) in; a pixel is taken where it is strictly
        nearer.

        Args:
            index: the layer id written to ``ids``.
            out: a render_full dict (rgb (1,3,H,W), depth (1,H,W) metres, normals (1,3,H,W),
                mask (1,H,W), ...).

        Returns:
            The render as numpy arrays without the batch axis.
        """
        out = {key: value[0].cpu().numpy() for key, value in out.items()}
        d = out["depth"]
        hit = out["mask"] & (d < self.depth)
        self.depth[hit] = d[hit]
        shade = _shade(out["normals"])
        colour = out["rgb"]
        for c in range(3):
            self.rgb[..., c][hit] = colour[c][hit] * shade[hit]
        self.ids[hit] = index
        return out

    def finish(self):
        """(rgb, depth with 0 where empty, ids).

        Returns:
            (rgb (H,W,3) float32 0..1, depth (H,W) float32 metres, ids (H,W) int32); the canvas's
            own arrays.
        """
        self.depth[~np.isfinite(self.depth)] = 0.0
        return self.rgb, self.depth, self.ids


def composite(layers, width, height):
    """Z-buffer composite of ``layers`` [(id, render dict)].

    Args:
        layers: iterable of (layer id, render_full dict).
        width: image width W in pixels.
        height: image height H in pixels.

    Returns:
        (rgb (H,W,3) float32 0..1, depth (H,W) float32 metres with 0 = empty, ids (H,W) int32).
    """
    canvas = Canvas(width, height)
    for index, out in layers:
        canvas.add(index, out)
    return canvas.finish()


def sensor_depth(depth: np.ndarray, rng, scale: int = 1) -> np.ndarray:
    """Depth sensor model on a noise-free depth (H,W) in metres.

    Gaussian noise with sigma = 0.5 mm + 1.5 mm * z^2, 1 mm quantisation, most pixels at depth
    edges missing (the band is ``scale`` pixels wide), and a few random dropouts.

    Args:
        depth: (H,W) float metres, 0 = empty.
        rng: numpy Generator the noise is drawn from.
        scale: width in pixels of the missing band at edges (default 1).

    Returns:
        (H,W) float32 metres, 0 = missing.
    """
    valid = depth > 0
    noisy = depth + rng.normal(size=depth.shape).astype(np.float32) * (DEPTH_NOISE_A + DEPTH_NOISE_B * depth**2)
    noisy = np.round(noisy * 1000.0) / 1000.0
    filled = np.where(valid, depth, 0.0)
    spread = maximum_filter(filled, size=3) - minimum_filter(np.where(valid, depth, np.inf), size=3)
    # jumps between neighbours (occlusion boundaries) and the border of the valid region
    edges = (spread > np.maximum(0.01, 0.02 * depth)) | (valid & binary_dilation(~valid, iterations=1))
    if scale > 1:
        edges = binary_dilation(edges, iterations=scale - 1)
    drop = (edges & (rng.uniform(size=depth.shape) < 0.8)) | (rng.uniform(size=depth.shape) < 0.002)
    noisy[drop | ~valid] = 0.0
    return noisy.astype(np.float32)


@dataclass
class RenderedFrame:
    """One frame of a synthetic scene.

    Attributes:
        rgb: (H,W,3) uint8.
        depth: (H,W) float32 metres (sensor model, 0 = missing).
        depth_clean: (H,W) float32 noise-free depth in metres.
        masks: per object (H,W) bool visible mask.
        full_masks: per object (H,W) bool full silhouette.
    """

    rgb: np.ndarray
    depth: np.ndarray
    depth_clean: np.ndarray
    masks: list
    full_masks: list


def _draw_dynamic(index: int, objects: list, behind_board: list, K, width, height, make_renderer) -> tuple:
    """The objects (and the occluders of those hidden behind one) at frame ``index``:
    (canvas, full silhouettes per object)."""
    from .events import occluder_patch

    canvas = Canvas(width, height)
    full_masks, nearest = [], []
    for obj, (renderer, poses) in enumerate(objects):
        out = canvas.add(obj, renderer.render_full(poses[index], K, width, height))
        full_masks.append(out["mask"])
        nearest.append(float(out["depth"][out["mask"]].min()) if out["mask"].any() else None)
        del out
    for obj, texture in behind_board:
        board = occluder_patch(full_masks[obj], nearest[obj], K, texture) if nearest[obj] is not None else None
        if board is not None:
            canvas.add(OCCLUDER_ID + obj, make_renderer(board).render_full(np.eye(4), K, width, height))
    return canvas, full_masks


def render_frame(index: int, objects: list, behind_board: list, static, K, width, height, noise: bool, rng,
                 make_renderer) -> RenderedFrame:
    """Frame ``index`` of the scene over the static layers ``static`` = (rgb, depth) of the plane
    and distractors.

    Noise is drawn from ``rng``: RGB first, then depth.

    Args:
        index: the frame number.
        objects: [(renderer, poses [(4,4)] per frame)] in layer order.
        behind_board: [(object index, occluder texture)] of the objects hidden behind a board
            in this frame.
        static: (rgb (H,W,3) float 0..1, depth (H,W) metres, 0 = empty) of the static layers.
        K: (3,3) intrinsics in pixels.
        width: image width W in pixels.
        height: image height H in pixels.
        noise: add RGB noise and the depth sensor model.
        rng: numpy Generator.
        make_renderer: Mesh -> renderer (for the occluders).

    Returns:
        RenderedFrame.
    """
    static_rgb, static_depth = static
    canvas, full_masks = _draw_dynamic(index, objects, behind_board, K, width, height, make_renderer)
    dyn_rgb, dyn_depth, ids = canvas.finish()
    in_front = (ids >= 0) & ((static_depth == 0) | (dyn_depth < static_depth))
    rgb = np.where(in_front[..., None], dyn_rgb, static_rgb)
    depth = np.where(in_front, dyn_depth, static_depth).astype(np.float32)
    if noise:
        rgb = rgb * 255.0 + rng.normal(scale=RGB_NOISE_SIGMA, size=rgb.shape)
        measured = sensor_depth(depth, rng, max(1, round(width / 1280)))
    else:
        rgb = rgb * 255.0
        measured = depth.copy()
    masks = [in_front & (ids == obj) for obj in range(len(objects))]
    return RenderedFrame(np.clip(np.round(rgb), 0, 255).astype(np.uint8), measured, depth, masks, full_masks)
