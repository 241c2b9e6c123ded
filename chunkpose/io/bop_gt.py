"""Ground-truth visibility as BOP defines it (bop_toolkit's calc_gt_info / calc_gt_masks),
shared by the BOP writer (scene_gt_info.json) and the BOP evaluation (VSD).

Facts from bop_toolkit, in our own code:

- Depth maps are compared as *distance* images (distance from the camera centre, not z):
  dist = z * sqrt(1 + ((u - cx)/fx)^2 + ((v - cy)/fy)^2) at pixel (u, v).
- BOP19 visibility of a model rendered at a pose: a pixel of its silhouette is visible
  where the rendered distance is at most ``delta`` behind the test distance, or where the
  test depth is missing (0). delta = 15 mm (5 mm for ITODD).
- calc_gt_info renders the model on a canvas three times the image size (centred on the
  image) so that truncated objects count whole: px_count_all is the silhouette's size on
  that canvas, px_count_valid the in-image silhouette pixels with a test depth,
  px_count_visib the visible pixels, visib_fract = px_count_visib / px_count_all (0 when
  the silhouette is empty), bbox_obj the canvas silhouette's box and bbox_visib the
  visible pixels' box, both [x, y, w, h] with w = x_max - x_min (calc_2d_bbox), not clipped,
  and [-1, -1, -1, -1] when no pixel is visible.

Depths here are millimetres (float) unless a name says metres.
"""
from __future__ import annotations

import numpy as np

VISIB_DELTA_MM = 15.0
# BOP's calc_gt_info canvas: the image plus one image size on every side.
CANVAS_FACTOR = 3


def distance_image(depth, K) -> np.ndarray:
    """(H, W) distance from the camera centre of each pixel's 3D point (0 stays 0).

    Args:
        depth: (H, W) camera z (any unit; the result is in the same unit).
        K: (3, 3) intrinsics of the image in pixels (pixel centres at integer coordinates).

    Returns:
        (H, W) float64 distances in the depth's unit.
    """
    depth = np.asarray(depth, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    height, width = depth.shape
    xs = (np.arange(width) - K[0, 2]) / K[0, 0]
    ys = (np.arange(height) - K[1, 2]) / K[1, 1]
    scale = np.sqrt(1.0 + xs[None, :] ** 2 + ys[:, None] ** 2)
    return depth * scale


def visible_mask(dist_test, dist_model, delta: float = VISIB_DELTA_MM) -> np.ndarray:
    """BOP19 visibility: silhouette pixels (dist_model > 0) whose model distance is at most
    ``delta`` behind the test distance, or whose test depth is missing.

    Differences are taken in float32 like bop_toolkit, so a pixel exactly at ``delta`` decides
    the same way.

    Args:
        dist_test: (H, W) distance image of the test depth (mm; 0 = missing).
        dist_model: (H, W) distance image of the rendered model (mm; 0 = background).
        delta: tolerance in mm (default VISIB_DELTA_MM = 15).

    Returns:
        (H, W) bool.
    """
    diff = np.asarray(dist_model, np.float32) - np.asarray(dist_test, np.float32)
    return ((diff <= delta) | (np.asarray(dist_test) == 0)) & (np.asarray(dist_model) > 0)


def bop_bbox(mask, offset=(0, 0)) -> list[int]:
    """[x, y, w, h] of a mask's pixels with w = x_max - x_min (bop_toolkit's calc_2d_bbox).

    Args:
        mask: (h, w) bool array.
        offset: (x0, y0) image coordinates of the mask's pixel (0, 0) (default (0, 0)).

    Returns:
        list of 4 ints in image pixels; [-1, -1, -1, -1] when empty.
    """
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        return [-1, -1, -1, -1]
    xs = xs + int(offset[0])
    ys = ys + int(offset[1])
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]


def canvas_box(vertices_m, pose, K, width: int, height: int, factor: int = CANVAS_FACTOR):
    """(x0, y0, w, h): the canvas (image coordinates of its top-left pixel, its size) that holds
    the whole silhouette of ``vertices_m`` (V,3) at ``pose`` (4,4), clipped to BOP's ``factor``
    x image canvas.

    It is the image grown to the vertices' projected box, so an object inside the image costs
    no more than the image; a vertex behind the camera gives the whole BOP canvas.

    Args:
        vertices_m: (V,3) model vertices in metres.
        pose: (4,4) model-in-camera pose, metres.
        K: (3,3) intrinsics of the image in pixels.
        width: image width in pixels.
        height: image height in pixels.
        factor: BOP's canvas size in image sizes (default CANVAS_FACTOR = 3).

    Returns:
        (x0, y0, w, h) ints in pixels, x0, y0 <= 0.
    """
    pose = np.asarray(pose, np.float64)
    K = np.asarray(K, np.float64)
    margin_x, margin_y = (factor - 1) // 2 * width, (factor - 1) // 2 * height
    lo_x, lo_y, hi_x, hi_y = -margin_x, -margin_y, width + margin_x, height + margin_y
    cam = np.asarray(vertices_m, np.float64) @ pose[:3, :3].T + pose[:3, 3]
    if len(cam) and (cam[:, 2] > 1e-6).all():
        u = K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2]
        v = K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]
        # a pixel is drawn when its centre (an integer) is inside a triangle: 1 px slack
        x0 = max(lo_x, min(0, int(np.floor(u.min())) - 1))
        y0 = max(lo_y, min(0, int(np.floor(v.min())) - 1))
        x1 = min(hi_x, max(width, int(np.ceil(u.max())) + 2))
        y1 = min(hi_y, max(height, int(np.ceil(v.max())) + 2))
    else:
        x0, y0, x1, y1 = lo_x, lo_y, hi_x, hi_y
    return x0, y0, x1 - x0, y1 - y0


