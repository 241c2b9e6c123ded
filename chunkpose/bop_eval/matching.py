"""Which ground-truth instances count, and which estimate matches which of them (BOP19).

As bop_toolkit does it (eval_calc_errors.py, eval_calc_scores.py, pose_matching.py):

- Per target (image, object, n) only the n estimates of that object with the highest
  scores are evaluated (``top_estimates``).
- Valid ground truth (``valid_gt``): with visib_gt_min < 0 (BOP19's default in the current
  toolkit) the n most visible instances (by visib_fract) of each target object are valid;
  with visib_gt_min >= 0 an instance is valid when its object is a target and its
  visib_fract >= visib_gt_min (the older rule, 0.1). test_targets_bop19.json counts the
  instances with visib_fract >= 0.1, so both rules agree on BOP's own files.
- Matching (``greedy_match``), per image and object and per threshold: estimates in
  decreasing score order each take the valid, still unmatched instance with the smallest
  error, if that error is strictly below the threshold (ties: the first instance).
"""
from __future__ import annotations

import numpy as np


def top_estimates(scores, count: int) -> list[int]:
    """Indices of the ``count`` highest scores (ties keep the given order)."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    return order[: max(int(count), 0)]


def valid_gt(gt_obj_ids, visib_fracts, targets: dict, visib_gt_min: float = -1.0) -> np.ndarray:
    """(G,) bool: which ground-truth instances of an image are evaluation targets.

    Args:
        gt_obj_ids: (G,) object id of each instance (scene_gt.json order).
        visib_fracts: (G,) their visib_fract (scene_gt_info.json).
        targets: {obj_id: inst_count} of the image (test_targets_bop19.json).
        visib_gt_min: < 0: the inst_count most visible instances per object; >= 0: every
            target-object instance at least this visible.
    """
    gt_obj_ids = [int(o) for o in gt_obj_ids]
    visib_fracts = [float(v) for v in visib_fracts]
    if len(gt_obj_ids) != len(visib_fracts):
        raise ValueError(f"visib_fracts: expected {len(gt_obj_ids)} values (one per instance), got {len(visib_fracts)}")
    valid = np.zeros(len(gt_obj_ids), dtype=bool)
    if visib_gt_min >= 0:
        for g, (obj_id, visib) in enumerate(zip(gt_obj_ids, visib_fracts)):
            valid[g] = obj_id in targets and visib >= visib_gt_min
        return valid
    remaining = {int(k): int(v) for k, v in targets.items()}
    for g in sorted(range(len(gt_obj_ids)), key=lambda i: -visib_fracts[i]):
        if remaining.get(gt_obj_ids[g], 0) > 0:
            valid[g] = True
            remaining[gt_obj_ids[g]] -= 1
    return valid


def greedy_match(scores, errors, threshold: float, gt_valid=None) -> np.ndarray:
    """BOP's greedy one-to-one matching of estimates to ground-truth instances.

    Args:
        scores: (E,) estimate confidences.
        errors: (E, G) error of each estimate w.r.t. each instance (inf = no match).
        threshold: an estimate matches only with an error strictly below it.
        gt_valid: (G,) bool, instances that may be matched (None: all).
    Returns:
        (E,) int: the matched instance of each estimate, -1 for none.
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2 or errors.shape[0] != len(scores):
        raise ValueError(f"errors: expected shape ({len(scores)}, G), got {errors.shape}")
    n_gt = errors.shape[1]
    valid = np.ones(n_gt, dtype=bool) if gt_valid is None else np.asarray(gt_valid, dtype=bool)
    taken = np.zeros(n_gt, dtype=bool)
    matched = np.full(len(scores), -1, dtype=np.int64)
    for e in top_estimates(scores, len(scores)):
        best, best_error = -1, float(threshold)
        for g in range(n_gt):
            if valid[g] and not taken[g] and errors[e, g] < best_error:
                best, best_error = g, errors[e, g]
        if best >= 0:
            taken[best] = True
            matched[e] = best
    return matched


__all__ = ["greedy_match", "top_estimates", "valid_gt"]
