"""Scene writers: the YCBInEOAT folder layout and a BOP dataset with one scene.

Everything is written into a temporary folder next to the destination and moved into
place at the end, so an interrupted or failed write never leaves a half-written scene.

YCBInEOAT: rgb/*.png, depth/*.png (uint16 millimetres), masks/*.png (0/255),
cam_K.txt (3x3), annotated_poses/*.txt (4x4 object-in-camera, metres). With several
objects: masks/<name>/*.png and annotated_poses/<name>/*.txt per object, optionally
labels/*.png (0 background, object k at value k) with labels.json ({name: k}); the
objects' meshes go to mesh/<name>.obj (metres, with colours), as FoundationPose's demo
data keeps them.
BOP: camera.json, test_targets_bop19.json, models/ and models_eval/ (obj_XXXXXX.ply in
millimetres + models_info.json), test/XXXXXX/{scene_camera.json, rgb/, depth/ (uint16,
depth_mm = raw * depth_scale)} and, unless the ground truth is withheld (a test set as
BOP publishes it), scene_gt.json (R, t in mm), scene_gt_info.json, mask/, mask_visib/.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    meshes = {_check_object_name(name, "meshes"): mesh for name, mesh in (meshes or {}).items()}
    names = list(names) if names is not None else [f"{i:06d}" for i in range(n)]
    with atomic_folder(path, overwrite) as tmp:
        np.savetxt(tmp / "cam_K.txt", K, fmt="%.10g")
        for sub in ("rgb", "depth"):
            (tmp / sub).mkdir()
        for i, name in enumerate(names):
            _imwrite(tmp / "rgb" / f"{name}.png", np.asarray(rgb[i]))
            _imwrite(tmp / "depth" / f"{name}.png", _depth_units(depth[i], 1000.0, f"depth[{i}]"))
        if masks is not None:
            _write_masks(tmp / "masks", masks, names)
        if poses is not None:
            _write_poses(tmp / "annotated_poses", poses, names)
        if labels:
            (tmp / "labels").mkdir()
            for i, name in enumerate(names):
                _imwrite(tmp / "labels" / f"{name}.png", label_image(masks, i, height, width))
            (tmp / "labels.json").write_text(json.dumps({obj: k for k, obj in enumerate(masks, start=1)}, indent=2))
        if meshes:
            (tmp / "mesh").mkdir()
            for obj, mesh in meshes.items():
                export_scene_mesh(mesh, tmp / "mesh", obj)
    return Path(path)


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


@dataclass
class BopGt:
    """One ground-truth object instance of an image for write_bop_dataset.

    obj_id: the model's id; pose (4,4) object-in-camera in metres; mask_visib (H,W) bool
    visible mask or None (then BOP's depth-based visibility is written); mask_full (H,W)
    bool in-image silhouette or None (then the rendered one is written).
    """

    obj_id: int
    pose: np.ndarray
    mask_visib: np.ndarray | None = None
    mask_full: np.ndarray | None = None


@dataclass
class BopImage:
    """One image for write_bop_dataset: rgb (H,W,3) uint8, depth (H,W) metres (0 =
    missing), K (3,3) and its ground-truth instances."""

    rgb: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    instances: list = field(default_factory=list)


def _default_renderer(mesh):
    from chunkpose.io.mesh import Mesh, mesh_from_trimesh
    from chunkpose.ops.render import make_renderer

    return make_renderer(mesh if isinstance(mesh, Mesh) else mesh_from_trimesh(mesh), "cpu")


def _export_model(mesh, folder: Path, obj_id: int, symmetries: dict | None) -> dict:
    """Write obj_XXXXXX.ply in millimetres; return its models_info.json entry."""
    import trimesh

    from chunkpose.io.mesh import mesh_diameter

    source = getattr(mesh, "trimesh", mesh)
    if not isinstance(source, trimesh.Trimesh):
        raise ValueError(f"meshes[{obj_id}]: expected a chunkpose Mesh or a trimesh.Trimesh")
    model = source.copy()
    model.apply_scale(1000.0)
    if getattr(mesh, "vertex_colors", None) is not None and len(mesh.vertex_colors) == len(model.vertices):
        colors = (np.clip(mesh.vertex_colors, 0, 1) * 255).round().astype(np.uint8)
        model.visual = trimesh.visual.ColorVisuals(model, vertex_colors=colors)
    model.export(folder / f"obj_{obj_id:06d}.ply")
    lo, hi = model.bounds
    info = {
        "diameter": float(mesh_diameter(model.vertices)),
        "min_x": float(lo[0]), "min_y": float(lo[1]), "min_z": float(lo[2]),
        "size_x": float(hi[0] - lo[0]), "size_y": float(hi[1] - lo[1]), "size_z": float(hi[2] - lo[2]),
    }
    for key, value in (symmetries or {}).items():
        if key not in ("symmetries_discrete", "symmetries_continuous"):
            raise ValueError(f"symmetries[{obj_id}]: unknown key {key!r} (expected symmetries_discrete, "
                             "symmetries_continuous as in models_info.json, translations in millimetres)")
        info[key] = value
    return info


def _check_images(images, meshes) -> tuple[int, int]:
    if not images:
        raise ValueError("images: expected at least one BopImage")
    height, width = np.asarray(images[0].rgb).shape[:2]
    for i, image in enumerate(images):
        rgb = np.asarray(image.rgb)
        if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"images[{i}].rgb: expected uint8 ({height},{width},3), got {rgb.dtype} {rgb.shape}")
        depth = np.asarray(image.depth)
        if depth.shape != (height, width) or not np.isfinite(depth).all():
            raise ValueError(f"images[{i}].depth: expected finite ({height},{width}) metres (0 = missing)")
        if np.asarray(image.K).shape != (3, 3):
            raise ValueError(f"images[{i}].K: expected (3,3), got {np.asarray(image.K).shape}")
        for j, gt in enumerate(image.instances):
            if int(gt.obj_id) not in meshes:
                raise ValueError(f"images[{i}].instances[{j}]: obj_id {gt.obj_id} has no mesh (pass meshes[{gt.obj_id}])")
            if np.asarray(gt.pose).shape != (4, 4):
                raise ValueError(f"images[{i}].instances[{j}].pose: expected (4,4) metres")
            for name in ("mask_visib", "mask_full"):
                mask = getattr(gt, name)
                if mask is not None and np.asarray(mask).shape != (height, width):
                    raise ValueError(f"images[{i}].instances[{j}].{name}: expected ({height},{width})")
    return height, width


def write_bop_dataset(
    path,
    images,
    meshes: dict,
    *,
    scene_id: int = 1,
    split: str = "test",
    depth_scale: float = 1.0,
    ground_truth: bool = True,
    symmetries: dict | None = None,
    visib_delta_mm: float = 15.0,
    renderer_factory=None,
    overwrite: bool = False,
) -> Path:
    """Write a BOP dataset with one scene, in the layout and with the files BOP's own
    datasets have (see the module docstring).

    Args:
        path: the dataset folder (written atomically).
        images: [BopImage]; image i is im_id i.
        meshes: {obj_id: chunkpose Mesh or trimesh in metres} (written in millimetres).
        scene_id, split: where the images go (DATASET/<split>/<scene_id:06d>).
        depth_scale: millimetres per raw depth unit.
        ground_truth: False writes a test set with the ground truth withheld (no
            scene_gt.json, scene_gt_info.json, mask/, mask_visib/), like BOP's test sets;
            test_targets_bop19.json is written either way.
        symmetries: {obj_id: {"symmetries_discrete": [...], "symmetries_continuous": [...]}}
            added to models_info.json (BOP's format, millimetres).
        visib_delta_mm: the visibility tolerance of calc_gt_info (15 mm; 5 for ITODD).
        renderer_factory: mesh -> renderer used to render each instance at its pose
            (default: chunkpose's OpenGL renderer on the CPU).
        overwrite: replace an existing non-empty folder.
    Returns:
        The dataset folder.

    scene_gt_info.json follows calc_gt_info exactly: the model is rendered at the
    ground-truth pose and its visibility is taken from the written (quantised) depth, so
    the fields exist with or without the caller's masks. test_targets_bop19.json lists,
    per image and object, the instances with visib_fract >= 0.1 (BOP's rule).
    """
    from chunkpose.io.bop import Target, write_targets
    from chunkpose.io.bop_gt import gt_info, render_model_depth_mm
    from chunkpose.io.mesh import load_mesh

    meshes = {int(k): v for k, v in meshes.items()}
    height, width = _check_images(images, meshes)
    if not depth_scale > 0:
        raise ValueError(f"depth_scale: expected a positive number of millimetres per unit, got {depth_scale}")
    factory = renderer_factory or _default_renderer
    renderers, loaded = {}, {}
    with atomic_folder(path, overwrite) as tmp:
        infos = {}
        for folder_name in ("models", "models_eval"):
            folder = tmp / folder_name
            folder.mkdir()
            for obj_id, mesh in sorted(meshes.items()):
                infos[str(obj_id)] = _export_model(mesh, folder, obj_id, (symmetries or {}).get(obj_id))
            (folder / "models_info.json").write_text(json.dumps(infos, indent=2))
        K0 = np.asarray(images[0].K, dtype=np.float64)
        camera = {
            "cx": float(K0[0, 2]), "cy": float(K0[1, 2]), "fx": float(K0[0, 0]), "fy": float(K0[1, 1]),
            "height": int(height), "width": int(width), "depth_scale": float(depth_scale),
        }
        (tmp / "camera.json").write_text(json.dumps(camera, indent=2))
        scene = tmp / split / f"{scene_id:06d}"
        for sub in ("rgb", "depth") + (("mask", "mask_visib") if ground_truth else ()):
            (scene / sub).mkdir(parents=True)
        scene_camera, scene_gt, scene_gt_info, targets = {}, {}, {}, []
        for im_id, image in enumerate(images):
            K = np.asarray(image.K, dtype=np.float64)
            raw = _depth_units(image.depth, 1000.0 / depth_scale, f"images[{im_id}].depth")
            _imwrite(scene / "rgb" / f"{im_id:06d}.png", np.asarray(image.rgb))
            _imwrite(scene / "depth" / f"{im_id:06d}.png", raw)
            scene_camera[str(im_id)] = {"cam_K": K.reshape(-1).tolist(), "depth_scale": float(depth_scale)}
            depth_mm = raw.astype(np.float32) * np.float32(depth_scale)  # what bop_toolkit reads back
            gts, gt_infos, counts = [], [], {}
            for gt_id, gt in enumerate(image.instances):
                obj_id = int(gt.obj_id)
                if obj_id not in renderers:
                    loaded[obj_id] = load_mesh(meshes[obj_id])
                    renderers[obj_id] = factory(loaded[obj_id])
                pose = np.asarray(gt.pose, dtype=np.float64)
                model_depth, offset = render_model_depth_mm(renderers[obj_id], loaded[obj_id].vertices, pose, K,
                                                            width, height)
                info, visib, silhouette = gt_info(depth_mm, K, model_depth, offset, visib_delta_mm)
                gts.append({"cam_R_m2c": pose[:3, :3].reshape(-1).tolist(),
                            "cam_t_m2c": (pose[:3, 3] * 1000.0).tolist(), "obj_id": obj_id})
                gt_infos.append(info)
                if info["visib_fract"] >= 0.1:
                    counts[obj_id] = counts.get(obj_id, 0) + 1
                if ground_truth:
                    name = f"{im_id:06d}_{gt_id:06d}.png"
                    full = silhouette if gt.mask_full is None else np.asarray(gt.mask_full, dtype=bool)
                    shown = visib if gt.mask_visib is None else np.asarray(gt.mask_visib, dtype=bool)
                    _imwrite(scene / "mask" / name, _mask_image(full))
                    _imwrite(scene / "mask_visib" / name, _mask_image(shown))
            scene_gt[str(im_id)] = gts
            scene_gt_info[str(im_id)] = gt_infos
            targets += [Target(int(scene_id), im_id, obj_id, n) for obj_id, n in counts.items()]
        (scene / "scene_camera.json").write_text(json.dumps(scene_camera, indent=2))
        if ground_truth:
            (scene / "scene_gt.json").write_text(json.dumps(scene_gt, indent=2))
            (scene / "scene_gt_info.json").write_text(json.dumps(scene_gt_info, indent=2))
        write_targets(tmp / "test_targets_bop19.json", targets)
    return Path(path)


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
    ground_truth: bool = True,
    renderer_factory=None,
) -> Path:
    """Write a BOP dataset folder with one object and one instance per image.

    rgb, depth (metres) and poses (4,4 metres) are per image; masks: visible masks (bool)
    per image, or None to write BOP's depth-based visibility; mesh: a chunkpose Mesh or
    trimesh in metres (written in millimetres); full_masks: optional unoccluded
    silhouettes for mask/ (default: rendered); depth_scale: millimetres per raw depth
    unit; ground_truth=False withholds scene_gt.json, scene_gt_info.json and the masks.
    See write_bop_dataset for what is written.
    """
    _check_frames(rgb, depth, masks, poses)
    if poses is None:
        raise ValueError("poses: BOP needs the ground-truth pose of every image")
    if masks is not None and len(masks) != len(rgb):
        raise ValueError("masks: BOP needs a visible mask for every image (or masks=None)")
    if full_masks is not None and len(full_masks) != len(rgb):
        raise ValueError(f"full_masks: expected {len(rgb)} masks, got {len(full_masks)}")
    images = [
        BopImage(np.asarray(rgb[i]), np.asarray(depth[i]), np.asarray(K, dtype=np.float64), [
            BopGt(int(obj_id), np.asarray(poses[i], dtype=np.float64),
                  None if masks is None else np.asarray(masks[i], dtype=bool),
                  None if full_masks is None else np.asarray(full_masks[i], dtype=bool))
        ])
        for i in range(len(rgb))
    ]
    return write_bop_dataset(path, images, {int(obj_id): mesh}, scene_id=scene_id, split=split,
                             depth_scale=depth_scale, ground_truth=ground_truth, overwrite=overwrite,
                             renderer_factory=renderer_factory)
