"""Several objects in one frame under one budget: MultiObjectEstimator.

    est = MultiObjectEstimator({"mug": "mug.obj", "drill": "drill.ply"}, budget_gb=4.0)
    poses = est.register(rgb, depth, K, {"mug": mug_mask, "drill": drill_mask})
    poses = est.track(rgb2, depth2, K)                    # {name: PoseResult}, each with its health
    poses["mug"].pose, est.last_report                    # the frame's combined report

One PoseEstimator per object, all on ONE Engine, so that every object's stages are planned
under the same budget with the same cost models, and the refiner/scorer pair (the networks
of a learned pair) is loaded once and shared. What every object holds on the device (its
renderer's buffers, its rotation set) counts in every object's call, so the peak of the
frame stays under the budget although the objects run one after another. The stages'
cost models are calibrated once, on the first object, for all of them. Each object's
region of interest comes from its own mask (register) or pose (track), so each pixel is
cleaned only for the objects whose region covers it; tracking health and re-registration
work per object (chunkpose.estimator.PoseEstimator.track).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

from chunkpose.engine import Engine
from chunkpose.engine.report import RunReport
from chunkpose.errors import InputError
from chunkpose.estimator import PoseEstimator, PoseResult


class MultiObjectEstimator:
    """Register and track several objects in the same frames under one budget.

    Args:
        meshes: {name: mesh} (each a path, trimesh or chunkpose Mesh, metres), at least one.
        budget_gb: peak device memory in GiB for each frame's call, all objects together; None =
            unbounded.
        device: as PoseEstimator's.
        symmetry_tfs: optional {name: (S,4,4) symmetry transforms} of some of the objects.
        **estimator_kwargs: the other PoseEstimator arguments (weights, iterations, hypotheses,
            health settings, ...), the same for every object.

    Raises:
        InputError: no meshes, a name that is not a non-empty string, or any PoseEstimator error.
    """

    def __init__(self, meshes: Mapping[str, object], budget_gb: Optional[float] = 4.0, device=None,
                 symmetry_tfs: Optional[Mapping[str, np.ndarray]] = None, **estimator_kwargs):
        if not isinstance(meshes, Mapping) or not meshes:
            raise InputError("meshes: expected a non-empty {name: mesh} mapping, e.g. {'mug': 'mug.obj'}")
        bad = [name for name in meshes if not isinstance(name, str) or not name]
        if bad:
            raise InputError(f"meshes: object names must be non-empty strings, got {bad!r}")
        unknown = set(symmetry_tfs or {}) - set(meshes)
        if unknown:
            raise InputError(f"symmetry_tfs: {sorted(unknown)} are not among the meshes {sorted(meshes)}")
        if "devices" in estimator_kwargs:
            raise InputError("devices: MultiObjectEstimator runs on one device; give device=")
        self.objects: Dict[str, PoseEstimator] = {}
        first = None
        for name, mesh in meshes.items():
            kwargs = dict(estimator_kwargs)
            if first is not None:  # one pair (one copy of the networks) for all objects
                kwargs.setdefault("refiner", first.refiner)
                kwargs.setdefault("scorer", first.scorer)
            est = PoseEstimator(mesh, budget_gb=budget_gb, device=device,
                                symmetry_tfs=(symmetry_tfs or {}).get(name), **kwargs)
            first = first or est
            self.objects[name] = est
        share_one_budget(list(self.objects.values()))
        self.engine: Engine = first.engine
        self.last_report: Optional[RunReport] = None

    @property
    def names(self) -> list:
        return list(self.objects)

    def register(self, rgb, depth, K, masks: Mapping[str, object]) -> Dict[str, PoseResult]:
        """Register every object that has a mask in this frame.

        Args:
            rgb: (H,W,3) uint8 colour image.
            depth: (H,W) float depth in metres.
            K: (3,3) intrinsics in pixels.
            masks: {name: (H,W) mask} for some or all objects (others are not registered).

        Returns:
            {name: PoseResult} in the estimator's object order.

        Raises:
            InputError: a mask's name is not an object, no masks, or a PoseEstimator input error.
        """
        unknown = set(masks) - set(self.objects)
        if unknown or not masks:
            raise InputError(f"masks: expected masks of some of {self.names}, got {sorted(masks) or 'none'}")
        results = {name: est.register(rgb, depth, K, masks[name]) for name, est in self.objects.items()
                   if name in masks}
        self.last_report = combined_report(results)
        return results

    def track(self, rgb, depth, K, masks: Optional[Mapping[str, object]] = None) -> Dict[str, PoseResult]:
        """Track every registered object into this frame (each with its health check and
        re-registration; ``masks`` are used for the objects that are lost), and register the
        objects not registered yet whose mask in ``masks`` is not empty.

        Args:
            rgb: (H,W,3) uint8 colour image.
            depth: (H,W) float depth in metres.
            K: (3,3) intrinsics in pixels.
            masks: optional {name: (H,W) mask} of this frame.

        Returns:
            {name: PoseResult} of the registered objects, in the estimator's object order.

        Raises:
            InputError: a mask's name is not an object.
            RuntimeError: no object is registered yet and none has a mask.
        """
        masks = masks or {}
        unknown = set(masks) - set(self.objects)
        if unknown:
            raise InputError(f"masks: {sorted(unknown)} are not among the objects {self.names}")
        live = {name for name, est in self.objects.items() if est.last_pose is not None}
        # an object first seen now (its first non-empty mask) is registered on this frame
        new = {name for name, mask in masks.items() if name not in live and np.any(np.asarray(mask))}
        if not live and not new:
            raise RuntimeError("track: no object is registered; call register(rgb, depth, K, masks) first")
        results = {}
        for name, est in self.objects.items():
            if name in live:
                results[name] = est.track(rgb, depth, K, masks.get(name))
            elif name in new:
                results[name] = est.register(rgb, depth, K, masks[name])
        self.last_report = combined_report(results)
        return results


def share_one_budget(estimators: list) -> None:
    """Put PoseEstimators of different objects under the first one's engine (one budget, one set
    of calibrated cost models) and make each count what the others hold on the device.

    Args:
        estimators: PoseEstimators on the same device; best made with the first one's refiner and
            scorer (one copy of the networks).

    Raises:
        InputError: they are not all on the same device.
    """
    first = estimators[0]
    if any(est.device != first.device for est in estimators):
        raise InputError("estimators on different devices cannot share one budget")
    for est in estimators[1:]:
        est.engine = first.engine
        est._calibrated = first._calibrated  # cost models are per stage, not per mesh
    for est in estimators:
        est._companions = [other for other in estimators if other is not est]


def combined_report(results: Mapping[str, PoseResult]) -> RunReport:
    """One frame's report over its objects' calls: the largest peak (the calls run one after
    another on one engine), every stage's records merged, the lowest downscale factor.

    Args:
        results: {name: PoseResult} of one frame.

    Returns:
        RunReport (its sessions are named "<object>.<call>").
    """
    reports = [r.report for r in results.values()]
    out = RunReport(budget_bytes=reports[0].budget_bytes, device=reports[0].device)
    for name, report in zip(results, reports):
        out.see_peak(report.peak_bytes, report.peak_allocated_bytes)
        out.see_external(report.external_bytes)
        if report.downscale_factor < out.downscale_factor:
            out.downscale_factor, out.downscale_reason = report.downscale_factor, report.downscale_reason
        for stage_name, stage in report.stages.items():
            merged = out.stage(stage_name)
            merged.calls += stage.calls
            merged.chunk_sizes += stage.chunk_sizes
            merged.n_chunks += stage.n_chunks
            merged.items += stage.items
            merged.peak_bytes = max(merged.peak_bytes, stage.peak_bytes)
            merged.peak_allocated_bytes = max(merged.peak_allocated_bytes, stage.peak_allocated_bytes)
            merged.retries += stage.retries
            merged.predicted_peak_bytes = max(merged.predicted_peak_bytes, stage.predicted_peak_bytes)
            merged.wall_s += stage.wall_s
        for session, entry in report.sessions.items():
            out.sessions[f"{name}.{session}"] = dict(entry)
    return out
