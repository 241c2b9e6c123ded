"""Several objects in one frame under one budget: MultiObjectEstimator.

    est = MultiObjectEstimator({"mug": "mug.obj", "drill": "drill.ply"}, budget_gb=4.0)
    poses = est.register(rgb, depth, K, {"mug": mug_mask, "drill": drill_mask})
    poses = est.track(rgb2, depth2, K)                    # {name: PoseResult}, each with its health
    poses["mug"].pose, est.last_report                    # the frame's report

One PoseEstimator per object, all on ONE Engine, and each frame ONE engine call for all of
them (chunkpose.frame_calls): one decision to downscale from all objects' regions and
hypotheses, the frame's regions uploaded and cleaned once (overlapping regions merged), and
every stage one plan over all objects' hypotheses, chunks mixing objects. The refiner/scorer
pair (the networks of a learned pair) is loaded once and shared, what every object holds on
the device (its renderer's buffers, its rotation set) counts in every call, and the stages'
cost models are calibrated once for all. Tracking health and re-registration work per
object; the lost objects of a frame are registered again together.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

from chunkpose.engine import Engine
from chunkpose.engine.report import RunReport
from chunkpose.errors import InputError
from chunkpose.estimator import PoseEstimator, PoseResult
from chunkpose.frame_calls import register_objects, registration_mask, settle_tracks, track_objects
from chunkpose.pipeline.frame import validate_inputs


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
        names = [name for name in self.objects if name in masks]
        results = dict(zip(names, register_together([self.objects[n] for n in names], rgb, depth, K,
                                                    [masks[n] for n in names], names)))
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
        rgb, depth, K, _ = validate_inputs(rgb, depth, K, None, require_mask=False)
        results = {}
        tracked = [name for name in self.objects if name in live]
        if tracked:
            ests = [self.objects[n] for n in tracked]
            steps = track_objects(ests, rgb, depth, K)
            results.update(zip(tracked, settle_tracks(ests, steps, rgb, depth, K, [masks.get(n) for n in tracked])))
        first_seen = [name for name in self.objects if name in new]
        if first_seen:
            results.update(zip(first_seen, register_together([self.objects[n] for n in first_seen], rgb, depth, K,
                                                              [masks[n] for n in first_seen], first_seen)))
        results = {name: results[name] for name in self.objects if name in results}
        self.last_report = combined_report(results)
        return results


def register_together(estimators, rgb, depth, K, masks, names=None) -> list:
    """Register several objects of one frame in one engine call (chunkpose.frame_calls), each
    PoseEstimator from its mask; the estimators must share one engine (share_one_budget), and
    one estimator may appear more than once (several instances of one object).

    Args:
        estimators: PoseEstimators on one engine.
        rgb: (H,W,3) uint8 colour image.
        depth: (H,W) float depth in metres.
        K: (3,3) intrinsics in pixels.
        masks: one (H,W) mask per estimator.
        names: optional names of the objects for error messages.

    Returns:
        list of PoseResult, one per estimator, sharing the call's report.

    Raises:
        InputError: an input or a mask is unusable (the mask named), or the estimators do not
            share one engine.
    """
    if len({id(est.engine) for est in estimators}) != 1:
        raise InputError("estimators: registering together needs one engine; call share_one_budget(estimators) first")
    rgb, depth, K, _ = validate_inputs(rgb, depth, K, None, require_mask=False)
    names = list(names) if names is not None else [str(i) for i in range(len(estimators))]
    checked = [registration_mask(m, depth, f"masks[{n!r}]") for m, n in zip(masks, names)]
    return register_objects(list(estimators), rgb, depth, K, checked)


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
    """One frame's report over its objects' results: the call's report when they share one (the
    usual case), else (re-registrations, objects first seen) the calls merged: the largest peak
    (the calls run one after another on one engine), every stage's records summed, the lowest
    downscale factor.

    Args:
        results: {name: PoseResult} of one frame.

    Returns:
        RunReport (merged sessions are named "<objects>.<call>", objects joined by "+").
    """
    calls = {}
    for name, result in results.items():
        calls.setdefault(id(result.report), (result.report, []))[1].append(name)
    if len(calls) == 1:
        return next(iter(calls.values()))[0]
    reports = [report for report, _ in calls.values()]
    out = RunReport(budget_bytes=reports[0].budget_bytes, device=reports[0].device)
    for report, names in calls.values():
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
            out.sessions[f"{'+'.join(names)}.{session}"] = dict(entry)
    return out
