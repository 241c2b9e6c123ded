"""Pose-error metrics as defined by the BOP / YCB-Video evaluations (all in metres).

- ADD: mean distance between model points under the estimated and the true pose.
- ADD-S: mean distance from each point under the true pose to the nearest point of the
  model under the estimated pose (for symmetric objects; a k-d tree answers the queries).
- AUC: area under recall(threshold) for thresholds 0..0.1 m in 1 mm steps (trapezoid
  rule), divided by 0.1 so that a perfect method scores 1.
- Recall at 0.1 diameter: fraction of errors below 0.1 x the object diameter.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

AUC_MAX_THRESHOLD = 0.1  # metres
AUC_STEP = 0.001  # metres


def _as_pose(pose, name: str) -> np.ndarray:
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4):
        raise ValueError(f"{name} must be a (4,4) pose matrix, got shape {pose.shape}")
    return pose


def _as_points(points) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"points must be a non-empty (N,3) array of model points, got shape {points.shape}")
    return points


def transform_points(pose, points) -> np.ndarray:
    """points (N,3) mapped by pose (4,4) -> (N,3).

    Args:
        points: (N,3) numpy array.
        pose: (4,4) array-like.

    Returns:
        (N,3) float64 R points + t.
    """
    pose = np.asarray(pose, dtype=np.float64)
    return points @ pose[:3, :3].T + pose[:3, 3]


def _posed_points(pose_est, pose_gt, points):
    """The model points under the estimated and the true pose, both (N,3), inputs checked."""
    points = _as_points(points)
    return (transform_points(_as_pose(pose_est, "pose_est"), points),
            transform_points(_as_pose(pose_gt, "pose_gt"), points))


def add_error(pose_est, pose_gt, points) -> float:
    """ADD: mean over model points x of ||(R x + t) - (Rgt x + tgt)|| (metres).

    Args:
        pose_est: (4,4) estimated model-in-camera pose, metres.
        pose_gt: (4,4) true pose, metres.
        points: (N,3) model points in the model frame, metres, N >= 1.

    Returns:
        float metres.

    Raises:
        ValueError: a pose is not (4,4) or points is not a non-empty (N,3).
    """
    est, gt = _posed_points(pose_est, pose_gt, points)
    return float(np.linalg.norm(est - gt, axis=1).mean())


def adds_error(pose_est, pose_gt, points) -> float:
    """ADD-S: mean over x of the distance from Rgt x + tgt to the nearest estimate-posed point.

    Args:
        pose_est: (4,4) estimated model-in-camera pose, metres.
        pose_gt: (4,4) true pose, metres.
        points: (N,3) model points in the model frame, metres, N >= 1.

    Returns:
        float metres.

    Raises:
        ValueError: a pose is not (4,4) or points is not a non-empty (N,3).
    """
    est, gt = _posed_points(pose_est, pose_gt, points)
    distances, _ = cKDTree(est).query(gt, k=1)
    return float(np.mean(distances))


def rotation_error_deg(pose_est, pose_gt) -> float:
    """Angle of R_est R_gt^T in degrees.

    Args:
        pose_est: (4,4) estimated model-in-camera pose, metres.
        pose_gt: (4,4) true pose, metres.

    Returns:
        float degrees in [0, 180].

    Raises:
        ValueError: a pose is not (4,4).
    """
    r = _as_pose(pose_est, "pose_est")[:3, :3] @ _as_pose(pose_gt, "pose_gt")[:3, :3].T
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)))


def translation_error(pose_est, pose_gt) -> float:
    """||t_est - t_gt|| in metres.

    Args:
        pose_est: (4,4) estimated model-in-camera pose, metres.
        pose_gt: (4,4) true pose, metres.

    Returns:
        float metres.

    Raises:
        ValueError: a pose is not (4,4).
    """
    return float(np.linalg.norm(_as_pose(pose_est, "pose_est")[:3, 3] - _as_pose(pose_gt, "pose_gt")[:3, 3]))


def pose_errors(pose_est, pose_gt, points, max_points: int | None = 20000, seed: int = 0) -> dict:
    """ADD, ADD-S (metres), rotation (deg) and translation (m) errors of one estimate.

    Meshes with more than ``max_points`` vertices are subsampled (fixed seed) so that the k-d
    tree stays cheap; the metrics are means, so a uniform subsample changes them little.

    Args:
        pose_est: (4,4) estimated model-in-camera pose, metres.
        pose_gt: (4,4) true pose, metres.
        points: (N,3) model points in the model frame, metres.
        max_points: subsample size for ADD / ADD-S (default 20000); None = all points.
        seed: seed of the subsample (default 0).

    Returns:
        dict of floats: "add", "add_s" (metres), "rot_deg" (degrees), "trans_m" (metres).

    Raises:
        ValueError: a pose is not (4,4) or points is not a non-empty (N,3).
    """
    points = _as_points(points)
    if max_points is not None and len(points) > max_points:
        idx = np.random.default_rng(seed).choice(len(points), max_points, replace=False)
        points = points[idx]
    return {
        "add": add_error(pose_est, pose_gt, points),
        "add_s": adds_error(pose_est, pose_gt, points),
        "rot_deg": rotation_error_deg(pose_est, pose_gt),
        "trans_m": translation_error(pose_est, pose_gt),
    }


def recall_curve(errors, max_threshold: float = AUC_MAX_THRESHOLD, step: float = AUC_STEP):
    """Thresholds 0, step, ..., max_threshold and the fraction of errors <= each.

    Non-finite errors (failed estimates) count as misses.

    Args:
        errors: (N,) pose errors in metres (any shape; flattened).
        max_threshold: largest threshold in metres (default 0.1).
        step: threshold step in metres (default 0.001).

    Returns:
        (thresholds, recall): two (T,) float64 arrays, T = round(max_threshold / step) + 1.

    Raises:
        ValueError: ``errors`` is empty.
    """
    errors = np.asarray(errors, dtype=np.float64).reshape(-1)
    if errors.size == 0:
        raise ValueError("errors is empty: the AUC needs at least one pose error")
    n_steps = int(round(max_threshold / step))
    thresholds = np.arange(n_steps + 1, dtype=np.float64) * step
    errors = np.where(np.isfinite(errors), errors, np.inf)  # a failed estimate counts as a miss
    recall = (errors[None, :] <= thresholds[:, None] + 1e-12).mean(axis=1)
    return thresholds, recall


def auc(errors, max_threshold: float = AUC_MAX_THRESHOLD, step: float = AUC_STEP) -> float:
    """Area under recall(threshold) over [0, max_threshold] / max_threshold, in [0, 1].

    Trapezoid rule over recall_curve.

    Args:
        errors: (N,) pose errors in metres.
        max_threshold: largest threshold in metres (default 0.1).
        step: threshold step in metres (default 0.001).

    Returns:
        float in [0, 1].

    Raises:
        ValueError: ``errors`` is empty.
    """
    thresholds, recall = recall_curve(errors, max_threshold, step)
    area = np.sum((recall[1:] + recall[:-1]) * 0.5 * np.diff(thresholds))
    return float(area / max_threshold)


def recall_at_diameter(errors, diameters, fraction: float = 0.1) -> float:
    """Fraction of errors strictly below ``fraction`` x diameter (one diameter or one per error).

    Args:
        errors: (N,) pose errors in metres (non-finite = miss).
        diameters: one diameter or (N,) diameters, metres.
        fraction: of the diameter (default 0.1).

    Returns:
        float in [0, 1].

    Raises:
        ValueError: ``errors`` is empty.
    """
    errors = np.asarray(errors, dtype=np.float64).reshape(-1)
    if errors.size == 0:
        raise ValueError("errors is empty: recall needs at least one pose error")
    diameters = np.broadcast_to(np.asarray(diameters, dtype=np.float64), errors.shape)
    errors = np.where(np.isfinite(errors), errors, np.inf)
    return float(np.mean(errors < fraction * diameters))


def summarize(errors_add, errors_adds, diameters=None) -> dict:
    """AUC of ADD and ADD-S and, with diameters, recall at 0.1 diameter.

    Args:
        errors_add: (N,) ADD errors in metres.
        errors_adds: (N,) ADD-S errors in metres.
        diameters: optional diameter or (N,) diameters in metres.

    Returns:
        dict: "add_auc", "adds_auc", "count" and, with diameters, "add_recall_0.1d" and
        "adds_recall_0.1d".

    Raises:
        ValueError: no errors are given.
    """
    out = {"add_auc": auc(errors_add), "adds_auc": auc(errors_adds), "count": int(np.size(errors_add))}
    if diameters is not None:
        out["add_recall_0.1d"] = recall_at_diameter(errors_add, diameters)
        out["adds_recall_0.1d"] = recall_at_diameter(errors_adds, diameters)
    return out


__all__ = [
    "add_error", "adds_error", "auc", "pose_errors", "recall_at_diameter", "recall_curve",
    "rotation_error_deg", "summarize", "transform_points", "translation_error",
]
