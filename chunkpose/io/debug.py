"""Debug files upstream users rely on to check scale and alignment.

- scene_raw.ply: the observed point cloud of a frame (camera frame, metres, with colours).
- model_tf.obj: the mesh moved by the estimated pose into the camera frame; opened next to
  scene_raw.ply in any viewer it shows at once whether pose and scale are right.
- crop grids: the best hypotheses' crops as one picture (see chunkpose.vis.crop_grid).

Plain numpy writers (binary little-endian PLY, text OBJ) so no viewer library is needed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def depth_to_points(depth, K, rgb=None, mask=None, stride: int = 1):
    """Back-project depth (H,W) metres with K (3,3) -> points (N,3) float32 and colours (N,3) uint8.

    Pixels with depth < 0.001 are dropped; with ``mask`` (H,W) bool only masked pixels are
    kept. ``stride`` keeps every stride-th row and column (to keep big frames small).
    """
    depth = np.asarray(depth, dtype=np.float32)
    K = np.asarray(K, dtype=np.float64)
    H, W = depth.shape
    v, u = np.mgrid[0:H:stride, 0:W:stride]
    z = depth[::stride, ::stride]
    keep = z >= 0.001
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
    """Binary PLY of points (N,3) with optional colours (N,3) uint8."""
    path = Path(path)
    points = np.asarray(points, dtype="<f4").reshape(-1, 3)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colours is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    data = np.empty(len(points), dtype=fields)
    data["x"], data["y"], data["z"] = points[:, 0], points[:, 1], points[:, 2]
    if colours is not None:
        colours = np.asarray(colours, np.uint8).reshape(-1, 3)
        data["red"], data["green"], data["blue"] = colours[:, 0], colours[:, 1], colours[:, 2]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(points)}",
              "property float x", "property float y", "property float z"]
    if colours is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(data.tobytes())
    return path


def read_ply_points(path) -> np.ndarray:
    """Points (N,3) of a PLY written by :func:`write_ply` (for tests and quick checks)."""
    raw = Path(path).read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    n = next(int(line.split()[-1]) for line in header if line.startswith("element vertex"))
    has_colour = any("red" in line for line in header)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")] + ([("r", "u1"), ("g", "u1"), ("b", "u1")] if has_colour else [])
    data = np.frombuffer(raw[end:], dtype=fields, count=n)
    return np.stack([data["x"], data["y"], data["z"]], axis=1)


def write_scene_raw(path, depth, K, rgb=None, mask=None, stride: int = 1) -> Path:
    """scene_raw.ply: the observed cloud of a frame (camera frame, metres)."""
    points, colours = depth_to_points(depth, K, rgb, mask, stride)
    return write_ply(path, points, colours)


def write_posed_obj(path, vertices, faces, pose, vertex_colors=None) -> Path:
    """model_tf.obj: vertices (V,3) moved by pose (4,4); faces (F,3) 0-based; colours (V,3) 0..1."""
    path = Path(path)
    pose = np.asarray(pose, dtype=np.float64)
    verts = np.asarray(vertices, np.float64) @ pose[:3, :3].T + pose[:3, 3]
    faces = np.asarray(faces, np.int64).reshape(-1, 3) + 1  # OBJ indices start at 1
    if vertex_colors is not None:
        colours = np.clip(np.asarray(vertex_colors, np.float64).reshape(-1, 3), 0, 1)
        vlines = np.hstack([verts, colours])
        vfmt = "v %.6f %.6f %.6f %.4f %.4f %.4f"
    else:
        vlines = verts
        vfmt = "v %.6f %.6f %.6f"
    with open(path, "w") as f:
        f.write("# chunkpose: mesh in the camera frame (metres) at the estimated pose\n")
        np.savetxt(f, vlines, fmt=vfmt)
        np.savetxt(f, faces, fmt="f %d %d %d")
    return path


def write_mesh_at_pose(path, mesh, pose) -> Path:
    """model_tf.obj for a chunkpose Mesh (or anything with vertices/faces[/vertex_colors])."""
    colours = getattr(mesh, "vertex_colors", None)
    return write_posed_obj(path, mesh.vertices, mesh.faces, pose, colours)


def write_crop_grid(path, crops, labels=None, columns: int = 8) -> Path:
    """A picture of crops (B,C,h,w) (or a list of batches shown side by side)."""
    from chunkpose.vis import crop_grid, save_rgb

    save_rgb(path, crop_grid(crops, labels=labels, columns=columns))
    return Path(path)


__all__ = [
    "depth_to_points", "read_ply_points", "write_crop_grid", "write_mesh_at_pose", "write_ply",
    "write_posed_obj", "write_scene_raw",
]
