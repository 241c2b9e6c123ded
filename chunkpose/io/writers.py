"""Scene writers: the YCBInEOAT folder layout, and what every scene writer shares.

Everything is written into a temporary folder next to the destination and moved into
place at the end, so an interrupted or failed write never leaves a half-written scene.

YCBInEOAT: rgb/*.png, depth/*.png (uint16 millimetres), masks/*.png (0/255),
cam_K.txt (3x3), annotated_poses/*.txt (4x4 object-in-camera, metres). With several
objects: masks/<name>/*.png and annotated_poses/<name>/*.txt per object, optionally
labels/*.png (0 background, object k at value k) with labels.json ({name: k}); the
objects' meshes go to mesh/<name>.obj (metres, with colours), as FoundationPose's demo
data keeps them.
BOP: see chunkpose.io.bop_writer.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from chunkpose.errors import InputError
from chunkpose.io.folders import staged_folder

UINT16_MAX = 65535
# Object names become folder and file names (masks/<name>/, mesh/<name>.obj).
_OBJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@contextmanager
def atomic_folder(path, overwrite: bool = False):
    """Yield a temporary folder that becomes ``path`` when the block finishes without error.

    An existing non-empty ``path`` is an error unless overwrite=True (then it is replaced).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"path: {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(f"path: {path} exists and is not empty; pass overwrite=True or choose another folder")
    with staged_folder(path) as tmp:
        yield tmp


def _imwrite(path: Path, image: np.ndarray) -> None:
    import cv2

    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def _check_frames(rgb, depth, masks, poses):
    n = len(rgb)
    if n == 0:
        raise ValueError("rgb: expected at least one frame")
    if len(depth) != n:
        raise ValueError(f"depth: expected {n} frames like rgb, got {len(depth)}")
    if masks is not None and len(masks) not in (n, 1):
        raise ValueError(f"masks: expected {n} frames (or only the first), got {len(masks)}")
    if poses is not None and len(poses) != n:
        raise ValueError(f"poses: expected {n} poses, got {len(poses)}")
    height, width = np.asarray(rgb[0]).shape[:2]
    for i in range(n):
        image = np.asarray(rgb[i])
        if image.shape != (height, width, 3) or image.dtype != np.uint8:
            raise ValueError(f"rgb[{i}]: expected uint8 ({height},{width},3), got {image.dtype} {image.shape}")
        d = np.asarray(depth[i])
        if d.shape != (height, width):
            raise ValueError(f"depth[{i}]: expected ({height},{width}), got {d.shape}")
        if not np.isfinite(d).all():
            raise ValueError(f"depth[{i}]: contains NaN or infinity (use 0 for missing depth)")
    return height, width


def _depth_units(depth: np.ndarray, units_per_metre: float, name: str) -> np.ndarray:
    depth = np.asarray(depth, dtype=np.float64)
    if depth.max(initial=0.0) > 100.0:
        raise ValueError(f"{name}: values up to {depth.max():.0f}; expected metres (did you pass millimetres?)")
    raw = np.round(np.clip(depth, 0.0, None) * units_per_metre)
    if raw.max(initial=0.0) > UINT16_MAX:
        raise ValueError(f"{name}: {depth.max():.2f} m does not fit 16-bit units of {1000.0 / units_per_metre:g} mm")
    return raw.astype(np.uint16)


def _mask_image(mask) -> np.ndarray:
    return np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8)


def _check_object_name(name, what: str) -> str:
    if not isinstance(name, str) or not _OBJECT_NAME.fullmatch(name):
        raise ValueError(f"{what}: object name {name!r} cannot be a folder name; use up to 64 letters, digits, "
                         "'_', '-' or '.', starting with a letter or digit")
    return name


def _per_object(value, what: str, n: int, height: int, width: int, masks: bool) -> dict:
    """{name: per-frame list} checked: masks for all frames (or only the first) of shape
    (H,W), poses (4,4) for every frame."""
    out = {}
    for name, frames in value.items():
        _check_object_name(name, what)
        frames = list(frames)
        if masks and len(frames) not in (n, 1) or not masks and len(frames) != n:
            raise ValueError(f"{what}[{name!r}]: expected {n} frames" + (" (or only the first)" if masks else "")
                             + f", got {len(frames)}")
        for i, item in enumerate(frames):
            shape = (height, width) if masks else (4, 4)
            if np.shape(item) != shape:
                raise ValueError(f"{what}[{name!r}][{i}]: expected shape {shape}, got {np.shape(item)}")
        out[name] = frames
    return out


def label_image(masks: dict, index: int, height: int, width: int) -> np.ndarray:
    """(H,W) label image of frame ``index`` from {name: masks}: 0 background, the k-th
    object (1-based, in dict order) at value k; uint8, uint16 past 255 objects.
    ValueError when two objects' masks overlap (a pixel holds one label)."""
    labels = np.zeros((height, width), np.uint8 if len(masks) < 256 else np.uint16)
    for value, (name, frames) in enumerate(masks.items(), start=1):
        mask = np.asarray(frames[index], dtype=bool)
        clash = mask & (labels > 0)
        if clash.any():
            other = list(masks)[int(labels[clash][0]) - 1]
            raise ValueError(f"labels: the masks of {other!r} and {name!r} overlap in frame {index}; a label image "
                             "holds one object per pixel (pass labels=False)")
        labels[mask] = value
    return labels