def render_model_depth_mm(renderer, vertices_m, pose, K, width: int, height: int):
    """The model's depth (mm) on the canvas of canvas_box and the canvas offset (x0, y0).

    Args:
        renderer: a chunkpose renderer of the model (render_full(pose, K, w, h) -> dict with
            "depth" (1,h,w) metres).
        vertices_m: (V,3) model vertices in metres (for canvas_box).
        pose: (4,4) model-in-camera pose, metres.
        K: (3,3) intrinsics of the width x height image.
        width: image width in pixels.
        height: image height in pixels.

    Returns:
        (depth_mm, (x0, y0)): (h, w) float64 depth in millimetres (0 = background) and the
        canvas's top-left pixel in image coordinates.
    """
    x0, y0, cw, ch = canvas_box(vertices_m, pose, K, width, height)
    return render_box_depth_mm(renderer, pose, K, (x0, y0, cw, ch)), (x0, y0)


#: bop_toolkit's renderers put the centre of pixel i at u = i + 0.5 (their projection maps u
#: to ndc 2u/w - 1), chunkpose's at u = i (OpenCV's convention, the pipeline's): the BOP
#: renders here shift K by this much so that silhouettes fall on the toolkit's pixels. The
#: distance images (distance_image) keep u = i, as the toolkit's depth_im_to_dist_im does.
BOP_TOOLKIT_PIXEL_SHIFT = 0.5


def render_box_depth_mm(renderer, pose, K, box) -> np.ndarray:
    """The model's depth (mm, 0 = background) in the image box (x0, y0, w, h), rendered on
    bop_toolkit's pixel grid (BOP_TOOLKIT_PIXEL_SHIFT).

    Args:
        renderer: a chunkpose renderer of the model (render_full(pose, K, w, h)).
        pose: (4,4) model-in-camera pose, metres.
        K: (3,3) intrinsics of the full image.
        box: (x0, y0, w, h) pixels, w and h > 0.

    Returns:
        (h, w) float64 depth in millimetres.
    """
    x0, y0, w, h = box
    K_box = np.array(K, np.float64, copy=True)
    K_box[0, 2] -= x0 + BOP_TOOLKIT_PIXEL_SHIFT
    K_box[1, 2] -= y0 + BOP_TOOLKIT_PIXEL_SHIFT
    depth = renderer.render_full(np.asarray(pose, np.float64), K_box, w, h)["depth"][0]
    depth = depth.detach().cpu().numpy() if hasattr(depth, "detach") else np.asarray(depth)
    return depth.astype(np.float64) * 1000.0


def gt_info(depth_test_mm, K, model_depth_mm, offset=(0, 0), delta: float = VISIB_DELTA_MM):
    """scene_gt_info.json fields of one ground-truth instance, as calc_gt_info computes them.

    Args:
        depth_test_mm: (H, W) the test image's depth in mm (0 = missing), as bop_toolkit
            reads it (raw * depth_scale).
        K: (3, 3) intrinsics of the image in pixels.
        model_depth_mm: (h, w) the model rendered at the ground-truth pose on a canvas that
            contains the image (0 = background), mm.
        offset: (x0, y0) image coordinates of the canvas's pixel (0, 0) (x0, y0 <= 0).
        delta: visibility tolerance in mm (default VISIB_DELTA_MM = 15).

    Returns:
        (info, visib, silhouette): info the dict of px_count_all, px_count_valid,
        px_count_visib, visib_fract, bbox_obj, bbox_visib; visib (H, W) bool the visible
        mask (what calc_gt_masks writes to mask_visib/); silhouette (H, W) bool the in-image
        silhouette (mask/).

    Raises:
        ValueError: the canvas at ``offset`` does not contain the image.
    """
    depth_test_mm = np.asarray(depth_test_mm, dtype=np.float64)
    height, width = depth_test_mm.shape
    x0, y0 = int(offset[0]), int(offset[1])
    model_depth_mm = np.asarray(model_depth_mm, dtype=np.float64)
    if x0 > 0 or y0 > 0 or model_depth_mm.shape[0] < height - y0 or model_depth_mm.shape[1] < width - x0:
        raise ValueError(f"model_depth_mm: a {model_depth_mm.shape} canvas at offset {offset} does not contain "
                         f"the {height}x{width} image")
    in_image = model_depth_mm[-y0:-y0 + height, -x0:-x0 + width]
    dist_model = distance_image(in_image, K)
    dist_test = distance_image(depth_test_mm, K)
    visib = visible_mask(dist_test, dist_model, delta)
    silhouette = dist_model > 0
    px_count_all = int((model_depth_mm > 0).sum())
    px_count_visib = int(visib.sum())
    info = {
        "px_count_all": px_count_all,
        "px_count_valid": int((dist_test[silhouette] > 0).sum()),
        "px_count_visib": px_count_visib,
        "visib_fract": float(px_count_visib / px_count_all) if px_count_all > 0 else 0.0,
        "bbox_obj": bop_bbox(model_depth_mm > 0, (x0, y0)) if px_count_visib > 0 else [-1, -1, -1, -1],
        "bbox_visib": bop_bbox(visib) if px_count_visib > 0 else [-1, -1, -1, -1],
    }
    return info, visib, silhouette


__all__ = ["CANVAS_FACTOR", "VISIB_DELTA_MM", "bop_bbox", "canvas_box", "distance_image", "gt_info",
           "render_box_depth_mm", "render_model_depth_mm", "visible_mask"]
