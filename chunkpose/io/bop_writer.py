"""The BOP writer: a BOP dataset with one scene, laid out as BOP's own datasets are.

camera.json, test_targets_bop19.json, models/ and models_eval/ (obj_XXXXXX.ply in
millimetres + models_info.json), test/XXXXXX/{scene_camera.json, rgb/, depth/ (uint16,
depth_mm = raw * depth_scale)} and, unless the ground truth is withheld (a test set as
BOP publishes it), scene_gt.json (R, t in mm), scene_gt_info.json, mask/, mask_visib/.
Written atomically, like the other scene writers (chunkpose.io.writers).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trimesh

from chunkpose.io.bop import Target, write_targets
from chunkpose.io.bop_gt import gt_info, render_model_depth_mm
from chunkpose.io.mesh import Mesh, load_mesh, mesh_diameter, mesh_from_trimesh
from chunkpose.io.writers import _check_frames, _depth_units, _imwrite, _mask_image, atomic_folder

# BOP's rule for a test target: an instance counts when this much of it is visible.
_TARGET_MIN_VISIB_FRACT = 0.1


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
    from chunkpose.ops.render import make_renderer

    return make_renderer(mesh if isinstance(mesh, Mesh) else mesh_from_trimesh(mesh), "cpu")


def _export_model(mesh, folder: Path, obj_id: int, symmetries: dict | None) -> dict:
    """Write obj_XXXXXX.ply in millimetres; return its models_info.json entry."""
    source = getattr(mesh, "trimesh", mesh)
    if not isinstance(source, trimesh.Trimesh):
        raise ValueError(f"meshes[{obj_id}]: expected a chunkpose Mesh or a trimesh.Trimesh")
    model = source.copy()
    model.apply_scale(1000.0)
    if getattr(mesh, "vertex_colors", None) is not None and len(mesh.vertex_colors) == len(model.vertices):
        colors = (np.clip(mesh.vertex_colors, 0, 1) * 255).round().astype(np.uint8)
        model.visual = trimesh.visual.ColorVisuals(model, vertex_colors=colors)
    # as BOP publishes its models: ASCII with vertex normals (bop_toolkit's Phong renderer reads them)
    model.export(folder / f"obj_{obj_id:06d}.ply", encoding="ascii", vertex_normal=True)
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


def _write_models(root: Path, meshes: dict, symmetries: dict | None) -> None:
    """models/ and models_eval/ with their models_info.json: bop_toolkit evaluates with
    models_eval/ and renders with models/; ours are the same models in both."""
    for folder_name in ("models", "models_eval"):
        folder = root / folder_name
        folder.mkdir()
        infos = {str(obj_id): _export_model(mesh, folder, obj_id, (symmetries or {}).get(obj_id))
                 for obj_id, mesh in sorted(meshes.items())}
        (folder / "models_info.json").write_text(json.dumps(infos, indent=2))


def _write_camera(path: Path, K, height: int, width: int, depth_scale: float) -> None:
    """camera.json, which holds a single camera for the whole dataset: the first image's
    (every image's own K is in scene_camera.json)."""
    K0 = np.asarray(K, dtype=np.float64)
    camera = {
        "cx": float(K0[0, 2]), "cy": float(K0[1, 2]), "fx": float(K0[0, 0]), "fy": float(K0[1, 1]),
        "height": int(height), "width": int(width), "depth_scale": float(depth_scale),
    }
    path.write_text(json.dumps(camera, indent=2))


class _InstanceGt:
    """calc_gt_info of one instance. Each model is loaded and its renderer built once, when
    an instance first needs it: a scene shows the same few objects in every image."""

    def __init__(self, meshes: dict, factory, visib_delta_mm: float):
        self._meshes, self._factory, self._visib_delta_mm = meshes, factory, visib_delta_mm
        self._models = {}  # obj_id -> (renderer, loaded mesh)

    def __call__(self, obj_id: int, pose, K, depth_mm):
        """(scene_gt_info entry, visible mask, in-image silhouette)."""
        if obj_id not in self._models:
            mesh = load_mesh(self._meshes[obj_id])
            self._models[obj_id] = (self._factory(mesh), mesh)
        renderer, mesh = self._models[obj_id]
        height, width = depth_mm.shape
        model_depth, offset = render_model_depth_mm(renderer, mesh.vertices, pose, K, width, height)
        return gt_info(depth_mm, K, model_depth, offset, self._visib_delta_mm)


def _write_image(scene: Path, im_id: int, image, depth_scale: float, ground_truth: bool, instance_gt):
    """One image's rgb/, depth/ and (with ground truth) mask/, mask_visib/ files. Returns its
    scene_camera entry, scene_gt and scene_gt_info lists, and {obj_id: instances visible
    enough to be a target}."""
    K = np.asarray(image.K, dtype=np.float64)
    raw = _depth_units(image.depth, 1000.0 / depth_scale, f"images[{im_id}].depth")
    _imwrite(scene / "rgb" / f"{im_id:06d}.png", np.asarray(image.rgb))
    _imwrite(scene / "depth" / f"{im_id:06d}.png", raw)
    camera = {"cam_K": K.reshape(-1).tolist(), "depth_scale": float(depth_scale)}
    # visibility from the depth as bop_toolkit reads it back, not from the float input
    depth_mm = raw.astype(np.float32) * np.float32(depth_scale)
    gts, gt_infos, counts = [], [], {}
    for gt_id, gt in enumerate(image.instances):
        obj_id = int(gt.obj_id)
        pose = np.asarray(gt.pose, dtype=np.float64)
        info, visib, silhouette = instance_gt(obj_id, pose, K, depth_mm)
        gts.append({"cam_R_m2c": pose[:3, :3].reshape(-1).tolist(),
                    "cam_t_m2c": (pose[:3, 3] * 1000.0).tolist(), "obj_id": obj_id})
        gt_infos.append(info)
        if info["visib_fract"] >= _TARGET_MIN_VISIB_FRACT:
            counts[obj_id] = counts.get(obj_id, 0) + 1
        if ground_truth:
            name = f"{im_id:06d}_{gt_id:06d}.png"
            full = silhouette if gt.mask_full is None else np.asarray(gt.mask_full, dtype=bool)
            shown = visib if gt.mask_visib is None else np.asarray(gt.mask_visib, dtype=bool)
            _imwrite(scene / "mask" / name, _mask_image(full))
            _imwrite(scene / "mask_visib" / name, _mask_image(shown))
    return camera, gts, gt_infos, counts


def _write_scene(scene: Path, images, scene_id: int, depth_scale: float, ground_truth: bool, instance_gt) -> list:
    """The scene folder <split>/XXXXXX/; returns its [Target]."""
    for sub in ("rgb", "depth") + (("mask", "mask_visib") if ground_truth else ()):
        (scene / sub).mkdir(parents=True)
    scene_camera, scene_gt, scene_gt_info, targets = {}, {}, {}, []
    for im_id, image in enumerate(images):
        camera, gts, gt_infos, counts = _write_image(scene, im_id, image, depth_scale, ground_truth, instance_gt)
        scene_camera[str(im_id)] = camera
        scene_gt[str(im_id)] = gts
        scene_gt_info[str(im_id)] = gt_infos
        targets += [Target(int(scene_id), im_id, obj_id, n) for obj_id, n in counts.items()]
    (scene / "scene_camera.json").write_text(json.dumps(scene_camera, indent=2))
    if ground_truth:
        (scene / "scene_gt.json").write_text(json.dumps(scene_gt, indent=2))
        (scene / "scene_gt_info.json").write_text(json.dumps(scene_gt_info, indent=2))
    return targets


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
    meshes = {int(k): v for k, v in meshes.items()}
    height, width = _check_images(images, meshes)
    if not depth_scale > 0:
        raise ValueError(f"depth_scale: expected a positive number of millimetres per unit, got {depth_scale}")
    instance_gt = _InstanceGt(meshes, renderer_factory or _default_renderer, visib_delta_mm)
    with atomic_folder(path, overwrite) as tmp:
        _write_models(tmp, meshes, symmetries)
        _write_camera(tmp / "camera.json", images[0].K, height, width, depth_scale)
        targets = _write_scene(tmp / split / f"{scene_id:06d}", images, scene_id, depth_scale, ground_truth,
                               instance_gt)
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
