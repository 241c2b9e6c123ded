"""The body of a register or track call, for one object or for several in the same frame.

PoseEstimator.register/track are the one-object case and MultiObjectEstimator the case of
several; either way a frame is ONE engine call under one budget:

- one decision to downscale, from every object's region and hypotheses together
  (chunkpose.pipeline.sizing, the engine's own cost models);
- the frame's regions uploaded and their depth cleaned once: objects whose regions overlap
  share one merged region (chunkpose.pipeline.frame.prepare_frames), so no pixel is cleaned
  twice;
- every stage (each refinement round, scoring, polish, health) one engine stage over all
  objects' hypotheses (Engine.map_groups): chunks fill the budget with any object's
  hypotheses, each with its own frame, renderer and thresholds; scores still compare one
  object's hypotheses only.

The functions take PoseEstimators that share one engine (chunkpose.multi_object.
share_one_budget; a single estimator trivially does) and use what they hold: mesh, rotation
set, refiner/scorer, renderer, health settings. The first is the lead: its engine call,
calibration and resident list (which counts its companions' tensors) serve the whole frame.
Poses of objects whose refiners (or scorers) are different objects run as separate stages.

Over 400 lines mostly because of the Args/Returns documentation of its functions; it is one
concern (the body of a call), and splitting register from track would scatter what they share.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from chunkpose.engine import GIB, MapGroup
from chunkpose.engine.fallback import choose_downscale
from chunkpose.engine.meter import tensors_in
from chunkpose.errors import InputError
from chunkpose.ops.depth import MIN_DEPTH
from chunkpose.pipeline import frame as observation
from chunkpose.pipeline.base import ObjectJob
from chunkpose.pipeline.health import search_mask, silhouette_agreement
from chunkpose.pipeline.hypotheses import initial_poses, translation_guess
from chunkpose.pipeline.roi import call_region, mask_box
from chunkpose.pipeline.sizing import CallGeometry, CallSizing

#: Registration needs at least this many mask pixels with valid depth: fewer cannot pin
#: down a 6D pose (the refiners need tens of point pairs), so it stops with a clear error.
MIN_MASK_DEPTH_PIXELS = 30
#: A registration keeps this many best-scored hypotheses in its result (for inspection).
KEPT_CANDIDATES = 8


@dataclass
class PoseResult:
    """The result of one object in a register or track call.

    Attributes:
        pose: (4,4) float64 object-in-camera pose in the original mesh frame, translation in metres.
        score: float, the best hypothesis's score (higher is better); NaN when tracking, which does
            not score.
        report: the engine's RunReport of the call (per-stage chunks, peaks, any downscale); the
            objects of one frame's call share it.
        candidates: (k,4,4) float64 poses (original mesh frame, metres), k <= KEPT_CANDIDATES: a
            registration's best-scored hypotheses, best first (what --debug draws with
            PoseEstimator.inspect_crops); (0,4,4) when tracking.
        candidate_scores: (k,) float64 scores of ``candidates``, same order; (0,) when tracking.
        health: the pose's health figure in [0, 1] (chunkpose.pipeline.health: the fraction of its
            visible rendered silhouette whose observed depth agrees); NaN when health checks are off.
        lost: True when a tracked pose fell below the estimator's health_threshold on this frame.
        reregistered: True when, on a lost frame, a re-registration found the object again (the
            pose, score and report are the re-registration's).
    """

    pose: np.ndarray
    score: float
    report: object
    candidates: np.ndarray = field(default_factory=lambda: np.zeros((0, 4, 4)))
    candidate_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    health: float = float("nan")
    lost: bool = False
    reregistered: bool = False


def registration_mask(mask, depth: np.ndarray, name: str = "mask") -> np.ndarray:
    """A validated registration mask: bool (H,W) with at least MIN_MASK_DEPTH_PIXELS of valid depth.

    Args:
        mask: (H,W) bool or numeric mask.
        depth: (H,W) float32 metres, validated.
        name: the argument's name in error messages.

    Returns:
        (H,W) bool numpy copy.

    Raises:
        InputError: the mask is malformed or has too few pixels with valid depth.
    """
    if mask is None:
        raise InputError(f"{name}: registration needs an (H,W) bool mask of the object")
    mask = observation.validate_mask(mask, depth, name)
    measured = int(np.count_nonzero(depth[mask] >= MIN_DEPTH))
    if measured < MIN_MASK_DEPTH_PIXELS:
        raise InputError(
            f"{name}: only {measured} of its {int(mask.sum())} pixels have valid depth, registration needs at "
            f"least {MIN_MASK_DEPTH_PIXELS}; the object is too small or too far at this resolution, or the "
            "depth misses it (check that depth and mask are aligned)")
    return mask


# ---------------------------------------------------------------------- sizing


def geometry_of(est, mode: str, size, K, center, mask_bbox=None) -> CallGeometry:
    """The CallGeometry of one estimator's object in a call.

    Args:
        est: a PoseEstimator.
        mode: "register" or "track".
        size: (H, W) of the image.
        K: (3,3) intrinsics in pixels.
        center: (3,) camera point where the object is expected (guess or last pose), metres.
        mask_bbox: the mask's box (registration).

    Returns:
        CallGeometry.
    """
    hypotheses = len(est._rotations) if mode == "register" else 1
    return CallGeometry(mode, tuple(size), K, np.asarray(center, np.float64).copy(), mask_bbox, hypotheses,
                        float(est._centered.diameter), float(est._crop_ratio))


def call_sizing(estimators: Sequence, mode: str) -> CallSizing:
    """The CallSizing of a call over these estimators' objects (the lead's resident and outside-torch
    bytes, which count every companion, and the stages of every refiner/scorer).

    Args:
        estimators: PoseEstimators on one engine, the lead first.
        mode: "register" or "track".

    Returns:
        CallSizing.
    """
    lead = estimators[0]
    held = {id(t): t for t in tensors_in(lead._resident())}.values()
    static = sum(t.numel() * t.element_size() for t in held if t.device.type == lead.device.type)
    stages = []
    for est in estimators:
        stages.extend(name for name in est._stage_names(mode) if name not in stages)
    return CallSizing(lead.engine.planner, static + lead._external_bytes(), stages)


def _what(geometries) -> str:
    return f"{geometries[0].mode} of one frame" + (f" ({len(geometries)} objects)" if len(geometries) > 1 else "")


def scale_for(sizing: CallSizing, geometries: Sequence[CallGeometry], usable: Optional[int]) -> float:
    """The scale the call runs at: 1.0 when its smallest plan fits ``usable`` bytes, else the
    largest downscale that does (chunkpose.engine.fallback.choose_downscale).

    Args:
        sizing: the call's CallSizing.
        geometries: one CallGeometry per object.
        usable: usable budget bytes, None = unbounded.

    Returns:
        float in (0, 1].

    Raises:
        BudgetTooSmall: not even the smallest scale fits.
    """
    if usable is None or sizing.minimum_bytes(geometries, 1.0) <= usable:
        return 1.0
    return choose_downscale(lambda s: sizing.minimum_bytes(geometries, s), usable, what=_what(geometries))


def _fit_to_budget(estimators, geometries, rgb, depth, K, masks):
    """Downscale all objects' inputs alike, only if the call cannot fit the budget at full resolution."""
    engine = estimators[0].engine
    usable = engine.budget.usable_bytes
    sizing = call_sizing(estimators, geometries[0].mode)
    factor = scale_for(sizing, geometries, usable)
    if factor >= 1.0:
        return rgb, depth, K, masks
    full = sizing.minimum_bytes(geometries, 1.0)
    engine.note_downscale(factor, f"{_what(geometries)} needs at least {full / GIB:.3f} GiB at full resolution "
                                  f"{depth.shape[1]}x{depth.shape[0]} (chunk size 1), the budget allows "
                                  f"{usable / GIB:.3f} GiB")
    rgb, depth_s, K, _ = observation.resize_inputs(rgb, depth, K, None, factor)
    return rgb, depth_s, K, [None if m is None else observation.resize_mask(m, depth_s.shape) for m in masks]


