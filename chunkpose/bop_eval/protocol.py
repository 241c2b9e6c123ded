"""Score a BOP results CSV against a BOP dataset's ground truth: BOP19's average recall
(VSD, MSSD, MSPD) and the ADD(-S) area under the curve, without bop_toolkit.

    result = evaluate("datasets/ycbv", "out/chunkpose_ycbv-test.csv")
    print(format_table(result)); plot(result, "out/recall.png")

What is evaluated follows bop_toolkit's eval_bop19_pose.py (see errors.py, matching.py and
scores.py for each definition): the targets of test_targets_bop19.json, the top
inst_count estimates per target, errors w.r.t. every ground-truth instance of the object
in the image (image_errors.py), greedy matching per threshold, recall over all targets
(summary.py).

ADD(-S) (not part of BOP19; the YCB-Video numbers FoundationPose reports) uses the same
targets and estimates: each valid instance gets the error of the estimate greedily matched
to it with no threshold (inf when none), ADD-S for objects models_info.json lists
symmetries for and ADD for the others; AUC over 0..10 cm and recall below 0.1 diameter come
from chunkpose.metrics.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from chunkpose.bop_eval import errors as E
from chunkpose.bop_eval.image_errors import METRICS, ImageContext, object_errors, pose_m
from chunkpose.bop_eval.matching import top_estimates, valid_gt
from chunkpose.bop_eval.scores import ObjectErrors
from chunkpose.bop_eval.summary import ADD_THRESHOLDS_M, summarise
from chunkpose.io.bop import BopFileError, Target, default_targets_path, read_targets, targets_by_image
from chunkpose.io.bop_results import bop_dataset_name, parse_results_filename, read_bop_results

# BOP's rule for the instances test_targets_bop19.json lists.
TARGET_VISIB_MIN = 0.1


class EvaluationError(BopFileError):
    """The dataset or the results cannot be evaluated (what + how to fix)."""


def _load_json(path: Path, fix: str):
    if not path.is_file():
        raise EvaluationError(f"missing {path}", fix)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationError(f"cannot parse {path}: {err.msg}", "it must be valid JSON") from None


class _Models:
    """Evaluation models (models_eval/, else models/) in mm, their info and renderers."""

    def __init__(self, root: Path, renderer_factory, max_sym_disc_step: float):
        self.folder = root / "models_eval" if (root / "models_eval").is_dir() else root / "models"
        info_path = self.folder / "models_info.json"
        if not info_path.is_file():
            info_path = root / "models" / "models_info.json"
        self.info = {int(k): v for k, v in _load_json(info_path, "a BOP dataset needs models/models_info.json").items()}
        self.renderer_factory = renderer_factory
        self.max_sym_disc_step = max_sym_disc_step
        self._meshes, self._renderers, self._syms = {}, {}, {}

    def diameter(self, obj_id: int) -> float:
        info = self.info.get(obj_id)
        if info is None or "diameter" not in info:
            raise EvaluationError(f"models_info.json has no diameter for object {obj_id}",
                                  "every evaluated object needs its diameter (mm) in models_info.json")
        return float(info["diameter"])

    def symmetric(self, obj_id: int) -> bool:
        info = self.info.get(obj_id, {})
        return bool(info.get("symmetries_discrete") or info.get("symmetries_continuous"))

    def symmetries(self, obj_id: int) -> np.ndarray:
        if obj_id not in self._syms:
            self._syms[obj_id] = E.eval_symmetries(self.info.get(obj_id, {}), self.max_sym_disc_step)
        return self._syms[obj_id]

    def mesh(self, obj_id: int):
        if obj_id not in self._meshes:
            from chunkpose.io.mesh import load_mesh

            path = self.folder / f"obj_{obj_id:06d}.ply"
            if not path.is_file():
                raise EvaluationError(f"missing model {path}", "the dataset needs models_eval/ or models/obj_XXXXXX.ply")
            self._meshes[obj_id] = load_mesh(path, scale=0.001)
        return self._meshes[obj_id]

    def points_mm(self, obj_id: int) -> np.ndarray:
        return np.asarray(self.mesh(obj_id).trimesh.vertices, dtype=np.float64) * 1000.0

    def renderer(self, obj_id: int):
        if obj_id not in self._renderers:
            self._renderers[obj_id] = self.renderer_factory(self.mesh(obj_id))
        return self._renderers[obj_id]


def _read_depth_mm(scene_dir: Path, im_id: int, depth_scale: float) -> np.ndarray:
    import cv2

    for ext in (".png", ".tif", ".tiff"):
        path = scene_dir / "depth" / f"{im_id:06d}{ext}"
        if path.is_file():
            raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise EvaluationError(f"cannot read {path}", "depth must be a 16-bit PNG or TIFF")
            if raw.ndim == 3:
                raw = raw[..., 0]
            return raw.astype(np.float32) * np.float32(depth_scale)
    raise EvaluationError(f"missing depth image {scene_dir / 'depth' / f'{im_id:06d}'}.png", "VSD needs the test depth images")


def _gt_info_for_scene(scene_dir: Path, scene_gt: dict, scene_camera: dict, models: _Models, delta: float) -> dict:
    """scene_gt_info.json, or (when missing) its visib_fract computed as calc_gt_info does."""
    path = scene_dir / "scene_gt_info.json"
    if path.is_file():
        info = _load_json(path, "")
        if all("visib_fract" in i for key in scene_gt for i in info.get(key, [None] * len(scene_gt[key])) if i):
            return info
    from chunkpose.io.bop_gt import gt_info, render_model_depth_mm

    warnings.warn(f"{path} is missing or has no visib_fract; computing the visibility of each instance as "
                  "bop_toolkit's calc_gt_info does", stacklevel=5)  # evaluate's caller, via _SceneGt
    out = {}
    for key, gts in scene_gt.items():
        cam = scene_camera[key]
        K = np.asarray(cam["cam_K"], np.float64).reshape(3, 3)
        depth = _read_depth_mm(scene_dir, int(key), float(cam.get("depth_scale", 1.0)))
        infos = []
        for gt in gts:
            obj_id = int(gt["obj_id"])
            mesh = models.mesh(obj_id)
            model_depth, offset = render_model_depth_mm(models.renderer(obj_id), mesh.vertices,
                                                        pose_m(gt["cam_R_m2c"], gt["cam_t_m2c"]), K,
                                                        depth.shape[1], depth.shape[0])
            infos.append(gt_info(depth, K, model_depth, offset, delta)[0])
        out[key] = infos
    return out


def _derive_targets(root: Path, split: str, scene_ids) -> list[Target]:
    targets = []
    for scene_id in scene_ids:
        scene_dir = root / split / f"{scene_id:06d}"
        scene_gt = _load_json(scene_dir / "scene_gt.json", "evaluation needs the ground truth (scene_gt.json)")
        info = _load_json(scene_dir / "scene_gt_info.json", "without a targets file, targets come from scene_gt_info.json")
        for key in sorted(scene_gt, key=int):
            counts = {}
            for gt, gi in zip(scene_gt[key], info[key]):
                if gi.get("visib_fract", 0.0) >= TARGET_VISIB_MIN:
                    counts[int(gt["obj_id"])] = counts.get(int(gt["obj_id"]), 0) + 1
            targets += [Target(scene_id, int(key), o, n) for o, n in counts.items()]
    return targets


def _method_and_dataset(results_csv, root: Path, dataset_name: str | None) -> tuple[str, str]:
    """The method and BOP's dataset name, from BOP's results file name when it follows it."""
    try:
        name = parse_results_filename(results_csv)
        method, file_dataset = name["method"], name["dataset"]
    except ValueError:
        method, file_dataset = Path(str(results_csv)).stem, None
    return method, dataset_name or file_dataset or bop_dataset_name(root)


def _vsd_delta(dataset: str, vsd_delta_mm: float | None) -> float:
    if vsd_delta_mm is not None:
        return float(vsd_delta_mm)
    return E.VSD_DELTA_MM_BY_DATASET.get(dataset, E.VSD_DELTA_MM)


def _default_renderer_factory(device):
    from chunkpose.ops.render import make_renderer

    def renderer_factory(mesh):
        return make_renderer(mesh, device)

    return renderer_factory


def _load_targets(root: Path, split: str, targets_path, rows) -> list[Target]:
    """The targets file (the dataset's by default), else targets derived from the scenes of
    the results."""
    if targets_path is None:
        targets_path = default_targets_path(root)
    if targets_path is not None:
        return read_targets(targets_path)
    scene_ids = sorted({r["scene_id"] for r in rows})
    warnings.warn(f"no {root / 'test_targets_bop19.json'}: the targets are the instances with visib_fract >= 0.1 "
                  f"of scenes {scene_ids}", stacklevel=3)  # evaluate's caller
    return _derive_targets(root, split, scene_ids)


def _estimates_by_object(rows) -> dict[tuple[int, int, int], list[dict]]:
    """(scene_id, im_id, obj_id) -> its rows, in the file's order."""
    by_est: dict[tuple[int, int, int], list[dict]] = {}
    for row in rows:
        by_est.setdefault((row["scene_id"], row["im_id"], row["obj_id"]), []).append(row)
    return by_est


def _camera_width(root: Path) -> float | None:
    camera_path = root / "camera.json"
    return json.loads(camera_path.read_text()).get("width") if camera_path.is_file() else None


class _ImageGt(NamedTuple):
    scene_id: int
    im_id: int
    scene_dir: Path
    gts: list[dict]
    infos: list[dict]
    camera: dict


class _SceneGt:
    """The ground truth of a split's scenes, each read (and its gt_info computed, when the
    dataset lacks it) only when a target first needs the scene, then kept for its other images."""

    def __init__(self, split_dir: Path, models: _Models, delta: float):
        self.split_dir, self.models, self.delta = split_dir, models, delta
        self._scenes: dict[int, tuple[Path, dict, dict, dict]] = {}

    def image(self, scene_id: int, im_id: int) -> _ImageGt:
        if scene_id not in self._scenes:
            self._scenes[scene_id] = self._load(scene_id)
        scene_dir, scene_gt, scene_camera, info = self._scenes[scene_id]
        key = str(im_id)
        if key not in scene_gt:
            raise EvaluationError(f"scene {scene_id} has no ground truth for target image {im_id}",
                                  "the targets file does not belong to this dataset split")
        return _ImageGt(scene_id, im_id, scene_dir, scene_gt[key], info[key], scene_camera[key])

    def _load(self, scene_id: int) -> tuple[Path, dict, dict, dict]:
        scene_dir = self.split_dir / f"{scene_id:06d}"
        scene_gt = _load_json(scene_dir / "scene_gt.json",
                              "evaluation needs the ground truth: the split's scene_gt.json (BOP withholds it for "
                              "test sets; use a split with annotations or BOP's online evaluation)")
        scene_camera = _load_json(scene_dir / "scene_camera.json", "a BOP scene needs scene_camera.json")
        return scene_dir, scene_gt, scene_camera, _gt_info_for_scene(scene_dir, scene_gt, scene_camera, self.models,
                                                                     self.delta)


def _evaluate_image(entries: dict[str, list], gt: _ImageGt, im_targets: dict[int, int], by_est, models: _Models,
                    camera_width: float | None, delta: float, visib_gt_min: float) -> int:
    """Appends to `entries` the errors of each object with a ground-truth instance in the
    image (the targeted ones with their top inst_count estimates, the others with none, so
    their instances still count as valid or not); returns how many estimates it evaluated."""
    K = np.asarray(gt.camera["cam_K"], dtype=np.float64).reshape(3, 3)
    depth_scale = float(gt.camera.get("depth_scale", 1.0))
    gt_obj_ids = [int(g["obj_id"]) for g in gt.gts]
    valid = valid_gt(gt_obj_ids, [i.get("visib_fract", 0.0) for i in gt.infos], im_targets, visib_gt_min)
    image = ImageContext(K, lambda: _read_depth_mm(gt.scene_dir, gt.im_id, depth_scale), camera_width)
    evaluated = 0
    for obj_id in sorted(set(gt_obj_ids), key=gt_obj_ids.index):
        gt_ids = [g for g, o in enumerate(gt_obj_ids) if o == obj_id]
        ests = []
        if obj_id in im_targets:
            candidates = by_est.get((gt.scene_id, gt.im_id, obj_id), [])
            ests = [candidates[i] for i in top_estimates([c["score"] for c in candidates], im_targets[obj_id])]
        evaluated += len(ests)
        errs = object_errors(ests, gt.gts, gt_ids, obj_id, models, image, delta)
        scores = [est["score"] for est in ests]
        for metric, values in errs.items():
            entries[metric].append(ObjectErrors(gt.scene_id, gt.im_id, obj_id, scores, values, valid[gt_ids]))
    return evaluated


def _image_times(rows) -> float | None:
    """Mean over images of the per-image time (None when any time is unknown)."""
    times = {}
    for row in rows:
        if row["time"] < 0:
            return None
        times.setdefault((row["scene_id"], row["im_id"]), row["time"])
    return float(np.mean(list(times.values()))) if times else None


def evaluate(dataset_dir, results_csv, split: str = "test", targets_path=None, renderer_factory=None, *,
             dataset_name: str | None = None, visib_gt_min: float = -1.0, vsd_delta_mm: float | None = None,
             max_sym_disc_step: float = E.MAX_SYM_DISC_STEP, device="cpu") -> dict:
    """BOP19 average recall and ADD(-S) AUC of a results CSV.

    Args:
        dataset_dir: the BOP dataset (models/ or models_eval/, <split>/<scene>/ with
            scene_gt.json, scene_camera.json, depth/, scene_gt_info.json).
        results_csv: the results file (scene_id,im_id,obj_id,score,R,t,time; t in mm).
        split: the split folder.
        targets_path: test_targets_bop19.json (default: the dataset's; without one, the
            ground-truth instances with visib_fract >= 0.1 of every scene in the results).
        renderer_factory: mesh (metres) -> renderer for VSD's depth maps (default:
            chunkpose's renderer on ``device``).
        dataset_name: BOP's name of the dataset (default: from the results file name, else
            the folder); it picks VSD's delta (5 mm for ITODD, else 15 mm).
        visib_gt_min: -1: the inst_count most visible instances per target are valid
            (bop_toolkit's current BOP19 setting); >= 0: instances at least this visible.
        vsd_delta_mm: override VSD's visibility tolerance.
        max_sym_disc_step: discretisation of continuous symmetries (BOP19: 0.01).
    Returns:
        dict: "AR", "AR_VSD", "AR_MSSD", "AR_MSPD"; "ADD(-S)_AUC", "ADD(-S)_recall_0.1d",
        "ADD_AUC", "ADD-S_AUC"; "per_object" {obj_id: the same numbers and "targets"};
        "curves" (thresholds and recalls per metric, for plot); "targets", "estimates"
        (evaluated), "images", "time_per_image" (s or None), "method", "dataset", "split".
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise EvaluationError(f"BOP dataset folder {root} does not exist", "pass --bop DATASET_DIR")
    rows = read_bop_results(results_csv)
    method, dataset = _method_and_dataset(results_csv, root, dataset_name)
    delta = _vsd_delta(dataset, vsd_delta_mm)
    if renderer_factory is None:
        renderer_factory = _default_renderer_factory(device)
    models = _Models(root, renderer_factory, max_sym_disc_step)
    targets = _load_targets(root, split, targets_path, rows)

    by_est = _estimates_by_object(rows)
    camera_width = _camera_width(root)
    scenes = _SceneGt(root / split, models, delta)
    entries = {metric: [] for metric in METRICS}
    image_targets = targets_by_image(targets)
    evaluated = 0
    for (scene_id, im_id), im_targets in image_targets.items():
        evaluated += _evaluate_image(entries, scenes.image(scene_id, im_id), im_targets, by_est, models,
                                     camera_width, delta, visib_gt_min)

    result = summarise(entries, models)
    result.update({
        "estimates": int(evaluated), "rows": len(rows), "images": len(image_targets),
        "time_per_image": _image_times(rows), "method": method, "dataset": dataset, "split": split,
        "vsd_delta_mm": delta, "visib_gt_min": float(visib_gt_min),
    })
    return result


__all__ = ["ADD_THRESHOLDS_M", "EvaluationError", "evaluate"]
