"""Score a BOP results CSV against a BOP dataset's ground truth: BOP19's average recall
(VSD, MSSD, MSPD) and the ADD(-S) area under the curve, without bop_toolkit.

    result = evaluate("datasets/ycbv", "out/chunkpose_ycbv-test.csv")
    print(format_table(result)); plot(result, "out/recall.png")

What is evaluated follows bop_toolkit's eval_bop19_pose.py (see errors.py, matching.py and
scores.py for each definition): the targets of test_targets_bop19.json, the top
inst_count estimates per target, errors w.r.t. every ground-truth instance of the object
in the image, greedy matching per threshold, recall over all targets.

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

import numpy as np

from chunkpose import metrics
from chunkpose.bop_eval import errors as E
from chunkpose.bop_eval.matching import greedy_match, top_estimates, valid_gt
from chunkpose.bop_eval.scores import ObjectErrors, average_recall, recall_grid
from chunkpose.io.bop import (
    BopFileError, Target, bop_dataset_name, default_targets_path, parse_results_filename, read_bop_results,
    read_targets, targets_by_image,
)

# chunkpose.metrics' AUC grid (metres): 0..0.1 in 1 mm steps.
ADD_THRESHOLDS_M = tuple(float(v) for v in np.arange(0, 101) * metrics.AUC_STEP)
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


def _pose_m(R, t_mm) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = np.asarray(R, dtype=np.float64).reshape(3, 3)
    pose[:3, 3] = np.asarray(t_mm, dtype=np.float64).reshape(3) / 1000.0
    return pose


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
                  "bop_toolkit's calc_gt_info does", stacklevel=3)
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
                                                        _pose_m(gt["cam_R_m2c"], gt["cam_t_m2c"]), K,
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


def _image_times(rows) -> float | None:
    """Mean over images of the per-image time (None when any time is unknown)."""
    times = {}
    for row in rows:
        if row["time"] < 0:
            return None
        times.setdefault((row["scene_id"], row["im_id"]), row["time"])
    return float(np.mean(list(times.values()))) if times else None


def _adds_per_target(entries) -> list[float]:
    """Per valid instance: the error of the estimate greedily matched to it with no
    threshold (inf when none)."""
    out = []
    for entry in entries:
        if entry.targets == 0:
            continue
        per_gt = np.full(len(entry.gt_valid), np.inf)
        if len(entry.scores):
            matched = greedy_match(entry.scores, entry.errors[:, :, 0], np.inf, entry.gt_valid)
            for e, g in enumerate(matched):
                if g >= 0:
                    per_gt[g] = entry.errors[e, g, 0]
        out += per_gt[entry.gt_valid].tolist()
    return out


def _add_summary(entries, diameters_m: dict, obj_id: int | None = None) -> dict:
    chosen = [e for e in entries if obj_id is None or e.obj_id == obj_id]
    errors, diams = [], []
    for entry in chosen:
        per_target = _adds_per_target([entry])
        errors += per_target
        diams += [diameters_m[entry.obj_id]] * len(per_target)
    if not errors:
        return {"auc": 0.0, "recall_0.1d": 0.0, "curve": [0.0] * len(ADD_THRESHOLDS_M)}
    _, curve = metrics.recall_curve(errors)
    return {"auc": metrics.auc(errors), "recall_0.1d": metrics.recall_at_diameter(errors, diams),
            "curve": curve.tolist()}


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
    try:
        name = parse_results_filename(results_csv)
        method, file_dataset = name["method"], name["dataset"]
    except ValueError:
        method, file_dataset = Path(str(results_csv)).stem, None
    dataset = dataset_name or file_dataset or bop_dataset_name(root)
    delta = float(vsd_delta_mm) if vsd_delta_mm is not None else E.VSD_DELTA_MM_BY_DATASET.get(dataset, E.VSD_DELTA_MM)
    if renderer_factory is None:
        from chunkpose.ops.render import make_renderer

        def renderer_factory(mesh):
            return make_renderer(mesh, device)

    models = _Models(root, renderer_factory, max_sym_disc_step)

    if targets_path is None:
        targets_path = default_targets_path(root)
    if targets_path is not None:
        targets = read_targets(targets_path)
    else:
        scene_ids = sorted({r["scene_id"] for r in rows})
        warnings.warn(f"no {root / 'test_targets_bop19.json'}: the targets are the instances with visib_fract >= 0.1 "
                      f"of scenes {scene_ids}", stacklevel=2)
        targets = _derive_targets(root, split, scene_ids)

    by_est: dict[tuple[int, int, int], list[dict]] = {}
    for row in rows:
        by_est.setdefault((row["scene_id"], row["im_id"], row["obj_id"]), []).append(row)

    camera_path = root / "camera.json"
    camera_width = json.loads(camera_path.read_text()).get("width") if camera_path.is_file() else None

    entries = {"vsd": [], "mssd": [], "mspd": [], "add": [], "adds": []}
    image_targets = targets_by_image(targets)
    scenes: dict[int, dict] = {}
    evaluated = 0
    for (scene_id, im_id), im_targets in image_targets.items():
        if scene_id not in scenes:
            scene_dir = root / split / f"{scene_id:06d}"
            scene_gt = _load_json(scene_dir / "scene_gt.json",
                                  "evaluation needs the ground truth: the split's scene_gt.json (BOP withholds it for "
                                  "test sets; use a split with annotations or BOP's online evaluation)")
            scene_camera = _load_json(scene_dir / "scene_camera.json", "a BOP scene needs scene_camera.json")
            scenes[scene_id] = {
                "dir": scene_dir, "gt": scene_gt, "camera": scene_camera,
                "info": _gt_info_for_scene(scene_dir, scene_gt, scene_camera, models, delta),
            }
        scene = scenes[scene_id]
        key = str(im_id)
        if key not in scene["gt"]:
            raise EvaluationError(f"scene {scene_id} has no ground truth for target image {im_id}",
                                  "the targets file does not belong to this dataset split")
        gts, infos, cam = scene["gt"][key], scene["info"][key], scene["camera"][key]
        K = np.asarray(cam["cam_K"], dtype=np.float64).reshape(3, 3)
        depth_scale = float(cam.get("depth_scale", 1.0))
        gt_obj_ids = [int(g["obj_id"]) for g in gts]
        valid = valid_gt(gt_obj_ids, [i.get("visib_fract", 0.0) for i in infos], im_targets, visib_gt_min)
        depth = None  # read when VSD first needs it
        width = None
        gt_renders = {}
        for obj_id in sorted(set(gt_obj_ids), key=gt_obj_ids.index):
            gt_ids = [g for g, o in enumerate(gt_obj_ids) if o == obj_id]
            ests = []
            if obj_id in im_targets:
                candidates = by_est.get((scene_id, im_id, obj_id), [])
                ests = [candidates[i] for i in top_estimates([c["score"] for c in candidates], im_targets[obj_id])]
            evaluated += len(ests)
            n_est, n_gt = len(ests), len(gt_ids)
            errs = {"vsd": np.ones((n_est, n_gt, len(E.VSD_TAUS))), "mssd": np.full((n_est, n_gt, 1), np.inf),
                    "mspd": np.full((n_est, n_gt, 1), np.inf), "add": np.full((n_est, n_gt, 1), np.inf),
                    "adds": np.full((n_est, n_gt, 1), np.inf)}
            if n_est:
                diameter = models.diameter(obj_id)
                syms = models.symmetries(obj_id)
                pts = models.points_mm(obj_id)
                pts_m = pts / 1000.0
                if depth is None:
                    depth = _read_depth_mm(scene["dir"], im_id, depth_scale)
                    width = float(camera_width or depth.shape[1])
                mesh = models.mesh(obj_id)
                renderer = models.renderer(obj_id)
                for e, est in enumerate(ests):
                    pose_e = _pose_m(est["R"], est["t"])
                    render_e = None
                    for j, g in enumerate(gt_ids):
                        R_g = np.asarray(gts[g]["cam_R_m2c"], dtype=np.float64).reshape(3, 3)
                        t_g = np.asarray(gts[g]["cam_t_m2c"], dtype=np.float64).reshape(3)
                        pose_g = _pose_m(R_g, t_g)
                        if E.centres_within_diameter(est["t"], t_g, diameter):
                            errs["mssd"][e, j, 0] = E.mssd(est["R"], est["t"], R_g, t_g, pts, syms) / diameter
                            errs["add"][e, j, 0] = metrics.add_error(pose_e, pose_g, pts_m)
                            errs["adds"][e, j, 0] = metrics.adds_error(pose_e, pose_g, pts_m)
                        errs["mspd"][e, j, 0] = (E.MSPD_REFERENCE_WIDTH / width) * E.mspd(
                            est["R"], est["t"], R_g, t_g, K, pts, syms)
                        if E.sphere_projections_overlap(est["t"], t_g, 0.5 * diameter):
                            if render_e is None:
                                render_e = E.render_in_image(renderer, mesh.vertices, pose_e, K, depth.shape[1],
                                                             depth.shape[0])
                            if g not in gt_renders:
                                gt_renders[g] = E.render_in_image(renderer, mesh.vertices, pose_g, K, depth.shape[1],
                                                                  depth.shape[0])
                            errs["vsd"][e, j] = E.vsd_from_renders(render_e, gt_renders[g], depth, K, delta, E.VSD_TAUS,
                                                                   diameter)
            scores = [est["score"] for est in ests]
            for metric, values in errs.items():
                entries[metric].append(ObjectErrors(scene_id, im_id, obj_id, scores, values, valid[gt_ids]))

    symmetric = {o: models.symmetric(o) for o in {e.obj_id for e in entries["add"]}}
    entries["add_s"] = [entries["adds"][i] if symmetric[e.obj_id] else e for i, e in enumerate(entries["add"])]
    diameters_m = {o: models.diameter(o) / 1000.0 for o in symmetric}

    def numbers(obj_id=None) -> dict:
        out = {
            "AR_VSD": average_recall(entries["vsd"], E.VSD_THRESHOLDS, len(E.VSD_TAUS), obj_id),
            "AR_MSSD": average_recall(entries["mssd"], E.MSSD_THRESHOLDS, 1, obj_id),
            "AR_MSPD": average_recall(entries["mspd"], E.MSPD_THRESHOLDS, 1, obj_id),
        }
        out["AR"] = float(np.mean([out["AR_VSD"], out["AR_MSSD"], out["AR_MSPD"]]))
        add_s = _add_summary(entries["add_s"], diameters_m, obj_id)
        out["ADD(-S)_AUC"], out["ADD(-S)_recall_0.1d"] = add_s["auc"], add_s["recall_0.1d"]
        out["ADD_AUC"] = _add_summary(entries["add"], diameters_m, obj_id)["auc"]
        out["ADD-S_AUC"] = _add_summary(entries["adds"], diameters_m, obj_id)["auc"]
        out["targets"] = int(sum(e.targets for e in entries["vsd"] if obj_id is None or e.obj_id == obj_id))
        return out

    result = numbers()
    result["per_object"] = {o: numbers(o) for o in sorted(symmetric) if _has_targets(entries["vsd"], o)}
    result["curves"] = {
        "VSD": {"thresholds": list(E.VSD_THRESHOLDS), "taus": list(E.VSD_TAUS),
                "recall": recall_grid(entries["vsd"], E.VSD_THRESHOLDS, len(E.VSD_TAUS)).tolist()},
        "MSSD": {"thresholds": list(E.MSSD_THRESHOLDS), "recall": recall_grid(entries["mssd"], E.MSSD_THRESHOLDS)[0].tolist()},
        "MSPD": {"thresholds": list(E.MSPD_THRESHOLDS), "recall": recall_grid(entries["mspd"], E.MSPD_THRESHOLDS)[0].tolist()},
        "ADD(-S)": {"thresholds": list(ADD_THRESHOLDS_M), "recall": _add_summary(entries["add_s"], diameters_m)["curve"]},
    }
    result.update({
        "estimates": int(evaluated), "rows": len(rows), "images": len(image_targets),
        "time_per_image": _image_times(rows), "method": method, "dataset": dataset, "split": split,
        "vsd_delta_mm": delta, "visib_gt_min": float(visib_gt_min),
    })
    return result


def _has_targets(entries, obj_id: int) -> bool:
    return any(e.targets for e in entries if e.obj_id == obj_id)


__all__ = ["ADD_THRESHOLDS_M", "EvaluationError", "evaluate"]