# ---------------------------------------------------------------------- stages


def _partition(estimators, key) -> List[List[int]]:
    """Indices of the estimators grouped by ``key(est)`` (first appearance order)."""
    groups = {}
    for i, est in enumerate(estimators):
        groups.setdefault(key(est), []).append(i)
    return list(groups.values())


def _per_group(estimators, key, run) -> list:
    """``run(indices)`` on each group of estimators with the same ``key``; results in estimator order."""
    out = [None] * len(estimators)
    for indices in _partition(estimators, key):
        for i, value in zip(indices, run(indices)):
            out[i] = value
    return out


def _refine(estimators, jobs, iterations_of):
    engine = estimators[0].engine
    return _per_group(estimators, lambda e: (id(e.refiner), iterations_of(e)), lambda ix: estimators[ix[0]].refiner
                      .refine_many([jobs[i] for i in ix], engine, iterations_of(estimators[ix[0]])))


def _score(estimators, jobs):
    engine = estimators[0].engine
    return _per_group(estimators, lambda e: id(e.scorer),
                      lambda ix: estimators[ix[0]].scorer.score_many([jobs[i] for i in ix], engine))


def _refine_and_score(estimators, jobs, report):
    """Refine and score every object's hypotheses (a lone estimator with devices= splits its own
    over its devices, each shard's report in report.shards)."""
    shards = estimators[0]._shards if len(estimators) == 1 else None
    if shards is not None:
        poses, scores, shard_reports = shards.refine_and_score(jobs[0].poses, jobs[0].frame,
                                                               estimators[0].refine_iterations)
        report.shards.update(shard_reports)
        return [poses], [scores]
    poses = _refine(estimators, jobs, lambda e: e.refine_iterations)
    jobs = [job._replace(poses=p) for job, p in zip(jobs, poses)]
    return poses, _score(estimators, jobs)


