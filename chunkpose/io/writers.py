"""Scene writers: the YCBInEOAT folder layout and a BOP dataset with one scene.

Everything is written into a temporary folder next to the destination and moved into
place at the end, so an interrupted or failed write never leaves a half-written scene.

YCBInEOAT: rgb/*.png, depth/*.png (uint16 millimetres), masks/*.png (0/255),
cam_K.txt (3x3), annotated_poses/*.txt (4x4 object-in-camera, metres).
BOP: camera.json, models/obj_XXXXXX.ply (millimetres) + models_info.json,
test/XXXXXX/{scene_camera.json, scene_gt.json (R, t in mm), scene_gt_info.json, rgb/,
depth/ (uint16, depth_mm = raw * depth_scale), mask_visib/, mask/}.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

UINT16_MAX = 65535


@contextmanager
def atomic_folder(path, overwrite: bool = False):
    """Yield a temporary folder that becomes ``path`` when the block finishes without error.

    An existing non-empty ``path`` is an error unless overwrite=True (then it is replaced).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"path: {path} exists and is not empty; pass overwrite=True or choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.writing-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def write_ycbineoat(path, rgb, depth, K, masks=None, poses=None, names=None, overwrite: bool = False) -> Path:
    """Write a YCBInEOAT-style scene folder.

    rgb: list of (H,W,3) uint8; depth: list of (H,W) float metres (0 = missing), stored as
    uint16 millimetres; K (3,3); masks: list of (H,W) bool (all frames or just the first);
    poses: list of (4,4) object-in-camera in metres; names: file stems (default 000000...).
    """
    height, width = _check_frames(rgb, depth, masks, poses)
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"K: expected (3,3), got {K.shape}")
    names = list(names) if names is not None else [f"{i:06d}" for i in range(len(rgb))]
    with atomic_folder(path, overwrite) as tmp:
        for sub in ("rgb", "depth", "masks", "annotated_poses"):
            if sub == "masks" and masks is None or sub == "annotated_poses" and poses is None:
                continue
            (tmp / sub).mkdir()
        np.savetxt(tmp / "cam_K.txt", K, fmt="%.10g")
        for i, name in enumerate(names):
            _imwrite(tmp / "rgb" / f"{name}.png", np.asarray(rgb[i]))
            _imwrite(tmp / "depth" / f"{name}.png", _depth_units(depth[i], 1000.0, f"depth[{i}]"))
            if masks is not None and i < len(masks):
                _imwrite(tmp / "masks" / f"{name}.png", _mask_image(masks[i]))
            if poses is not None:
                np.savetxt(tmp / "annotated_poses" / f"{name}.txt", np.asarray(poses[i], np.float64), fmt="%.10g")
    return Path(path)


def _bbox(mask) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [-1, -1, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def write_bop(
    path,
    rgb,
    depth,
    K,
    masks,
    poses,
    mesh,
    full_masks=None,
    obj_id: int = 1,
    scene_id: int = 1,
    split: str = "test",
    depth_scale: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write a BOP dataset folder with one object and one scene.

    rgb, depth (metres), masks (visible masks, bool) and poses (4,4 metres) are per image;
    mesh: a chunkpose Mesh or trimesh in metres (written in millimetres);
    full_masks: optional unoccluded silhouettes (mask/ and the pixel counts of
    scene_gt_info.json); depth_scale: millimetres per raw depth unit.
    """
    import trimesh

    height, width = _check_frames(rgb, depth, masks, poses)
    if masks is None or len(masks) != len(rgb):
        raise ValueError("masks: BOP needs a visible mask for every image")
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"K: expected (3,3), got {K.shape}")
    if not depth_scale > 0:
        raise ValueError(f"depth_scale: expected a positive number of millimetres per unit, got {depth_scale}")
    source = getattr(mesh, "trimesh", mesh)
    if not isinstance(source, trimesh.Trimesh):
        raise ValueError("mesh: expected a chunkpose Mesh or a trimesh.Trimesh")
    with atomic_folder(path, overwrite) as tmp:
        models = tmp / "models"
        models.mkdir()
        model = source.copy()
        model.apply_scale(1000.0)
        if getattr(mesh, "vertex_colors", None) is not None and len(mesh.vertex_colors) == len(model.vertices):
            colors = (np.clip(mesh.vertex_colors, 0, 1) * 255).round().astype(np.uint8)
            model.visual = trimesh.visual.ColorVisuals(model, vertex_colors=colors)
        model.export(models / f"obj_{obj_id:06d}.ply")
        from chunkpose.io.mesh import mesh_diameter

        lo, hi = model.bounds
        info = {
            str(obj_id): {
                "diameter": float(mesh_diameter(model.vertices)),
                "min_x": float(lo[0]), "min_y": float(lo[1]), "min_z": float(lo[2]),
                "size_x": float(hi[0] - lo[0]), "size_y": float(hi[1] - lo[1]), "size_z": float(hi[2] - lo[2]),
            }
        }
        (models / "models_info.json").write_text(json.dumps(info, indent=2))
        camera = {
            "cx": float(K[0, 2]), "cy": float(K[1, 2]), "fx": float(K[0, 0]), "fy": float(K[1, 1]),
            "height": int(height), "width": int(width), "depth_scale": float(depth_scale),
        }
        (tmp / "camera.json").write_text(json.dumps(camera, indent=2))
        scene = tmp / split / f"{scene_id:06d}"
        folders = ["rgb", "depth", "mask_visib"] + (["mask"] if full_masks is not None else [])
        for sub in folders:
            (scene / sub).mkdir(parents=True)
        scene_camera, scene_gt, scene_gt_info = {}, {}, {}
        for i in range(len(rgb)):
            _imwrite(scene / "rgb" / f"{i:06d}.png", np.asarray(rgb[i]))
            _imwrite(scene / "depth" / f"{i:06d}.png", _depth_units(depth[i], 1000.0 / depth_scale, f"depth[{i}]"))
            visible = np.asarray(masks[i], dtype=bool)
            _imwrite(scene / "mask_visib" / f"{i:06d}_000000.png", _mask_image(visible))
            pose = np.asarray(poses[i], dtype=np.float64)
            scene_camera[str(i)] = {"cam_K": K.reshape(-1).tolist(), "depth_scale": float(depth_scale)}
            scene_gt[str(i)] = [
                {
                    "cam_R_m2c": pose[:3, :3].reshape(-1).tolist(),
                    "cam_t_m2c": (pose[:3, 3] * 1000.0).tolist(),
                    "obj_id": int(obj_id),
                }
            ]
            gt_info = {
                "bbox_visib": _bbox(visible),
                "px_count_visib": int(visible.sum()),
                "px_count_valid": int((visible & (np.asarray(depth[i]) > 0)).sum()),
            }
            if full_masks is not None:
                full = np.asarray(full_masks[i], dtype=bool)
                _imwrite(scene / "mask" / f"{i:06d}_000000.png", _mask_image(full))
                gt_info.update(
                    bbox_obj=_bbox(full),
                    px_count_all=int(full.sum()),
                    visib_fract=float(visible.sum() / max(full.sum(), 1)),
                )
            scene_gt_info[str(i)] = [gt_info]
        (scene / "scene_camera.json").write_text(json.dumps(scene_camera, indent=2))
        (scene / "scene_gt.json").write_text(json.dumps(scene_gt, indent=2))
        (scene / "scene_gt_info.json").write_text(json.dumps(scene_gt_info, indent=2))
    return Path(path)
