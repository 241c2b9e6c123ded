"""BOP files a run reads: default detections and test targets (results: chunkpose.io.bop_results).

What BOP's documentation and toolkit define, in our own code:

- Detections (the BOP default detections / segmentations, COCO style JSON): a list of
  ``{scene_id, image_id, category_id, score, bbox [x, y, w, h], segmentation: RLE, time}``.
  ``category_id`` is the object id. ``segmentation`` is a COCO run-length encoding of the
  visible mask, ``size`` [h, w], runs over the pixels in column-major order (down the
  first column, then the next), alternating background / object and starting with
  background. ``counts`` is either a list of ints (uncompressed) or COCO's compressed
  string. ``time`` is, as BOP documents it, the time taken to detect all objects in the
  image: every detection of an image carries the same value.
- Test targets (``test_targets_bop19.json``): ``[{scene_id, im_id, obj_id, inst_count}]``,
  which images to estimate and how many instances of each object.
- BOP19 selection: for a target (image, object, n) the n detections of that object in that
  image with the highest scores are registered; images without a target are skipped and
  a target without detections simply has no estimate.
Units follow BOP in files (millimetres) and chunkpose in memory (metres) where noted.
"""
from __future__ import annotations

import gzip
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chunkpose.errors import InputError
from chunkpose.io.scene_files import SceneError

TARGETS_FILENAME = "test_targets_bop19.json"
# Detection times of one image may differ by float noise; BOP's checker allows 1 ms.
TIME_TOLERANCE_S = 0.001

class BopFileError(SceneError):
    """A BOP detections / targets / results file that cannot be used (what + how to fix)."""


# --------------------------------------------------------------------------- RLE