def export_scene_mesh(mesh, folder: Path, name: str) -> Path:
    """Write ``mesh`` (a chunkpose Mesh or a trimesh, metres) as ``folder/<name>.obj`` in
    metres: vertex colours in the OBJ's vertex lines, or for a textured mesh
    ``<name>.mtl`` and ``<name>.png`` next to it. Returns the OBJ's path."""
    import trimesh
    from trimesh.exchange.obj import export_obj

    from chunkpose.io.mesh import Mesh, load_mesh

    mesh = mesh if isinstance(mesh, Mesh) else load_mesh(mesh)
    if mesh.trimesh is not None:
        source = mesh.trimesh.copy()
    else:
        source = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    if isinstance(source.visual, trimesh.visual.TextureVisuals) and mesh.has_texture:
        source.visual.material.name = name  # names the .png: one per object, no clashes
    else:  # what the renderers draw: per-vertex colours (face colours have no OBJ form)
        colors = (np.clip(mesh.vertex_colors, 0, 1) * 255).round().astype(np.uint8)
        source.visual = trimesh.visual.ColorVisuals(source, vertex_colors=colors)
    text, files = export_obj(source, return_texture=True, mtl_name=f"{name}.mtl")
    path = folder / f"{name}.obj"
    path.write_text(text)
    for file_name, data in files.items():
        (folder / file_name).write_bytes(data)
    return path


def write_ycbineoat(path, rgb, depth, K, masks=None, poses=None, names=None, overwrite: bool = False, *,
                    meshes=None, labels: bool = False) -> Path:
    """Write a YCBInEOAT-style scene folder.

    Args:
        rgb: list of (H,W,3) uint8; depth: list of (H,W) float metres (0 = missing), stored
            as uint16 millimetres; K (3,3).
        masks: one object: a list of (H,W) bool (all frames or just the first), written to
            masks/<frame>.png; several: {object name: list}, written to
            masks/<name>/<frame>.png.
        poses: one object: a list of (4,4) object-in-camera in metres
            (annotated_poses/<frame>.txt); several: {object name: list}
            (annotated_poses/<name>/<frame>.txt).
        names: file stems (default 000000...).
        meshes: {object name: Mesh or trimesh in metres} written to mesh/<name>.obj (see
            export_scene_mesh).
        labels: with masks per object (a dict, all frames): also write labels/<frame>.png
            (see label_image) and labels.json {name: value}.
    Returns:
        The folder.
    """
    K, masks, poses, (height, width) = _check_ycbineoat(rgb, depth, K, masks, poses, labels)
    meshes = {_check_object_name(name, "meshes"): mesh for name, mesh in (meshes or {}).items()}
    names = list(names) if names is not None else [f"{i:06d}" for i in range(len(rgb))]
    with atomic_folder(path, overwrite) as tmp:
        np.savetxt(tmp / "cam_K.txt", K, fmt="%.10g")
        _write_images(tmp, rgb, depth, names)
        if masks is not None:
            _write_masks(tmp / "masks", masks, names)
        if poses is not None:
            _write_poses(tmp / "annotated_poses", poses, names)
        if labels:
            _write_labels(tmp, masks, names, height, width)
        if meshes:
            (tmp / "mesh").mkdir()
            for obj, mesh in meshes.items():
                export_scene_mesh(mesh, tmp / "mesh", obj)
    return Path(path)


def _check_ycbineoat(rgb, depth, K, masks, poses, labels):
    """(K, masks, poses, (height, width)) checked; masks and poses given per object come
    back as {name: list}."""
    height, width = _check_frames(rgb, depth, None if isinstance(masks, dict) else masks,
                                  None if isinstance(poses, dict) else poses)
    n = len(rgb)
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"K: expected (3,3), got {K.shape}")
    if isinstance(masks, dict):
        masks = _per_object(masks, "masks", n, height, width, masks=True)
    if isinstance(poses, dict):
        poses = _per_object(poses, "poses", n, height, width, masks=False)
    if labels and not (isinstance(masks, dict) and all(len(m) == n for m in masks.values())):
        raise ValueError("labels: needs masks per object ({name: masks}) for every frame")
    return K, masks, poses, (height, width)


def _write_images(folder: Path, rgb, depth, names: list) -> None:
    """rgb/<frame>.png and depth/<frame>.png (uint16 millimetres)."""
    for sub in ("rgb", "depth"):
        (folder / sub).mkdir()
    for i, name in enumerate(names):
        _imwrite(folder / "rgb" / f"{name}.png", np.asarray(rgb[i]))
        _imwrite(folder / "depth" / f"{name}.png", _depth_units(depth[i], 1000.0, f"depth[{i}]"))


def _write_labels(folder: Path, masks: dict, names: list, height: int, width: int) -> None:
    """labels/<frame>.png and labels.json, whose values follow the order of ``masks``."""
    (folder / "labels").mkdir()
    for i, name in enumerate(names):
        _imwrite(folder / "labels" / f"{name}.png", label_image(masks, i, height, width))
    (folder / "labels.json").write_text(json.dumps({obj: k for k, obj in enumerate(masks, start=1)}, indent=2))


def _write_masks(folder: Path, masks, names: list) -> None:
    """masks/<frame>.png for a list, masks/<object>/<frame>.png for a dict."""
    folders = {folder / obj: frames for obj, frames in masks.items()} if isinstance(masks, dict) else {folder: masks}
    for sub, frames in folders.items():
        sub.mkdir(parents=True)
        for i, mask in enumerate(frames):
            _imwrite(sub / f"{names[i]}.png", _mask_image(mask))


def _write_poses(folder: Path, poses, names: list) -> None:
    """annotated_poses/<frame>.txt for a list, annotated_poses/<object>/<frame>.txt for a dict."""
    folders = {folder / obj: frames for obj, frames in poses.items()} if isinstance(poses, dict) else {folder: poses}
    for sub, frames in folders.items():
        sub.mkdir(parents=True)
        for i, pose in enumerate(frames):
            np.savetxt(sub / f"{names[i]}.txt", np.asarray(pose, np.float64), fmt="%.10g")
