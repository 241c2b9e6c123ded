"""Debug files upstream users rely on to check scale and alignment.

- scene_raw.ply: the observed point cloud of a frame (camera frame, metres, with colours).
- model_tf.obj: the mesh moved by the estimated pose into the camera frame; opened next to
  scene_raw.ply in any viewer it shows at once whether pose and scale are right.
- crop grids: the best hypotheses' crops as one picture (see chunkpose.vis.crop_grid).

Written with trimesh (PLY point clouds, OBJ meshes), which every viewer reads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from chunkpose.ops.geometry import MIN_DEPTH


def depth_to_points(depth, K, rgb=None, mask=None, stride: int = 1):
    """Back-project depth (H,W) metres with K (3,3) -> points (N,3) float32 and colours (N,3) uint8.

    Pixels with depth < MIN_DEPTH are dropped; with ``mask`` only masked pixels are kept.

    Args:
        depth: (H,W) depth in metres.
        K: (3,3) intrinsics in pixels.
        rgb: optional (H,W,3) uint8 colours; None = grey 200.
        mask: optional (H,W) bool.
        stride: keep every stride-th row and column (to keep big frames small; default 1).

    Returns:
        (points, colours): (N,3) float32 camera-frame metres and (N,3) uint8.
    """
    depth = np.asarray(depth, dtype=np.float32)
    K = np.asarray(K, dtype=np.float64)
    H, W = depth.shape
    v, u = np.mgrid[0:H:stride, 0:W:stride]
    z = depth[::stride, ::stride]
    keep = z >= MIN_DEPTH
    if mask is not None:
        keep &= np.asarray(mask, bool)[::stride, ::stride]
    u, v, z = u[keep].astype(np.float64), v[keep].astype(np.float64), z[keep].astype(np.float64)
    x = (u - K[0, 2]) * z / K[0, 0]
    y = (v - K[1, 2]) * z / K[1, 1]
    points = np.stack([x, y, z], axis=1).astype(np.float32)
    if rgb is None:
        colours = np.full((len(points), 3), 200, np.uint8)
    else:
        colours = np.asarray(rgb, np.uint8)[::stride, ::stride][keep]
    return points, colours


def write_ply(path, points, colours=None) -> Path:
    """PLY of points (N,3) with optional colours (N,3) uint8 (trimesh's writer).

    Args:
        path: the file to write.
        points: (N,3) points (metres).
        colours: optional (N,3) uint8.

    Returns:
        Path of the file.
    """
    import trimesh

    cloud = trimesh.PointCloud(np.asarray(points, dtype=np.float64).reshape(-1, 3),
                               colors=None if colours is None else np.asarray(colours, np.uint8).reshape(-1, 3))
    cloud.export(str(path))
    return Path(path)


def write_scene_raw(path, depth, K, rgb=None, mask=None, stride: int = 1) -> Path:
    """scene_raw.ply: the observed cloud of a frame (camera frame, metres).

    Args:
        path: the file to write.
        depth: (H,W) depth in metres.
        K: (3,3) intrinsics in pixels.
        rgb: optional (H,W,3) uint8 colours.
        mask: optional (H,W) bool; only masked pixels are written.
        stride: keep every stride-th row and column (default 1).

    Returns:
        Path of the file.
    """
    points, colours = depth_to_points(depth, K, rgb, mask, stride)
    return write_ply(path, points, colours)


def write_mesh_at_pose(path, mesh, pose) -> Path:
    """model_tf.obj: a chunkpose Mesh moved by pose (4,4) into the camera frame (trimesh's OBJ
    writer).

    Args:
        path: the file to write.
        mesh: a chunkpose Mesh, or anything with vertices (V,3), faces (F,3) and optionally
            vertex_colors (V,3) in 0..1.
        pose: (4,4) object-in-camera pose, metres.

    Returns:
        Path of the file.
    """
    import trimesh

    pose = np.asarray(pose, dtype=np.float64)
    colours = getattr(mesh, "vertex_colors", None)
    posed = trimesh.Trimesh(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64), process=False,
                            vertex_colors=None if colours is None else
                            (np.clip(np.asarray(colours, np.float64), 0, 1) * 255).round().astype(np.uint8))
    posed.apply_transform(pose)
    posed.export(str(path), file_type="obj", include_color=colours is not None, include_normals=False)
    return Path(path)


def write_crop_grid(path, crops, labels=None, columns: int = 8) -> Path:
    """A picture of crops (B,C,h,w) (or a list of batches shown side by side).

    Args:
        path: the image file to write (PNG, JPEG...).
        crops: (B,C,h,w) tensor/array, or a list of such batches (see chunkpose.vis.crop_grid).
        labels: optional B short strings written in the tiles.
        columns: tiles per row (default 8).

    Returns:
        Path of the file.

    Raises:
        ValueError: ``crops`` is empty.
        OSError: the picture cannot be written.
    """
    from chunkpose.vis import crop_grid, save_rgb

    save_rgb(path, crop_grid(crops, labels=labels, columns=columns))
    return Path(path)


__all__ = ["depth_to_points", "write_crop_grid", "write_mesh_at_pose", "write_ply", "write_scene_raw"]