def _polish(estimators, jobs, scores):
    """Second pass of each refiner over its polish_candidates best-scored poses; the re-scored poses
    replace their originals when they score higher."""
    engine = estimators[0].engine
    tops = [torch.argsort(s, descending=True)[:min(int(getattr(e.refiner, "polish_candidates", 0)), len(s))]
            for e, s in zip(estimators, scores)]
    active = [i for i, top in enumerate(tops) if len(top)]
    if not active:
        return [job.poses for job in jobs], scores
    subset = [estimators[i] for i in active]
    top_jobs = [jobs[i]._replace(poses=jobs[i].poses[tops[i]]) for i in active]
    polished = _per_group(subset, lambda e: id(e.refiner), lambda ix: subset[ix[0]].refiner
                          .polish_many([top_jobs[i] for i in ix], engine))
    new_scores = _score(subset, [job._replace(poses=p) for job, p in zip(top_jobs, polished)])
    poses, scores = [job.poses for job in jobs], list(scores)
    for i, p, s in zip(active, polished, new_scores):
        top, better = tops[i], s > scores[i][tops[i]]
        poses[i], scores[i] = poses[i].clone(), scores[i].clone()
        poses[i][top[better]] = p[better]
        scores[i][top[better]] = s[better]
    return poses, scores


def _health(estimators, jobs) -> List[float]:
    """The health figure of each job's single pose (NaN for estimators with checks off), as one
    engine stage over all objects."""
    checked = [i for i, est in enumerate(estimators) if est.health_threshold is not None]
    figures = [float("nan")] * len(estimators)
    if not checked:
        return figures
    groups = []
    for i in checked:
        est, job = estimators[i], jobs[i]
        groups.append(MapGroup((job.poses.detach(),), dict(
            frame=job.frame, renderer=job.renderer, crop_ratio=est.refiner.crop_ratio, size=int(est.refiner.crop_size),
            tolerance_m=est.health_tolerance * est._centered.diameter)))
    with torch.no_grad():
        out = estimators[0].engine.map_groups(silhouette_agreement, groups, name="health")
    for i, figure in zip(checked, out):
        figures[i] = float(figure[0])
    return figures


def _guess_on_frame(frame, fallback_t) -> np.ndarray:
    """Translation guess on the cleaned depth (as upstream), from the frame's tensors."""
    x0, y0 = frame.origin
    mask = frame.mask.cpu().numpy()
    depth = frame.depth.cpu().numpy()
    K = frame.K.double().cpu().numpy().copy()
    K[0, 2] -= x0
    K[1, 2] -= y0
    try:
        return translation_guess(mask, depth, K)
    except ValueError:
        return fallback_t  # clean-up removed every masked depth: keep the raw guess


