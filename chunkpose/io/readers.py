"""Scene readers: the YCBInEOAT folder layout FoundationPose users have (one object or
several, each with masks/<name>/ and annotated_poses/<name>/, or a labels/ image per
frame), and `open_scene`, which picks the reader for a folder (BOP scenes:
chunkpose.io.bop_reader).

Frames are in chunkpose conventions (chunkpose.io.scene_files): rgb uint8 (H,W,3), depth
float32 metres, mask bool or None, K float64 (3,3), ground-truth pose (4,4) metres or None.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from chunkpose.io.bop_reader import BOPReader
from chunkpose.io.scene_files import (
    DEPTH_EXTENSIONS, IMAGE_EXTENSIONS, Frame, ResizingReader, SceneError, find_file, listed, load_json,
    read_depth_file, read_image_file, read_intrinsics_file, read_mask_file, read_pose_file, read_rgb_file,
)

class YCBInEOATReader(ResizingReader):
    """scene/rgb/*.png, scene/depth/*.png (uint16 mm), scene/masks/*.png (first frame at least),
    scene/cam_K.txt, optional scene/annotated_poses/*.txt (4x4, metres).

    Frames are the rgb files sorted by name; depth, masks and poses share the file stem.
    Iterating yields every frame (the first with need_mask=True).

    Args:
        scene_dir: the scene folder (str or Path).
        downscale: factor for both image axes, or None.
        shorter_side: target shorter side in pixels (wins over downscale), or None.
        zfar: depth at or beyond this many metres becomes 0; None = no limit.
        depth_scale: metres per raw depth unit (default 0.001: millimetres).

    Raises:
        SceneError: the folder, rgb/ or depth/ is missing, rgb/ holds no images, or cam_K.txt is
            missing or invalid; also for a non-positive zfar.
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
        self.rgb_files = [p for p in listed(rgb_dir) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.rgb_files:
            raise SceneError(f"no images in {rgb_dir}", "put the colour frames there as PNG files")
        if not (self.root / "depth").is_dir():
            raise SceneError(f"{self.root / 'depth'} does not exist", "put uint16 millimetre depth PNGs there, same names as rgb/")
        self.K = read_intrinsics_file(self.root / "cam_K.txt")
        self.names = [p.stem for p in self.rgb_files]
        self.pose_files = self._pose_files()

    def __len__(self) -> int:
        return len(self.names)

    def has_ground_truth(self) -> bool:
        """Whether the first frame has a ground-truth pose (annotated_poses/<frame>.txt, or the
        first of one file per frame there).

        Returns:
            bool.
        """
        return self.pose_files[0] is not None

    def _pose_files(self) -> list:
        """annotated_poses/<frame>.txt per frame (None where missing); when no name matches but
        there is one .txt per frame, the sorted files by position, as upstream's reader takes them."""
        folder = self.root / "annotated_poses"
        if not folder.is_dir():
            return [None] * len(self.names)
        by_name = [folder / f"{name}.txt" for name in self.names]
        if any(p.is_file() for p in by_name):
            return [p if p.is_file() else None for p in by_name]
        files = [p for p in listed(folder) if p.is_file() and p.suffix == ".txt"]
        return files if len(files) == len(self.names) else [None] * len(self.names)

    def depth_path(self, name: str) -> Path:
        """The depth file of frame ``name`` in depth/.

        Args:
            name: the frame's file stem.

        Returns:
            Path.

        Raises:
            SceneError: there is no depth file for the frame.
        """
        path = self._companion_file("depth", name, DEPTH_EXTENSIONS)
        if path is None:
            raise SceneError(f"no depth image for frame {name} in {self.root / 'depth'}", "each rgb frame needs depth/<same name>.png")
        return path

    def mask_path(self, name: str) -> Path | None:
        """The mask file of frame ``name`` in masks/, or None.

        Args:
            name: the frame's file stem.

        Returns:
            Path or None.
        """
        return self._companion_file("masks", name, IMAGE_EXTENSIONS)

    def _companion_file(self, folder: str, name: str, extensions) -> Path | None:
        """``folder/<name>.<ext>``, else the name with "rgb" replaced by the folder's name
        (rgb/rgb_000001.png with depth/depth_000001.png: upstream finds a frame's files by that
        replacement)."""
        path = find_file(self.root / folder, name, extensions)
        if path is None and "rgb" in name:
            path = find_file(self.root / folder, name.replace("rgb", folder), extensions)
        return path

    def frame(self, index: int, need_mask: bool = False) -> Frame:
        """Frame ``index``; with need_mask, a missing or empty mask is an error.

        Args:
            index: position in ``names`` (0-based).
            need_mask: require a non-empty mask (default False).

        Returns:
            Frame: rgb (H,W,3) uint8, depth (H,W) float32 metres, K (3,3) float64, mask (H,W) bool or
            None, gt_pose (4,4) float64 metres or None, resized as configured.

        Raises:
            SceneError: a file is missing or unreadable, sizes differ, or (need_mask) the mask is
                missing or empty.
        """
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
        pose_file = self.pose_files[index]
        if pose_file is not None:
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
    """The meshes saved with a YCBInEOAT-style scene, from ``scene_dir/mesh/`` (where
    FoundationPose's demo data and chunkpose.synth keep them), sorted by name.

    Args:
        scene_dir: the scene folder.

    Returns:
        dict {name (file stem): path}; {} when there is no mesh/ folder.

    Raises:
        SceneError: two files share a name (mug.obj and mug.ply).
    """
    folder = Path(scene_dir) / "mesh"
    if not folder.is_dir():
        return {}
    found = {}
    for path in listed(folder):
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
    names = load_json(path, "")
    if not isinstance(names, dict) or not all(isinstance(v, int) and v > 0 for v in names.values()):
        raise SceneError(f"{path} must map object names to label values (positive integers)",
                         'write it as {"mug": 1, "duck": 2}')
    return names


def _mask_folders(scene_dir: Path) -> dict[str, Path]:
    folder = scene_dir / "masks"
    if not folder.is_dir():
        return {}
    return {p.name: p for p in listed(folder) if p.is_dir()}


def object_names(scene_dir) -> list[str]:
    """The objects of a scene with masks per object.

    The folders masks/<name>/ (sorted), else the names of labels.json (by label value).

    Args:
        scene_dir: the scene folder.

    Returns:
        list of names; [] for a single-object scene (masks/<frame>.png).

    Raises:
        SceneError: labels.json is invalid.
    """
    scene_dir = Path(scene_dir)
    folders = _mask_folders(scene_dir)
    if folders:
        return list(folders)
    labels = _label_names(scene_dir)
    return sorted(labels, key=labels.get)


def object_masks(scene_dir, frame_name: str) -> dict[str, np.ndarray]:
    """{object name: (H,W) bool mask} of frame ``frame_name`` (a file stem, "000000").

    From masks/<name>/<frame>.png where the scene has such folders (objects without a file for
    this frame are left out), else from labels/<frame>.png and labels.json (a pixel of value k
    belongs to the object mapped to k). Masks are at the images' native size (the readers'
    downscale is not applied).

    Args:
        scene_dir: the scene folder.
        frame_name: the frame's file stem.

    Returns:
        dict of name -> (H,W) bool array; {} when neither source is there.

    Raises:
        SceneError: an unreadable mask, a multi-channel label image, or an invalid labels.json.
    """
    scene_dir = Path(scene_dir)
    folders = _mask_folders(scene_dir)
    if folders:
        out = {}
        for name, folder in folders.items():
            path = find_file(folder, frame_name, IMAGE_EXTENSIONS)
            if path is not None:
                out[name] = read_mask_file(path)
        return out
    labels = _label_names(scene_dir)
    path = find_file(scene_dir / "labels", frame_name, IMAGE_EXTENSIONS) if labels else None
    if path is None:
        return {}
    image = read_image_file(path, cv2.IMREAD_UNCHANGED)
    if image.ndim != 2:
        raise SceneError(f"label image {path} has {image.shape[2]} channels",
                         "store labels as a single-channel 8- or 16-bit PNG (0 = background)")
    return {name: image == value for name, value in sorted(labels.items(), key=lambda item: item[1])}


def object_poses(scene_dir, frame_name: str) -> dict[str, np.ndarray]:
    """{object name: (4,4) pose, metres} of frame ``frame_name`` from
    annotated_poses/<name>/<frame>.txt.

    Args:
        scene_dir: the scene folder.
        frame_name: the frame's file stem.

    Returns:
        dict of name -> (4,4) float64; {} for a scene without per-object poses.

    Raises:
        SceneError: a pose file cannot be parsed.
    """
    folder = Path(scene_dir) / "annotated_poses"
    if not folder.is_dir():
        return {}
    out = {}
    for sub in (p for p in listed(folder) if p.is_dir()):
        path = sub / f"{frame_name}.txt"
        if path.is_file():
            out[sub.name] = read_pose_file(path)
    return out


def open_scene(path, **kwargs):
    """A reader for a folder: BOP when ``split``/``scene_id`` are given, else YCBInEOAT.

    Args:
        path: the scene folder (YCBInEOAT) or the BOP dataset folder.
        **kwargs: the reader's arguments (BOPReader when ``scene_id`` is among them).

    Returns:
        BOPReader or YCBInEOATReader.

    Raises:
        SceneError: the reader cannot open the folder.
    """
    if "scene_id" in kwargs:
        return BOPReader(path, **kwargs)
    return YCBInEOATReader(path, **kwargs)


__all__ = ["YCBInEOATReader", "object_masks", "object_names", "object_poses", "open_scene", "scene_meshes"]
