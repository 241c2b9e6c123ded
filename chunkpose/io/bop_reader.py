"""Reading BOP scenes: images, depth, camera and ground truth of one scene of a BOP
dataset split, models and their symmetries from models_info.json, and the instances to
register from the annotations or from detections (chunkpose.io.bop).

Frames follow chunkpose.io.scene_files' conventions (metres, resize and zfar as there).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chunkpose.ops.geometry import scaled_size
from chunkpose.io.scene_files import (
    DEPTH_EXTENSIONS, IMAGE_EXTENSIONS, Frame, ResizingReader, SceneError, find_file, load_json, match_rgb_size,
    read_depth_file, read_mask_file, read_rgb_file, resize_nearest,
)

#: Where a dataset's models are, in order: models/, else T-LESS's CAD models (bop_toolkit's
#: default model type for it), else the evaluation models every dataset has.
MODEL_FOLDERS = ("models", "models_cad", "models_eval")


def model_folder(dataset_dir) -> Path:
    """The first of MODEL_FOLDERS that the dataset has (models/ when none: the readers say so)."""
    root = Path(dataset_dir)
    return next((root / name for name in MODEL_FOLDERS if (root / name).is_dir()), root / "models")


@dataclass
class BopInstance:
    """One object instance of a BOP image to register.

    From the annotations (BOPReader.frame): gt_index is the position in scene_gt.json
    (mask_visib/{im:06d}_{gt_index:06d}.png), score None. From detections
    (BOPReader.detection_instances): gt_index is the detection's rank among the image's selected
    detections, gt_pose None, score the detector's.

    Attributes:
        im_id: BOP image id.
        gt_index: annotation index or detection rank.
        obj_id: BOP object id.
        gt_pose: (4,4) float64 model-in-camera pose in metres, or None.
        mask: (H,W) bool visible mask at the frame's (resized) size.
        score: the detector's score, or None.
        visib_fract: the annotation's visible fraction from scene_gt_info.json, or None.
    """

    im_id: int
    gt_index: int
    obj_id: int
    gt_pose: np.ndarray | None
    mask: np.ndarray
    score: float | None = None
    visib_fract: float | None = None

    @property
    def name(self) -> str:
        return f"{self.im_id:06d}_{self.gt_index:06d}"




def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()


def bop_symmetry_transforms(model_info: dict, scale: float = 0.001, continuous_step_deg: float = 5.0) -> np.ndarray:
    """The symmetry transforms (S,4,4) of one models_info.json entry, identity first.

    symmetries_discrete: 16 values each, a row-major 4x4 with its translation in model units
    (millimetres in BOP); symmetries_continuous: {axis, offset}, a rotation about the axis
    through the offset point, discretised every ``continuous_step_deg`` degrees. Every discrete
    symmetry is combined with every discretised continuous one (continuous after discrete).

    Args:
        model_info: one models_info.json entry (dict).
        scale: translations are multiplied by this (default 0.001: millimetres -> metres).
        continuous_step_deg: discretisation step of continuous symmetries, degrees (default 5).

    Returns:
        (S,4,4) float64 with S = (1 + #discrete) * (1 + (steps - 1) per continuous symmetry),
        steps = round(360 / continuous_step_deg).
    """
    discrete = [np.eye(4)]
    for values in model_info.get("symmetries_discrete") or []:
        S = np.asarray(values, dtype=np.float64).reshape(4, 4).copy()
        S[:3, 3] *= scale
        discrete.append(S)
    continuous = [np.eye(4)]
    for sym in model_info.get("symmetries_continuous") or []:
        axis = np.asarray(sym["axis"], dtype=np.float64)
        offset = np.asarray(sym.get("offset", [0, 0, 0]), dtype=np.float64) * scale
        steps = max(1, int(round(360.0 / float(continuous_step_deg))))
        for k in range(1, steps):
            C = np.eye(4)
            C[:3, :3] = _axis_rotation(axis, 2 * np.pi * k / steps)
            C[:3, 3] = offset - C[:3, :3] @ offset
            continuous.append(C)
    return np.stack([C @ D for D in discrete for C in continuous])


class BOPReader(ResizingReader):
    """DATASET/{camera.json, models/obj_XXXXXX.ply, models/models_info.json} and
    DATASET/<split>/<scene_id:06d>/{scene_camera.json, rgb/ (or gray/), depth/} with, where the
    ground truth is given, scene_gt.json and mask_visib/.

    Depth in metres = raw * depth_scale (scene_camera.json, else camera.json) / 1000. Model
    files and models_info are in millimetres; ``model_info`` returns metres.

    Without scene_gt.json (a BOP test set, whose ground truth is withheld) the images are those
    of scene_camera.json; ``image`` reads one without instances and ``detection_instances``
    makes the instances from detections. Iterating yields ``frame(i)`` for every image.

    Args:
        dataset_dir: the dataset folder (holding models/ and the split folders).
        split: the split folder name (default "test").
        scene_id: the scene number (default 1).
        downscale: factor for both image axes, or None.
        shorter_side: target shorter side in pixels (wins over downscale), or None.
        zfar: depth at or beyond this many metres becomes 0; None = no limit.

    Raises:
        SceneError: the dataset or scene folder is missing, a JSON file is missing or invalid,
            or no images are listed.
    """

    layout = "bop"

    def __init__(self, dataset_dir, split: str = "test", scene_id: int = 1, downscale: float | None = None,
                 shorter_side: int | None = None, zfar: float | None = None):
        super().__init__(downscale, shorter_side, zfar)
        self.root = Path(dataset_dir)
        if not self.root.is_dir():
            raise SceneError(f"BOP dataset folder {self.root} does not exist", "pass --bop DATASET_DIR (the folder holding models/ and the split folders)")
        self.split = split
        self.scene_id = int(scene_id)
        self.scene_dir = self.root / split / f"{self.scene_id:06d}"
        if not self.scene_dir.is_dir():
            raise SceneError(f"BOP scene folder {self.scene_dir} does not exist", "check --split and --scene-id")
        self.camera = {}
        if (self.root / "camera.json").is_file():
            self.camera = load_json(self.root / "camera.json", "")
        self.scene_camera = load_json(self.scene_dir / "scene_camera.json", "a BOP scene needs scene_camera.json with cam_K per image")
        gt_path = self.scene_dir / "scene_gt.json"
        self.scene_gt = load_json(gt_path, "") if gt_path.is_file() else None
        info_path = self.scene_dir / "scene_gt_info.json"
        self.scene_gt_info = load_json(info_path, "") if info_path.is_file() else {}
        # with ground truth, the annotated images; without (a test set), every camera entry
        self.image_ids = sorted(int(k) for k in (self.scene_gt if self.scene_gt is not None else self.scene_camera))
        if not self.image_ids:
            raise SceneError(f"no images listed in {self.scene_dir}", "scene_camera.json (and scene_gt.json) must list the images")
        self.models_dir = model_folder(self.root)
        info_path = self.models_dir / "models_info.json"
        self.models_info = {int(k): v for k, v in load_json(info_path, "").items()} if info_path.is_file() else {}

    def __len__(self) -> int:
        return len(self.image_ids)

    def has_ground_truth(self) -> bool:
        """Whether the scene has scene_gt.json (annotated instances and poses).

        Returns:
            bool.
        """
        return self.scene_gt is not None

    def index_of(self, im_id: int) -> int:
        """Position of image ``im_id`` in ``image_ids``.

        Args:
            im_id: BOP image id.

        Returns:
            int index (0-based).

        Raises:
            SceneError: the image is not in the scene.
        """
        try:
            return self.image_ids.index(int(im_id))
        except ValueError:
            raise SceneError(f"image {im_id} is not in scene {self.scene_id} of {self.root}",
                             "check the detections / targets file against the dataset") from None

    def model_path(self, obj_id: int) -> Path:
        """obj_<obj_id:06d>.ply in the dataset's model folder (model_folder: models/, models_cad/, ...).

        Args:
            obj_id: BOP object id.

        Returns:
            Path (the model is in millimetres).

        Raises:
            SceneError: the file is missing.
        """
        path = self.models_dir / f"obj_{obj_id:06d}.ply"
        if not path.is_file():
            raise SceneError(f"missing model {path}", "the BOP dataset needs models/ (or T-LESS's models_cad/) with "
                             "obj_XXXXXX.ply, or pass --mesh FILE")
        return path

    def model_info(self, obj_id: int) -> dict:
        """diameter (metres) and symmetric (bool) from models_info.json ({} when absent).

        Args:
            obj_id: BOP object id.

        Returns:
            dict with "symmetric" and, where listed, "diameter" in metres; {} for an unlisted object.
        """
        info = self.models_info.get(int(obj_id))
        if info is None:
            return {}
        out = {}
        if "diameter" in info:
            out["diameter"] = float(info["diameter"]) / 1000.0
        out["symmetric"] = bool(info.get("symmetries_discrete") or info.get("symmetries_continuous"))
        return out

    def symmetry_transforms(self, obj_id: int, scale: float = 0.001, continuous_step_deg: float = 5.0):
        """(S,4,4) object-frame symmetries of a model from models_info.json, translations in metres
        (times ``scale``), or None when it lists none (see bop_symmetry_transforms).

        Args:
            obj_id: BOP object id.
            scale: translation factor (default 0.001: millimetres -> metres).
            continuous_step_deg: discretisation step of continuous symmetries, degrees.

        Returns:
            (S,4,4) float64 array, or None.
        """
        info = self.models_info.get(int(obj_id))
        if not info or not (info.get("symmetries_discrete") or info.get("symmetries_continuous")):
            return None
        return bop_symmetry_transforms(info, scale=scale, continuous_step_deg=continuous_step_deg)

    def intrinsics(self, im_id: int) -> tuple[np.ndarray, float]:
        """K (3,3) at native size and the depth scale (raw units -> mm) of an image.

        Args:
            im_id: BOP image id.

        Returns:
            (K, depth_scale): (3,3) float64 in pixels, and a float.

        Raises:
            SceneError: scene_camera.json has no cam_K for the image.
        """
        cam = self.scene_camera.get(str(im_id))
        if cam is None or "cam_K" not in cam:
            raise SceneError(f"scene_camera.json has no cam_K for image {im_id}", "add it, or remove the image from scene_gt.json")
        K = np.array(cam["cam_K"], dtype=np.float64).reshape(3, 3)
        depth_scale = float(cam.get("depth_scale", self.camera.get("depth_scale", 1.0)))
        return K, depth_scale

    def _image_file(self, folder: str, im_id: int, extensions=IMAGE_EXTENSIONS) -> Path:
        path = find_file(self.scene_dir / folder, f"{im_id:06d}", extensions)
        if path is None:
            raise SceneError(f"missing {self.scene_dir / folder / f'{im_id:06d}'}.png", f"every image of the scene needs {folder}/{im_id:06d}.png")
        return path

    def _read_raw(self, im_id: int):
        K, depth_scale = self.intrinsics(im_id)
        rgb = read_rgb_file(self._image_file("rgb", im_id) if (self.scene_dir / "rgb").is_dir() else self._image_file("gray", im_id))
        depth = read_depth_file(self._image_file("depth", im_id, DEPTH_EXTENSIONS), depth_scale / 1000.0)
        return rgb, depth, K, depth_scale

    def _extra(self, im_id: int, depth_scale: float) -> dict:
        return {"im_id": im_id, "scene_id": self.scene_id, "depth_scale": depth_scale}

    def image(self, index: int) -> Frame:
        """Image ``index`` as a Frame without instances (mask None), resized like ``frame``.

        Needs no ground truth.

        Args:
            index: position in ``image_ids``.

        Returns:
            Frame (rgb uint8 (H,W,3), depth float32 metres, K float64 (3,3)); extra holds im_id,
            scene_id, depth_scale and resize_factor.

        Raises:
            SceneError: an image file or cam_K is missing or unreadable.
        """
        im_id = self.image_ids[index]
        rgb, depth, K, depth_scale = self._read_raw(im_id)
        return self._finish(f"{im_id:06d}", rgb, depth, K, None, extra=self._extra(im_id, depth_scale))

    def detection_instances(self, frame: Frame, detections) -> list[BopInstance]:
        """Instances to register from detections of ``frame``'s image (e.g. the list
        chunkpose.io.bop.select_detections gives for it), in the given order.

        Each detection's mask (decoded from its RLE at the native image size) is resized like the
        frame; detections without a mask, or whose mask is empty after resizing, are left out.
        gt_index is the detection's position in ``detections``.

        Args:
            frame: a Frame from ``image`` or ``frame`` (its extra gives im_id and resize_factor).
            detections: detections with im_id, obj_id, score and mask ((H,W) bool at native size, or
                None: then the bbox [x, y, w, h] in native pixels is the mask, with a warning).

        Returns:
            list of BopInstance (gt_pose None).

        Raises:
            SceneError: a detection belongs to another image, or its mask size does not match.
        """
        im_id = int(frame.extra.get("im_id", -1))
        factor = float(frame.extra.get("resize_factor", 1.0))
        out = []
        for rank, det in enumerate(detections):
            if int(det.im_id) != im_id:
                raise SceneError(f"a detection of image {det.im_id} was given for image {im_id}",
                                 "pass the detections of the frame's own image")
            mask = det.mask
            if mask is None:
                mask = self._box_mask(det, frame.size, factor)
            elif scaled_size(*mask.shape, factor) != tuple(frame.size):
                raise SceneError(
                    f"detection mask of image {im_id} is {mask.shape[1]}x{mask.shape[0]}, which does not match the "
                    f"image ({frame.size[1]}x{frame.size[0]} after resizing by {factor:g})",
                    "the detections must come from this dataset's images")
            else:
                mask = resize_nearest(mask, frame.size)
            if mask.any():
                out.append(BopInstance(im_id, rank, int(det.obj_id), None, mask, score=float(det.score)))
        return out

    @staticmethod
    def _box_mask(det, size, factor: float) -> np.ndarray:
        """A box-only detection's box as its mask (BOP's default detections of seen objects
        carry no segmentation), at the frame's ``size`` after resizing by ``factor``."""
        warnings.warn("detections without segmentation: their boxes serve as masks (the translation guess then "
                      "includes background depth); segmentation detections (e.g. CNOS) register as upstream does",
                      stacklevel=3)
        mask = np.zeros(size, bool)
        if len(det.bbox) == 4:
            x, y, w, h = det.bbox
            x0, y0 = max(0, math.floor(x * factor)), max(0, math.floor(y * factor))
            x1, y1 = min(size[1], math.ceil((x + w) * factor)), min(size[0], math.ceil((y + h) * factor))
            mask[y0:y1, x0:x1] = True
        return mask

    def frame(self, index: int) -> tuple[Frame, list[BopInstance]]:
        """Image ``index`` and its annotated instances that have a non-empty mask_visib.

        The Frame's mask is the union of the instance masks; instance masks are resized like the
        images. Without scene_gt.json the instance list is empty (see ``image``).

        Args:
            index: position in ``image_ids``.

        Returns:
            (Frame, list of BopInstance with gt_pose (4,4) float64 metres where annotated).

        Raises:
            SceneError: a file is missing or unreadable, or a mask's size differs from the image.
        """
        if self.scene_gt is None:
            return self.image(index), []
        im_id = self.image_ids[index]
        name = f"{im_id:06d}"
        rgb, depth, K, depth_scale = self._read_raw(im_id)
        raw_instances = []
        for gt_index, gt in enumerate(self.scene_gt[str(im_id)]):
            mask_file = find_file(self.scene_dir / "mask_visib", f"{im_id:06d}_{gt_index:06d}", IMAGE_EXTENSIONS)
            if mask_file is None:
                continue
            mask = read_mask_file(mask_file)
            mask = match_rgb_size(f"{name} ({mask_file.name})", "mask_visib", mask, rgb.shape)
            pose = None
            if "cam_R_m2c" in gt and "cam_t_m2c" in gt:
                pose = np.eye(4)
                pose[:3, :3] = np.array(gt["cam_R_m2c"], dtype=np.float64).reshape(3, 3)
                pose[:3, 3] = np.array(gt["cam_t_m2c"], dtype=np.float64).reshape(3) / 1000.0
            raw_instances.append((gt_index, int(gt["obj_id"]), pose, mask))
        union = np.zeros(rgb.shape[:2], bool)
        for _, _, _, mask in raw_instances:
            union |= mask
        frame = self._finish(name, rgb, depth, K, union, extra=self._extra(im_id, depth_scale))
        instances = []
        infos = self.scene_gt_info.get(str(im_id), [])
        for gt_index, obj_id, pose, mask in raw_instances:
            mask = resize_nearest(mask, frame.size)
            visib = infos[gt_index].get("visib_fract") if gt_index < len(infos) else None
            if mask.any():
                instances.append(BopInstance(im_id, gt_index, obj_id, pose, mask, visib_fract=visib))
        return frame, instances

    def __iter__(self):
        for i in range(len(self)):
            yield self.frame(i)


__all__ = ["BOPReader", "BopInstance", "bop_symmetry_transforms"]