def _prepare(estimators, mode, rgb, depth, K, masks, centers):
    """Downscale if needed, then every object's frame (regions merged, each pixel cleaned once)."""
    lead = estimators[0]
    geometries = [geometry_of(e, mode, depth.shape, K, c, mask_box(m) if m is not None else None)
                  for e, c, m in zip(estimators, centers, masks)]
    rgb, depth, Ks, masks = _fit_to_budget(estimators, geometries, rgb, depth, K, masks)
    regions = [call_region(mode, depth.shape, Ks, e._centered.diameter, e._crop_ratio, c, mask=m)
               for e, c, m in zip(estimators, centers, masks)]
    return observation.prepare_frames(rgb, depth, Ks, masks, regions, [e._centered.diameter for e in estimators],
                                      lead.engine, lead.device)


def _calibrate(estimators, mode, rgb, depth, K, center, mask) -> None:
    lead = estimators[0]
    if not lead.engine.budget.unbounded:
        lead._calibrate(geometry_of(lead, mode, depth.shape, K, center, mask_box(mask) if mask is not None else None),
                        rgb, depth, mask)


# ---------------------------------------------------------------------- calls


def register_objects(estimators: Sequence, rgb, depth, K, masks: Sequence[np.ndarray]) -> List[PoseResult]:
    """Register each estimator's object from its mask, all in one engine call.

    Args:
        estimators: PoseEstimators on one engine, the lead first.
        rgb: (H,W,3) uint8, as chunkpose.pipeline.frame.validate_inputs returns it.
        depth: (H,W) float32 metres, validated.
        K: (3,3) float64, validated.
        masks: per estimator its registration_mask.

    Returns:
        list of PoseResult, one per estimator (sharing the call's report); each estimator keeps its
        pose as the start of tracking.

    Raises:
        BudgetTooSmall: not even the smallest downscaled plan fits the budget.
    """
    lead = estimators[0]
    # regions are placed around the raw-depth guesses; hypotheses start at the guesses on the
    # cleaned depth (as upstream), taken once the frames are prepared
    anchors = [translation_guess(m, depth, K) for m in masks]
    _calibrate(estimators, "register", rgb, depth, K, anchors[0], masks[0])
    with lead._call("register") as report:
        frames = _prepare(estimators, "register", rgb, depth, K, list(masks), anchors)
        with lead.engine.resident(*(t for f in frames for t in f.tensors())):
            jobs = [ObjectJob(initial_poses(_guess_on_frame(f, a), device=lead.device, rotations=e._rotations), f,
                              e.renderer) for e, f, a in zip(estimators, frames, anchors)]
            with torch.no_grad():
                poses, scores = _refine_and_score(estimators, jobs, report)
                poses, scores = _polish(estimators, [j._replace(poses=p) for j, p in zip(jobs, poses)], scores)
            orders = [torch.argsort(s.detach().cpu(), descending=True, stable=True)[:KEPT_CANDIDATES] for s in scores]
            kept = [p.detach()[o.to(p.device)].to("cpu", torch.float64).numpy() for p, o in zip(poses, orders)]
            kept_scores = [s.detach().cpu()[o].double().numpy() for s, o in zip(scores, orders)]
            best = [j._replace(poses=p[o[:1].to(p.device)]) for j, p, o in zip(jobs, poses, orders)]
            health = _health(estimators, best)
        del frames, jobs, poses, scores, best
    results = []
    for est, k, ks, h in zip(estimators, kept, kept_scores, health):
        est._last_pose = est._last_good = k[0]
        results.append(PoseResult(pose=k[0] @ est._offset, score=float(ks[0]), report=report,
                                  candidates=k @ est._offset, candidate_scores=ks, health=h))
    return results


