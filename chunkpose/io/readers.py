"""Scene readers: the YCBInEOAT folder layout FoundationPose users have, and BOP scenes.

Both readers hand out :class:`Frame` objects in chunkpose conventions: rgb uint8 (H,W,3),
depth float32 metres (H,W) with 0 = invalid, mask bool (H,W) or None, K float64 (3,3),
ground-truth pose float64 (4,4) in metres or None.

Like the upstream reader they take ``downscale`` (or ``shorter_side``) and ``zfar``: images
are resized with nearest-neighbour sampling (so depth and masks never blend across edges),
the first two rows of K are scaled, and depth at or beyond ``zfar`` becomes 0.

Every problem with the input raises :class:`SceneError`, whose message says what is wrong
and how to fix it; the command line prints it as one line.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from chunkpose.errors import InputError
from chunkpose.ops.geometry import MIN_DEPTH, scale_intrinsics, scaled_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Depth may be found stored as floats by mistake (.tif/.exr/.npy); we look for those too so
# that we can say precisely what is wrong instead of "file not found".
DEPTH_EXTENSIONS = (".png", ".tif", ".tiff", ".npy")
# A real RGB-D scene has its valid depths well above 1 cm. A median below this (after the
# depth scale) means metres were written as integers, not millimetres.
_MIN_PLAUSIBLE_MEDIAN_MM = 10


class SceneError(InputError):
    """Bad scene input. ``str(err)`` is ``"<what> (<how to fix>)"``."""

    def __init__(self, what: str, fix: str):
        self.what = what
        self.fix = fix
        super().__init__(f"{what} ({fix})")


@dataclass
class Frame:
    """One RGB-D frame.

    name: file stem ("000123"), used for output file names.
    rgb (H,W,3) uint8 RGB; depth (H,W) float32 metres, 0 = invalid; mask (H,W) bool or None;
    K (3,3) float64 for the (possibly downscaled) images; gt_pose (4,4) float64 or None.
    """

    name: str
    rgb: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    mask: np.ndarray | None = None
    gt_pose: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.rgb.shape[:2]


# --------------------------------------------------------------------------- helpers


def resize_factor(height: int, width: int, downscale: float | None, shorter_side: int | None) -> float:
    """The factor applied to both image axes: shorter_side wins over downscale."""
    if shorter_side is not None:
        if shorter_side <= 0:
            raise SceneError(f"shorter_side must be positive, got {shorter_side}", "pass e.g. --shorter-side 480")
        return float(shorter_side) / float(min(height, width))
    if downscale is None:
        return 1.0
    if not math.isfinite(downscale) or downscale <= 0:
        raise SceneError(f"downscale must be a positive number, got {downscale}", "pass e.g. --downscale 0.5")
    return float(downscale)


def _resize_nearest(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(size_hw):
        return image
    h, w = size_hw
    if image.dtype == bool:
        return cv2.resize(image.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST)


def _find_file(folder: Path, stem: str, extensions) -> Path | None:
    for ext in extensions:
        path = folder / f"{stem}{ext}"
        if path.is_file():
            return path
    return None


def read_image_file(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """cv2.imread that raises SceneError instead of returning None."""
    if not Path(path).is_file():
        raise SceneError(f"image not found: {path}", "check the scene folder")
    image = cv2.imread(str(path), flags)
    if image is None or image.size == 0:
        raise SceneError(f"cannot read image {path}", "the file is damaged or not an image; re-export it as PNG")
    return image


def read_rgb_file(path: Path) -> np.ndarray:
    """(H,W,3) uint8 RGB from a colour, grey or 16-bit image file."""
    image = read_image_file(path, cv2.IMREAD_UNCHANGED)
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SceneError(f"colour image {path} has pixel type {image.dtype}", "save colour images as 8-bit PNG or JPEG")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


def read_depth_file(path: Path, metres_per_unit: float) -> np.ndarray:
    """(H,W) float32 metres from an integer depth image of ``metres_per_unit`` per raw unit.

    Depth stored as floats (metres) is refused with a message rather than silently read
    with the wrong unit: the upstream reader would divide it by 1000 again.
    """
    path = Path(path)
    if path.suffix == ".npy":
        try:
            raw = np.load(path)
        except Exception:
            raise SceneError(f"cannot read depth {path}", "store depth as 16-bit PNG in millimetres") from None
    else:
        raw = read_image_file(path, cv2.IMREAD_UNCHANGED)
    if raw.ndim == 3:
        if raw.shape[2] == 1 or np.array_equal(raw[..., 0], raw[..., -1]):
            raw = raw[..., 0]
        else:
            raise SceneError(f"depth image {path} has {raw.shape[2]} channels", "store depth as a single-channel 16-bit PNG in millimetres")
    if np.issubdtype(raw.dtype, np.floating):
        raise SceneError(
            f"depth {path.name} is stored as {raw.dtype} (metres?) where uint16 millimetres were expected",
            "convert it: (depth_m * 1000).astype(np.uint16) and save as 16-bit PNG",
        )
    if raw.dtype == np.uint8:
        raise SceneError(f"depth {path.name} is an 8-bit image", "store depth as a 16-bit PNG in millimetres (uint16)")
    valid = raw[raw > 0]
    if valid.size and np.median(valid) * metres_per_unit * 1000 < _MIN_PLAUSIBLE_MEDIAN_MM:
        raise SceneError(
            f"depth {path.name} looks like metres stored as integers (median raw value {np.median(valid):g})",
            "store depth in millimetres: (depth_m * 1000).astype(np.uint16)",
        )
    return raw.astype(np.float32) * np.float32(metres_per_unit)


def read_mask_file(path: Path) -> np.ndarray:
    """(H,W) bool: a pixel is in the mask when any channel is non-zero."""
    mask = read_image_file(path, cv2.IMREAD_UNCHANGED)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > 0


def read_intrinsics_file(path: Path) -> np.ndarray:
    """K (3,3) from a whitespace-separated text file (cam_K.txt)."""
    if not Path(path).is_file():
        raise SceneError(f"missing {path}", "the scene needs cam_K.txt with the 3x3 camera matrix in pixels")
    try:
        values = np.array(Path(path).read_text().split(), dtype=np.float64)
    except ValueError:
        raise SceneError(f"cannot parse {path}", "it must hold 9 numbers: the 3x3 camera matrix") from None
    if values.size != 9 or not np.all(np.isfinite(values)):
        raise SceneError(f"{path} holds {values.size} numbers", "it must hold 9 numbers: the 3x3 camera matrix")
    K = values.reshape(3, 3)
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise SceneError(f"{path} has non-positive focal lengths", "check the camera matrix (fx at [0,0], fy at [1,1])")
    return K


def read_pose_file(path: Path) -> np.ndarray:
    """(4,4) float64 from a whitespace-separated text file."""
    try:
        values = np.array(Path(path).read_text().split(), dtype=np.float64)
    except ValueError:
        raise SceneError(f"cannot parse pose {path}", "it must hold 16 numbers: a 4x4 matrix in metres") from None
    if values.size == 12:
        values = np.concatenate([values, [0, 0, 0, 1]])
    if values.size != 16:
        raise SceneError(f"pose {path} holds {values.size} numbers", "it must hold 16 numbers: a 4x4 matrix in metres")
    return values.reshape(4, 4)


def _check_same_size(name: str, what: str, shape, expected) -> None:
    if tuple(shape[:2]) != tuple(expected[:2]):
        raise SceneError(
            f"frame {name}: {what} is {shape[1]}x{shape[0]} but rgb is {expected[1]}x{expected[0]}",
            "rgb, depth and mask of a frame must have the same size",
        )


def _apply_zfar(depth: np.ndarray, zfar: float | None) -> np.ndarray:
    bad = ~np.isfinite(depth) | (depth < 0.001)
    if zfar is not None:
        bad |= depth >= zfar
    if bad.any():
        depth = depth.copy()
        depth[bad] = 0
    return depth


class _ResizingReader:
    """Shared resize / zfar handling; subclasses load raw frames at native size."""

    def __init__(self, downscale: float | None = None, shorter_side: int | None = None, zfar: float | None = None):
        if zfar is not None and not zfar > 0:
            raise SceneError(f"zfar must be positive, got {zfar}", "pass e.g. --zfar 3.0 (metres)")
        self.downscale = downscale
        self.shorter_side = shorter_side
        self.zfar = zfar if zfar is not None else math.inf

    def _finish(self, name, rgb, depth, K, mask, gt_pose=None, extra=None) -> Frame:
        H, W = rgb.shape[:2]
        _check_same_size(name, "depth", depth.shape, rgb.shape)
        if mask is not None:
            _check_same_size(name, "mask", mask.shape, rgb.shape)
        factor = resize_factor(H, W, self.downscale, self.shorter_side)
        if factor != 1.0:
            size = scaled_size(H, W, factor)
            rgb = _resize_nearest(rgb, size)
            depth = _resize_nearest(depth, size)
            mask = None if mask is None else _resize_nearest(mask, size)
            K = scale_intrinsics(K, factor)
        depth = _apply_zfar(depth, self.zfar)
        extra = dict(extra or {})
        extra["resize_factor"] = factor
        return Frame(name=name, rgb=rgb, depth=depth.astype(np.float32, copy=False), K=np.asarray(K, np.float64),
                     mask=mask, gt_pose=gt_pose, extra=extra)


# --------------------------------------------------------------------------- YCBInEOAT


class YCBInEOATReader(_ResizingReader):
    """scene/rgb/*.png, scene/depth/*.png (uint16 mm), scene/masks/*.png (first frame at least),
    scene/cam_K.txt, optional scene/annotated_poses/*.txt (4x4, metres).

    Frames are the rgb files sorted by name; depth, masks and poses share the file stem.
    """

    layout = "ycbineoat"

    def __init__(self, scene_dir, downscale: float | None = None, shorter_side: int | None = None,
                 zfar: float | None = None, depth_scale: float = 0.001):
        super().__init__(downscale, shorter_side, zfar)
        self.root = Path(scene_dir)
        if not self.root.is_dir():
            raise SceneError(f"scene folder {self.root} does not exist", "pass --scene DIR with rgb/, depth/, masks/ and cam_K.txt")
        self.metres_per_unit = float(depth_scale)
        rgb_dir = self.root / "rgb"
        if not rgb_dir.is_dir():
            raise SceneError(f"{rgb_dir} does not exist", "the scene folder needs rgb/, depth/, masks/ and cam_K.txt")
        self.rgb_files = sorted(p for p in rgb_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.rgb_files:
            raise SceneError(f"no images in {rgb_dir}", "put the colour frames there as PNG files")
        if not (self.root / "depth").is_dir():
            raise SceneError(f"{self.root / 'depth'} does not exist", "put uint16 millimetre depth PNGs there, same names as rgb/")
        self.K = read_intrinsics_file(self.root / "cam_K.txt")
        self.names = [p.stem for p in self.rgb_files]

    def __len__(self) -> int:
        return len(self.names)

    def has_ground_truth(self) -> bool:
        return (self.root / "annotated_poses" / f"{self.names[0]}.txt").is_file()

    def depth_path(self, name: str) -> Path:
        path = _find_file(self.root / "depth", name, DEPTH_EXTENSIONS)
        if path is None:
            raise SceneError(f"no depth image for frame {name} in {self.root / 'depth'}", "each rgb frame needs depth/<same name>.png")
        return path

    def mask_path(self, name: str) -> Path | None:
        return _find_file(self.root / "masks", name, IMAGE_EXTENSIONS)

    def frame(self, index: int, need_mask: bool = False) -> Frame:
        """Frame ``index``; with need_mask, a missing or empty mask is an error."""
        name = self.names[index]
        rgb = read_rgb_file(self.rgb_files[index])
        depth = read_depth_file(self.depth_path(name), self.metres_per_unit)
        mask_file = self.mask_path(name)
        mask = read_mask_file(mask_file) if mask_file is not None else None
        if need_mask:
            if mask is None:
                raise SceneError(
                    f"no mask for frame {name} (looked for {self.root / 'masks' / name}.png)",
                    "the first frame needs a mask of the object in masks/ with the same name as the rgb file",
                )
        gt = None
        pose_file = self.root / "annotated_poses" / f"{name}.txt"
        if pose_file.is_file():
            gt = read_pose_file(pose_file)
        frame = self._finish(name, rgb, depth, self.K, mask, gt)
        if need_mask and not frame.mask.any():
            raise SceneError(f"the mask of frame {name} is empty", "draw the object in masks/" + f"{name}.png (non-zero pixels)")
        return frame

    def __iter__(self):
        for i in range(len(self)):
            yield self.frame(i, need_mask=(i == 0))


# --------------------------------------------------------------------------- several objects

# Files of mesh/ that are meshes (an OBJ's .mtl and texture images sit next to them).
MESH_EXTENSIONS = (".obj", ".ply", ".stl", ".glb", ".gltf", ".off")


def scene_meshes(scene_dir) -> dict[str, Path]:
    """The meshes saved with a YCBInEOAT-style scene: {name (file stem): path} from
    ``scene_dir/mesh/`` (where FoundationPose's demo data and chunkpose.synth keep them),
    sorted by name; {} when there is no mesh/ folder. SceneError when two files share a
    name (mug.obj and mug.ply)."""
    folder = Path(scene_dir) / "mesh"
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in MESH_EXTENSIONS:
            continue
        if path.stem in found:
            raise SceneError(f"two meshes named {path.stem!r} in {folder}: {found[path.stem].name} and {path.name}",
                             "keep one file per object name")
        found[path.stem] = path
    return found


def _label_names(scene_dir: Path) -> dict[str, int]:
    """{name: label value} from labels.json ({} without it)."""
    path = scene_dir / "labels.json"
    if not path.is_file():
        return {}
    names = _load_json(path, "")
    if not isinstance(names, dict) or not all(isinstance(v, int) and v > 0 for v in names.values()):
        raise SceneError(f"{path} must map object names to label values (positive integers)",
                         'write it as {"mug": 1, "duck": 2}')
    return names


def _mask_folders(scene_dir: Path) -> dict[str, Path]:
    folder = scene_dir / "masks"
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir()}


def object_names(scene_dir) -> list[str]:
    """The objects of a scene with masks per object: the folders masks/<name>/ (sorted),
    else the names of labels.json (by label value); [] for a single-object scene
    (masks/<frame>.png)."""
    scene_dir = Path(scene_dir)
    folders = _mask_folders(scene_dir)
    if folders:
        return list(folders)
    labels = _label_names(scene_dir)
    return sorted(labels, key=labels.get)


def object_masks(scene_dir, frame_name: str) -> dict[str, np.ndarray]:
    """{object name: (H,W) bool mask} of frame ``frame_name`` (a file stem, "000000").

    From masks/<name>/<frame>.png where the scene has such folders (objects without a
    file for this frame are left out), else from labels/<frame>.png and labels.json (a
    pixel of value k belongs to the object mapped to k); {} when neither is there. Masks
    are at the images' native size (the readers' downscale is not applied)."""
    scene_dir = Path(scene_dir)
    folders = _mask_folders(scene_dir)
    if folders:
        out = {}
        for name, folder in folders.items():
            path = _find_file(folder, frame_name, IMAGE_EXTENSIONS)
            if path is not None:
                out[name] = read_mask_file(path)
        return out
    labels = _label_names(scene_dir)
    path = _find_file(scene_dir / "labels", frame_name, IMAGE_EXTENSIONS) if labels else None
    if path is None:
        return {}
    image = read_image_file(path, cv2.IMREAD_UNCHANGED)
    if image.ndim != 2:
        raise SceneError(f"label image {path} has {image.shape[2]} channels",
                         "store labels as a single-channel 8- or 16-bit PNG (0 = background)")
    return {name: image == value for name, value in sorted(labels.items(), key=lambda item: item[1])}


def object_poses(scene_dir, frame_name: str) -> dict[str, np.ndarray]:
    """{object name: (4,4) pose, metres} of frame ``frame_name`` from
    annotated_poses/<name>/<frame>.txt; {} for a scene without per-object poses."""
    folder = Path(scene_dir) / "annotated_poses"
    if not folder.is_dir():
        return {}
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        path = sub / f"{frame_name}.txt"
        if path.is_file():
            out[sub.name] = read_pose_file(path)
    return out


# --------------------------------------------------------------------------- BOP


@dataclass
class BopInstance:
    """One object instance of a BOP image to register.

    From the annotations (BOPReader.frame): gt_index is the position in scene_gt.json
    (mask_visib/{im:06d}_{gt_index:06d}.png), score None. From detections
    (BOPReader.detection_instances): gt_index is the detection's rank among the image's
    selected detections, gt_pose None, score the detector's.
    """

    im_id: int
    gt_index: int
    obj_id: int
    gt_pose: np.ndarray | None
    mask: np.ndarray
    score: float | None = None

    @property
    def name(self) -> str:
        return f"{self.im_id:06d}_{self.gt_index:06d}"


def _load_json(path: Path, fix: str):
    if not path.is_file():
        raise SceneError(f"missing {path}", fix)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SceneError(f"cannot parse {path}: {err.msg if hasattr(err, 'msg') else err}", "it must be valid JSON") from None


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()


def bop_symmetry_transforms(model_info: dict, scale: float = 0.001, continuous_step_deg: float = 5.0) -> np.ndarray:
    """The symmetry transforms (S,4,4) of one models_info.json entry, identity first.

    symmetries_discrete: 16 values each, a row-major 4x4 with its translation in model
    units (millimetres in BOP); symmetries_continuous: {axis, offset}, a rotation about the
    axis through the offset point, discretised every ``continuous_step_deg`` degrees. Every
    discrete symmetry is combined with every discretised continuous one (continuous after
    discrete). Translations are multiplied by ``scale`` (0.001: millimetres -> metres).
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


class BOPReader(_ResizingReader):
    """DATASET/{camera.json, models/obj_XXXXXX.ply, models/models_info.json} and
    DATASET/<split>/<scene_id:06d>/{scene_camera.json, rgb/ (or gray/), depth/} with, where
    the ground truth is given, scene_gt.json and mask_visib/.

    Depth in metres = raw * depth_scale (scene_camera.json, else camera.json) / 1000.
    Model files and models_info are in millimetres; ``model_info`` returns metres.

    Without scene_gt.json (a BOP test set, whose ground truth is withheld) the images are
    those of scene_camera.json; ``image`` reads one without instances and
    ``detection_instances`` makes the instances from detections.
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
            self.camera = _load_json(self.root / "camera.json", "")
        self.scene_camera = _load_json(self.scene_dir / "scene_camera.json", "a BOP scene needs scene_camera.json with cam_K per image")
        gt_path = self.scene_dir / "scene_gt.json"
        self.scene_gt = _load_json(gt_path, "") if gt_path.is_file() else None
        # with ground truth, the annotated images; without (a test set), every camera entry
        self.image_ids = sorted(int(k) for k in (self.scene_gt if self.scene_gt is not None else self.scene_camera))
        if not self.image_ids:
            raise SceneError(f"no images listed in {self.scene_dir}", "scene_camera.json (and scene_gt.json) must list the images")
        info_path = self.root / "models" / "models_info.json"
        self.models_info = {int(k): v for k, v in _load_json(info_path, "").items()} if info_path.is_file() else {}

    def __len__(self) -> int:
        return len(self.image_ids)

    def has_ground_truth(self) -> bool:
        """Whether the scene has scene_gt.json (annotated instances and poses)."""
        return self.scene_gt is not None

    def index_of(self, im_id: int) -> int:
        """Position of image ``im_id`` in ``image_ids`` (SceneError when absent)."""
        try:
            return self.image_ids.index(int(im_id))
        except ValueError:
            raise SceneError(f"image {im_id} is not in scene {self.scene_id} of {self.root}",
                             "check the detections / targets file against the dataset") from None

    def model_path(self, obj_id: int) -> Path:
        path = self.root / "models" / f"obj_{obj_id:06d}.ply"
        if not path.is_file():
            raise SceneError(f"missing model {path}", "the BOP dataset needs models/obj_XXXXXX.ply, or pass --mesh FILE")
        return path

    def model_info(self, obj_id: int) -> dict:
        """diameter (metres) and symmetric (bool) from models_info.json ({} when absent)."""
        info = self.models_info.get(int(obj_id))
        if info is None:
            return {}
        out = {}
        if "diameter" in info:
            out["diameter"] = float(info["diameter"]) / 1000.0
        out["symmetric"] = bool(info.get("symmetries_discrete") or info.get("symmetries_continuous"))
        return out

    def symmetry_transforms(self, obj_id: int, scale: float = 0.001, continuous_step_deg: float = 5.0):
        """(S,4,4) object-frame symmetries of a model from models_info.json, translations in
        metres (times ``scale``), or None when it lists none (see bop_symmetry_transforms)."""
        info = self.models_info.get(int(obj_id))
        if not info or not (info.get("symmetries_discrete") or info.get("symmetries_continuous")):
            return None
        return bop_symmetry_transforms(info, scale=scale, continuous_step_deg=continuous_step_deg)

    def intrinsics(self, im_id: int) -> tuple[np.ndarray, float]:
        """K (3,3) at native size and the depth scale (raw units -> mm) of an image."""
        cam = self.scene_camera.get(str(im_id))
        if cam is None or "cam_K" not in cam:
            raise SceneError(f"scene_camera.json has no cam_K for image {im_id}", "add it, or remove the image from scene_gt.json")
        K = np.array(cam["cam_K"], dtype=np.float64).reshape(3, 3)
        depth_scale = float(cam.get("depth_scale", self.camera.get("depth_scale", 1.0)))
        return K, depth_scale

    def _image_file(self, folder: str, im_id: int, extensions=IMAGE_EXTENSIONS) -> Path:
        path = _find_file(self.scene_dir / folder, f"{im_id:06d}", extensions)
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
        """Image ``index`` as a Frame without instances (mask None), resized like ``frame``;
        extra holds im_id, scene_id and depth_scale. Needs no ground truth."""
        im_id = self.image_ids[index]
        rgb, depth, K, depth_scale = self._read_raw(im_id)
        return self._finish(f"{im_id:06d}", rgb, depth, K, None, extra=self._extra(im_id, depth_scale))

    def detection_instances(self, frame: Frame, detections) -> list[BopInstance]:
        """Instances to register from detections of ``frame``'s image (e.g. the list
        chunkpose.io.bop.select_detections gives for it), in the given order.

        Each detection's mask (decoded from its RLE at the native image size) is resized
        like the frame; detections without a mask, or whose mask is empty after resizing,
        are left out. gt_index is the detection's position in ``detections``.
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
                continue
            if scaled_size(*mask.shape, factor) != tuple(frame.size):
                raise SceneError(
                    f"detection mask of image {im_id} is {mask.shape[1]}x{mask.shape[0]}, which does not match the "
                    f"image ({frame.size[1]}x{frame.size[0]} after resizing by {factor:g})",
                    "the detections must come from this dataset's images")
            mask = _resize_nearest(mask, frame.size)
            if mask.any():
                out.append(BopInstance(im_id, rank, int(det.obj_id), None, mask, score=float(det.score)))
        return out

    def frame(self, index: int) -> tuple[Frame, list[BopInstance]]:
        """Image ``index`` and its annotated instances that have a non-empty mask_visib.

        The Frame's mask is the union of the instance masks; instance masks are resized like
        the images. Without scene_gt.json the instance list is empty (see ``image``).
        """
        if self.scene_gt is None:
            return self.image(index), []
        im_id = self.image_ids[index]
        name = f"{im_id:06d}"
        rgb, depth, K, depth_scale = self._read_raw(im_id)
        raw_instances = []
        for gt_index, gt in enumerate(self.scene_gt[str(im_id)]):
            mask_file = _find_file(self.scene_dir / "mask_visib", f"{im_id:06d}_{gt_index:06d}", IMAGE_EXTENSIONS)
            if mask_file is None:
                continue
            mask = read_mask_file(mask_file)
            _check_same_size(name, f"mask_visib {mask_file.name}", mask.shape, rgb.shape)
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
        for gt_index, obj_id, pose, mask in raw_instances:
            mask = _resize_nearest(mask, frame.size)
            if mask.any():
                instances.append(BopInstance(im_id, gt_index, obj_id, pose, mask))
        return frame, instances

    def __iter__(self):
        for i in range(len(self)):
            yield self.frame(i)


def open_scene(path, **kwargs):
    """A reader for a folder: BOP when ``split``/``scene_id`` are given, else YCBInEOAT."""
    if "scene_id" in kwargs:
        return BOPReader(path, **kwargs)
    return YCBInEOATReader(path, **kwargs)


__all__ = [
    "BOPReader", "BopInstance", "Frame", "SceneError", "YCBInEOATReader", "object_masks", "object_names",
    "object_poses", "open_scene", "read_depth_file", "read_intrinsics_file", "read_mask_file", "read_pose_file",
    "read_rgb_file", "resize_factor", "scale_intrinsics", "scaled_size", "scene_meshes",
]
