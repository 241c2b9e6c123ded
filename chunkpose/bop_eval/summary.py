"""evaluate's summary of the errors of every (image, object): BOP19's average recalls, the
ADD(-S) numbers (ADD-S for objects with symmetries, ADD for the others) over all targets
and per object, and the recall curves report.plot draws.
"""
from __future__ import annotations

import numpy as np

from chunkpose import metrics
from chunkpose.bop_eval import errors as E
from chunkpose.bop_eval.matching import greedy_match
from chunkpose.bop_eval.scores import average_recall, recall_grid

# chunkpose.metrics' AUC grid (metres): 0..0.1 in 1 mm steps.
ADD_THRESHOLDS_M = tuple(float(v) for v in np.arange(0, 101) * metrics.AUC_STEP)


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


def _numbers(entries: dict[str, list], diameters_m: dict, obj_id: int | None = None) -> dict:
    """The average recalls, ADD(-S) numbers and target count, over all objects or one."""
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


def _curves(entries: dict[str, list], diameters_m: dict) -> dict:
    """Thresholds and recalls per metric over all targets, for report.plot."""
    return {
        "VSD": {"thresholds": list(E.VSD_THRESHOLDS), "taus": list(E.VSD_TAUS),
                "recall": recall_grid(entries["vsd"], E.VSD_THRESHOLDS, len(E.VSD_TAUS)).tolist()},
        "MSSD": {"thresholds": list(E.MSSD_THRESHOLDS), "recall": recall_grid(entries["mssd"], E.MSSD_THRESHOLDS)[0].tolist()},
        "MSPD": {"thresholds": list(E.MSPD_THRESHOLDS), "recall": recall_grid(entries["mspd"], E.MSPD_THRESHOLDS)[0].tolist()},
        "ADD(-S)": {"thresholds": list(ADD_THRESHOLDS_M), "recall": _add_summary(entries["add_s"], diameters_m)["curve"]},
    }


def summarise(entries: dict[str, list], models) -> dict:
    """evaluate's numbers over all targets, its "per_object" and "curves", from the
    {metric: [ObjectErrors]} of every (image, object); `models` gives each object's
    diameter and whether it has symmetries."""
    symmetric = {o: models.symmetric(o) for o in {e.obj_id for e in entries["add"]}}
    entries = {**entries, "add_s": [entries["adds"][i] if symmetric[e.obj_id] else e
                                    for i, e in enumerate(entries["add"])]}
    diameters_m = {o: models.diameter(o) / 1000.0 for o in symmetric}
    result = _numbers(entries, diameters_m)
    result["per_object"] = {o: _numbers(entries, diameters_m, o) for o in sorted(symmetric)
                            if _has_targets(entries["vsd"], o)}
    result["curves"] = _curves(entries, diameters_m)
    return result


def _has_targets(entries, obj_id: int) -> bool:
    return any(e.targets for e in entries if e.obj_id == obj_id)


__all__ = ["ADD_THRESHOLDS_M", "summarise"]
