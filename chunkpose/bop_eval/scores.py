"""Recall and average recall from pre-computed errors (bop_toolkit's score.py, BOP19).

recall(threshold) = matched valid instances / valid instances, counted over all target
images together (not averaged per object or image). A metric's average recall is the
mean of its recalls over its thresholds (and, for VSD, over the 10 x 10 tau x threshold
grid). AR = mean(AR_VSD, AR_MSSD, AR_MSPD).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chunkpose.bop_eval.matching import greedy_match


@dataclass
class ObjectErrors:
    """Errors of one object's evaluated estimates in one image.

    scores (E,): the estimates kept (top inst_count); errors (E, G, T): error w.r.t. each
    ground-truth instance of this object in the image, for each of T settings (VSD's taus;
    T = 1 otherwise), already normalised as the metric asks; gt_valid (G,) bool.
    """

    scene_id: int
    im_id: int
    obj_id: int
    scores: np.ndarray
    errors: np.ndarray
    gt_valid: np.ndarray

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.gt_valid = np.asarray(self.gt_valid, dtype=bool).reshape(-1)
        errors = np.asarray(self.errors, dtype=np.float64)
        if errors.ndim == 2:
            errors = errors[:, :, None]
        if errors.size == 0:
            errors = errors.reshape(len(self.scores), len(self.gt_valid), errors.shape[-1] if errors.ndim == 3 else 1)
        if errors.shape[:2] != (len(self.scores), len(self.gt_valid)):
            raise ValueError(f"errors: expected ({len(self.scores)}, {len(self.gt_valid)}, T), got {errors.shape}")
        self.errors = errors

    @property
    def targets(self) -> int:
        return int(self.gt_valid.sum())

    def matches(self, threshold: float, setting: int = 0) -> int:
        """Valid instances matched at ``threshold`` for setting (tau) index ``setting``."""
        if len(self.scores) == 0 or self.targets == 0:
            return 0
        matched = greedy_match(self.scores, self.errors[:, :, setting], threshold, self.gt_valid)
        return int((matched >= 0).sum())


def recall(entries, threshold: float, setting: int = 0, obj_id: int | None = None) -> float:
    """Matched / valid instances over ``entries`` ([ObjectErrors]); 0 without targets."""
    chosen = [e for e in entries if obj_id is None or e.obj_id == obj_id]
    targets = sum(e.targets for e in chosen)
    if targets == 0:
        return 0.0
    return sum(e.matches(threshold, setting) for e in chosen) / float(targets)


def recall_grid(entries, thresholds, settings: int = 1, obj_id: int | None = None) -> np.ndarray:
    """(settings, thresholds) recalls."""
    return np.array([[recall(entries, th, s, obj_id) for th in thresholds] for s in range(settings)])


def average_recall(entries, thresholds, settings: int = 1, obj_id: int | None = None) -> float:
    """Mean recall over thresholds (and settings)."""
    return float(recall_grid(entries, thresholds, settings, obj_id).mean())


__all__ = ["ObjectErrors", "average_recall", "recall", "recall_grid"]