def encode_rle(mask, compressed: bool = True) -> dict:
    """COCO run-length encoding of a binary mask.

    Args:
        mask: (H, W) bool (or anything non-zero = object).
        compressed: True for COCO's compressed ``counts`` string (what BOP's default
            detections use), False for the plain list of run lengths.
    Returns:
        {"size": [H, W], "counts": str or list[int]}.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"mask: expected a (H, W) array, got shape {mask.shape}")
    mask = mask.astype(bool)
    if compressed:
        from pycocotools import mask as coco_mask

        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}
    flat = mask.ravel(order="F")
    # run boundaries: where the value changes, plus both ends; the first run is background
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def decode_rle(rle: dict) -> np.ndarray:
    """The (H, W) bool mask of a COCO RLE dict (compressed string or list ``counts``)."""
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise InputError("rle: expected a dict with 'counts' and 'size' (COCO run-length encoding)")
    size = rle["size"]
    if len(size) != 2 or int(size[0]) < 0 or int(size[1]) < 0:
        raise InputError(f"rle: 'size' must be [height, width], got {size!r}")
    height, width = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        from pycocotools import mask as coco_mask

        counts = counts.encode("ascii") if isinstance(counts, str) else counts
        with warnings.catch_warnings():  # pycocotools' own numpy-2 DeprecationWarning, not ours
            warnings.simplefilter("ignore", DeprecationWarning)
            return coco_mask.decode({"size": [height, width], "counts": counts}).astype(bool)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != height * width:
        raise InputError(f"rle: the run lengths add up to {int(counts.sum())}, not height x width = {height * width}")
    values = np.arange(len(counts)) % 2 == 1  # runs alternate background, object, ...
    flat = np.repeat(values, counts)
    return flat.reshape((height, width), order="F")


def mask_bbox(mask) -> list[int]:
    """[x, y, w, h] of a mask's pixels with w = x_max - x_min + 1 (COCO's pixel box, which
    bop_toolkit's binary-mask helper also uses); [-1, -1, 0, 0] for an empty mask."""
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        return [-1, -1, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


# --------------------------------------------------------------------------- detections


@dataclass
class Detection:
    """One 2D detection of an object in a BOP image.

    obj_id is the file's category_id; bbox [x, y, w, h] in pixels; time in seconds (None
    when the file gives none or a negative value, BOP's "unknown"); rle the COCO
    segmentation (None for box-only detections). ``mask`` decodes it on each access.
    """

    scene_id: int
    im_id: int
    obj_id: int
    score: float
    bbox: tuple
    rle: dict | None = field(default=None, repr=False)
    time: float | None = None

    @property
    def mask(self) -> np.ndarray | None:
        """(H, W) bool visible mask, decoded from ``rle`` (None without segmentation)."""
        return None if self.rle is None else decode_rle(self.rle)

    @property
    def key(self) -> tuple[int, int]:
        return self.scene_id, self.im_id

    def to_json(self) -> dict:
        out = {
            "scene_id": int(self.scene_id), "image_id": int(self.im_id), "category_id": int(self.obj_id),
            "score": float(self.score), "bbox": [float(v) for v in self.bbox],
            "time": -1.0 if self.time is None else float(self.time),
        }
        if self.rle is not None:
            out["segmentation"] = self.rle
        return out


def detection_from_mask(scene_id: int, im_id: int, obj_id: int, score: float, mask, time: float | None = None,
                        compressed: bool = True) -> Detection:
    """A Detection whose box and RLE come from a (H, W) bool mask."""
    mask = np.asarray(mask, dtype=bool)
    return Detection(int(scene_id), int(im_id), int(obj_id), float(score), tuple(mask_bbox(mask)),
                     encode_rle(mask, compressed=compressed), time)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf8") if path.name.endswith(".gz") else open(path, encoding="utf8")


def _load_json_file(path, what: str, fix: str):
    path = Path(path)
    if not path.is_file():
        raise BopFileError(f"{what} file {path} does not exist", fix)
    try:
        with _open_text(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise BopFileError(f"cannot parse {what} file {path}: {err}", "it must be a JSON list (optionally .json.gz)") from None


def _number(entry: dict, key: str, kind, where: str):
    if key not in entry:
        raise BopFileError(f"{where} has no {key!r}", "BOP detections need scene_id, image_id, category_id, score (and bbox, segmentation, time)")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise BopFileError(f"{where}: {key} is {value!r}", f"{key} must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def parse_detections(entries, source: str = "detections") -> list[Detection]:
    """Detections from a loaded BOP detections list (see the module docstring)."""
    if not isinstance(entries, list):
        raise BopFileError(f"{source} holds a {type(entries).__name__}", "BOP detections are a JSON list of dicts")
    out = []
    for i, entry in enumerate(entries):
        where = f"{source} entry {i}"
        if not isinstance(entry, dict):
            raise BopFileError(f"{where} is not a dict", "each detection is a dict with scene_id, image_id, category_id, score, ...")
        scene_id = _number(entry, "scene_id", int, where)
        im_id = _number(entry, "image_id" if "image_id" in entry else "im_id", int, where)
        obj_id = _number(entry, "category_id" if "category_id" in entry else "obj_id", int, where)
        score = _number(entry, "score", float, where)
        bbox = tuple(float(v) for v in entry.get("bbox") or ())
        if bbox and len(bbox) != 4:
            raise BopFileError(f"{where}: bbox has {len(bbox)} values", "bbox must be [x, y, width, height]")
        rle = entry.get("segmentation") or None
        if rle is not None and (not isinstance(rle, dict) or "counts" not in rle or "size" not in rle):
            raise BopFileError(f"{where}: segmentation is not an RLE dict",
                               "segmentation must be COCO RLE {'counts': ..., 'size': [h, w]} (polygons are not supported)")
        time = entry.get("time")
        time = None if time is None or float(time) < 0 else float(time)
        out.append(Detection(scene_id, im_id, obj_id, score, bbox, rle, time))
    return out


def read_detections(path) -> dict[tuple[int, int], list[Detection]]:
    """BOP detections JSON (.json or .json.gz) -> {(scene_id, im_id): [Detection, ...]}.

    Detections keep their order in the file within an image (the order breaks score ties).
    """
    entries = _load_json_file(path, "detections", "pass the BOP default detections JSON, e.g. --detections FILE")
    by_image: dict[tuple[int, int], list[Detection]] = {}
    for det in parse_detections(entries, source=str(path)):
        by_image.setdefault(det.key, []).append(det)
    return by_image


def write_detections(path, detections) -> Path:
    """Write Detections (an iterable, or the dict read_detections returns) as BOP JSON."""
    if isinstance(detections, dict):
        detections = [d for key in sorted(detections) for d in detections[key]]
    items = [d.to_json() for d in detections]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.writing")
    with (gzip.open(tmp, "wt", encoding="utf8") if path.name.endswith(".gz") else open(tmp, "w", encoding="utf8")) as f:
        json.dump(items, f)
    tmp.replace(path)  # never a half-written file at ``path``
    return path


def detections_from_mask_visib(dataset_dir, split: str = "test", scene_id: int = 1, score: float = 1.0,
                               time: float | None = None) -> list[Detection]:
    """Detections made from a BOP scene's ground-truth visible masks (mask_visib/), one
    per annotated instance with a non-empty mask, all scored ``score``: a detections file
    for a split with annotations, to run as if a perfect detector had been used."""
    import cv2

    scene_dir = Path(dataset_dir) / split / f"{int(scene_id):06d}"
    scene_gt = _load_json_file(scene_dir / "scene_gt.json", "ground truth", "the scene needs scene_gt.json and mask_visib/")
    out = []
    for key in sorted(scene_gt, key=int):
        for gt_index, gt in enumerate(scene_gt[key]):
            path = scene_dir / "mask_visib" / f"{int(key):06d}_{gt_index:06d}.png"
            mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path.is_file() else None
            if mask is None:
                continue
            mask = (mask.max(axis=2) if mask.ndim == 3 else mask) > 0
            if mask.any():
                out.append(detection_from_mask(scene_id, int(key), int(gt["obj_id"]), score, mask, time))
    return out


def image_detection_time(detections) -> float | None:
    """Seconds the detector spent on one image, to add to the image's pose time.

    BOP gives every detection of an image the time for the whole image, so this is that
    common value, computed over all the image's detections (not only the registered ones:
    the detector ran once on the image). Values that differ by more than 1 ms are a broken
    file; we warn and take the largest. None when no detection carries a time.
    """
    times = [d.time for d in detections if d.time is not None]
    if not times:
        return None
    if max(times) - min(times) > TIME_TOLERANCE_S:
        d = detections[0]
        warnings.warn(f"detections of scene {d.scene_id} image {d.im_id} carry different times "
                      f"({min(times):.4f}..{max(times):.4f} s); using the largest", stacklevel=2)
    return float(max(times))


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One BOP19 estimation target: inst_count instances of obj_id in an image."""

    scene_id: int
    im_id: int
    obj_id: int
    inst_count: int

    def to_json(self) -> dict:
        return {"im_id": self.im_id, "inst_count": self.inst_count, "obj_id": self.obj_id, "scene_id": self.scene_id}


def read_targets(path) -> list[Target]:
    """test_targets_bop19.json -> [Target] in file order."""
    entries = _load_json_file(path, "targets", "pass test_targets_bop19.json of the dataset (--targets FILE)")
    if not isinstance(entries, list):
        raise BopFileError(f"targets file {path} holds a {type(entries).__name__}", "it must be a list of {scene_id, im_id, obj_id, inst_count}")
    out = []
    for i, entry in enumerate(entries):
        where = f"targets file {path} entry {i}"
        if not isinstance(entry, dict):
            raise BopFileError(f"{where} is not a dict", "each target is {scene_id, im_id, obj_id, inst_count}")
        for key in ("scene_id", "im_id", "obj_id", "inst_count"):
            if key not in entry:
                raise BopFileError(f"{where} has no {key!r}",
                                   "BOP19 targets need scene_id, im_id, obj_id and inst_count (a BOP24 file lists images only)")
        out.append(Target(*(_number(entry, k, int, where) for k in ("scene_id", "im_id", "obj_id", "inst_count"))))
    return out


def write_targets(path, targets) -> Path:
    """Write [Target] as test_targets_bop19.json (one target per line, like BOP's files)."""
    path = Path(path)
    lines = ",\n".join("  " + json.dumps(t.to_json(), sort_keys=True) for t in targets)
    path.write_text("[\n" + lines + "\n]\n" if lines else "[]\n")
    return path


def targets_by_image(targets) -> dict[tuple[int, int], dict[int, int]]:
    """{(scene_id, im_id): {obj_id: inst_count}} in first-seen order; a repeated (image,
    object) keeps its last inst_count, as bop_toolkit's evaluation reads a targets file."""
    out: dict[tuple[int, int], dict[int, int]] = {}
    for t in targets:
        out.setdefault((t.scene_id, t.im_id), {})[t.obj_id] = t.inst_count
    return out


def default_targets_path(dataset_dir) -> Path | None:
    """DATASET/test_targets_bop19.json when present, else None."""
    path = Path(dataset_dir) / TARGETS_FILENAME
    return path if path.is_file() else None


def select_detections(detections, targets, scene_id: int | None = None) -> dict[tuple[int, int], list[Detection]]:
    """BOP19's choice of detections to register: per target (image, object, n), the n
    detections of that object in that image with the highest scores.

    Args:
        detections: {(scene_id, im_id): [Detection]} (read_detections) or a list.
        targets: [Target] (read_targets).
        scene_id: keep only this scene's images (None: all).
    Returns:
        {(scene_id, im_id): [Detection]} for every target image, in target order, with
        each image's detections grouped by object in target order and by decreasing score
        (ties keep the file order). An image whose targets have no detection maps to [].
        Images without targets and objects not in an image's targets are left out.
    """
    if not isinstance(detections, dict):
        grouped: dict[tuple[int, int], list[Detection]] = {}
        for d in detections:
            grouped.setdefault(d.key, []).append(d)
        detections = grouped
    out: dict[tuple[int, int], list[Detection]] = {}
    for key, objects in targets_by_image(targets).items():
        if scene_id is not None and key[0] != int(scene_id):
            continue
        chosen = []
        available = detections.get(key, [])
        for obj_id, count in objects.items():
            same = [d for d in available if d.obj_id == obj_id]
            same.sort(key=lambda d: -d.score)  # stable: equal scores keep the file order
            chosen.extend(same[: max(int(count), 0)])
        out[key] = chosen
    return out


__all__ = [
    "BopFileError", "Detection", "TARGETS_FILENAME", "Target", "decode_rle", "default_targets_path",
    "detection_from_mask", "detections_from_mask_visib", "encode_rle", "image_detection_time", "mask_bbox",
    "parse_detections", "read_detections", "read_targets", "select_detections", "targets_by_image",
    "write_detections", "write_targets",
]