def track_objects(estimators: Sequence, rgb, depth, K) -> List[PoseResult]:
    """One tracking step of each estimator's object from its last pose, all in one engine call,
    with each result's health figure (no re-registration: see settle_tracks).

    Args:
        estimators: PoseEstimators on one engine with a pose each, the lead first.
        rgb: (H,W,3) uint8, validated.
        depth: (H,W) float32 metres, validated.
        K: (3,3) float64, validated.

    Returns:
        list of PoseResult (score NaN), one per estimator; each estimator's last pose is updated.

    Raises:
        RuntimeError: an estimator has no pose to start from.
        BudgetTooSmall: not even the smallest downscaled plan fits the budget.
    """
    if any(e._last_pose is None for e in estimators):
        raise RuntimeError("track: no pose to start from; call register(rgb, depth, K, mask) first")
    lead = estimators[0]
    centers = [e._last_pose[:3, 3] for e in estimators]
    _calibrate(estimators, "track", rgb, depth, K, centers[0], None)
    with lead._call("track") as report:
        frames = _prepare(estimators, "track", rgb, depth, K, [None] * len(estimators), centers)
        with lead.engine.resident(*(t for f in frames for t in f.tensors())):
            jobs = [ObjectJob(torch.as_tensor(e._last_pose, dtype=torch.float32, device=lead.device)[None], f,
                              e.renderer) for e, f in zip(estimators, frames)]
            with torch.no_grad():
                poses = _refine(estimators, jobs, lambda e: e.track_iterations)
            health = _health(estimators, [j._replace(poses=p) for j, p in zip(jobs, poses)])
            poses = [p[0].detach().to("cpu", torch.float64).numpy() for p in poses]
        del frames, jobs
    results = []
    for est, pose, h in zip(estimators, poses, health):
        est._last_pose = pose
        results.append(PoseResult(pose=pose @ est._offset, score=float("nan"), report=report, health=h))
    return results


def _search_region(est, depth, K, mask) -> Optional[np.ndarray]:
    """Where a lost object is registered again: ``mask`` when given (it may be empty), else the
    grown last good silhouette (chunkpose.pipeline.health.search_mask); None when it has too few
    pixels with depth (the object is still hidden)."""
    if mask is not None:
        mask = np.asarray(mask.cpu() if torch.is_tensor(mask) else mask)
        if mask.shape[:2] != depth.shape or mask.size != depth.size:
            raise InputError(f"mask: size {mask.shape} differs from depth {depth.shape}; pass the (H,W) "
                             "mask of this frame")
        mask = mask.reshape(depth.shape) != 0
    else:
        others = [(np.asarray(o._centered.vertices, np.float64), o._last_pose, o._centered.diameter)
                  for o in est._companions if o._last_pose is not None]
        mask = search_mask(np.asarray(est._centered.vertices, np.float64), est._last_good, K, depth,
                           est._centered.diameter, est.search_margin, est.health_tolerance, others)
    if np.count_nonzero(depth[mask] >= MIN_DEPTH) < MIN_MASK_DEPTH_PIXELS:
        return None
    return mask


def settle_tracks(estimators: Sequence, results: List[PoseResult], rgb, depth, K,
                  masks: Sequence[Optional[np.ndarray]]) -> List[PoseResult]:
    """After track_objects: a result below its estimator's health_threshold is lost, and the lost
    objects are registered again together (from their ``masks`` where given, else from their
    grown last good silhouettes). A healthy re-registration replaces the result
    (reregistered=True); otherwise the lost result is kept and the object's next frame starts
    from its last good pose.

    Args:
        estimators: the PoseEstimators of track_objects, same order.
        results: track_objects' results.
        rgb: (H,W,3) uint8, validated.
        depth: (H,W) float32 metres, validated.
        K: (3,3) float64, validated.
        masks: per estimator an optional (H,W) mask of this frame.

    Returns:
        list of PoseResult, one per estimator.

    Raises:
        InputError: a given mask does not have the frame's size.
    """
    results = list(results)
    lost = []
    for i, (est, result) in enumerate(zip(estimators, results)):
        if est.health_threshold is None or result.health >= est.health_threshold:
            est._last_good = est._last_pose
        else:
            lost.append(i)
    good = {i: estimators[i]._last_good for i in lost}
    for i in lost:  # other objects' search regions leave out where the lost ones were last seen well
        estimators[i]._last_pose = good[i]
    regions = {i: _search_region(estimators[i], depth, K, masks[i]) for i in lost}
    found = [i for i in lost if regions[i] is not None]
    again = dict(zip(found, register_objects([estimators[i] for i in found], rgb, depth, K,
                                             [regions[i] for i in found]))) if found else {}
    for i in lost:
        est = estimators[i]
        result = again.get(i)
        if result is not None and result.health >= est.health_threshold:
            result.lost = result.reregistered = True
            results[i] = result
        else:
            est._last_pose = est._last_good = good[i]
            results[i].lost = True
    return results
