"""PoseEstimator: register an object in one RGB-D frame, then track it, under a memory budget.

    est = PoseEstimator("mesh.obj", budget_gb=4.0)
    res = est.register(rgb, depth, K, mask)    # rgb uint8 (H,W,3), depth float32 m (H,W)
    res = est.track(rgb2, depth2, K)           # later frames, from the last pose
    res.pose (4,4) float64 object-in-camera (original mesh frame), res.score, res.report

The algorithm (FoundationPose's, see chunkpose/pipeline): depth clean-up, a translation
guess from the mask, 252 rotation hypotheses, refinement, scoring, best pose. A call flows
one way: validate -> region -> fit to the budget -> frame -> guess -> refine -> score; its
body is chunkpose.frame_calls, shared with several objects per frame (MultiObjectEstimator),
and this class holds one object's state, settings and what-ifs. Every
stage that grows with hypotheses or image size runs through the engine; the full frame
stays a host array and only the region the crops read goes on the device. Only when even
chunk size 1 does not fit the budget is the input downscaled (and the report says so); that
decision comes from chunkpose.pipeline.sizing, i.e. from the engine's own cost models of
the stages, calibrated once on a small copy of the first frame.

Over 400 lines mostly because of the Args/Returns documentation of its public API; the code
is one concern and splitting it would scatter it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch

from chunkpose.engine import GIB, Budget, Engine
from chunkpose.errors import InputError
from chunkpose.frame_calls import (KEPT_CANDIDATES, MIN_MASK_DEPTH_PIXELS, PoseResult, call_sizing, geometry_of,
                                   register_objects, registration_mask, scale_for, settle_tracks, track_objects)
from chunkpose.io.mesh import Mesh, load_mesh
from chunkpose.ops.crops import crop_windows
from chunkpose.ops.render import make_renderer
from chunkpose.pipeline import frame as observation
from chunkpose.pipeline.base import pair_resident
from chunkpose.pipeline.health import HEALTH_THRESHOLD, HEALTH_TOLERANCE, SEARCH_MARGIN
from chunkpose.pipeline.hypotheses import cluster_rotations, initial_poses, rotation_hypotheses, translation_guess
from chunkpose.pipeline.roi import CallRegion, box_around_point, call_region, mask_box
from chunkpose.pipeline.sizing import CallGeometry

__all__ = ["KEPT_CANDIDATES", "MIN_MASK_DEPTH_PIXELS", "PoseEstimator", "PoseResult", "holds_weights"]

#: The calibration copy of a frame is resized so that its region is about this many pixels
#: across (the stages' per-item costs do not depend on it).
CALIBRATION_SIDE = 192
#: Hypotheses the calibration runs the stages on, spread over the rotation set.
CALIBRATION_HYPOTHESES = 8


def holds_weights(path) -> bool:
    """Whether ``path`` holds FoundationPose's refiner and scorer runs, which ``weights=path``
    would load (nothing is loaded here)."""
    from chunkpose.pipeline.learned import holds_weights as found

    return found(path)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_list(devices, device) -> list:
    """The checked devices= list (empty when not given)."""
    if devices is None:
        return []
    if isinstance(devices, (str, torch.device)) or len(devices) < 2:
        raise InputError(f"devices: expected a list of two or more devices, e.g. ['cuda:0', 'cuda:1'], got {devices!r}"
                         " (for one device use device=)")
    try:
        devices = [torch.device(d) for d in devices]
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"devices: {exc}") from None
    if device is not None and torch.device(device) != devices[0]:
        raise InputError(f"device={device!r} and devices={[str(d) for d in devices]}: the first of devices is the "
                         "primary device; give one of them")
    for d in devices:
        if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
            raise InputError(f"devices: {d} is not available here ({torch.cuda.device_count()} CUDA devices)")
    return devices


def _translate(offset) -> np.ndarray:
    T = np.eye(4)
    T[:3, 3] = offset
    return T


class PoseEstimator:
    """Model-based 6D pose estimation of one object.

    Construct it once per object (see ``__init__`` for the arguments), call ``register`` on the
    first frame (with a mask), then ``track`` on the following frames. Every call runs under
    ``budget_gb`` of device memory.
    """

    def __init__(self, mesh, budget_gb: Optional[float] = 4.0, device=None, weights=None,
                 refine_iterations: int = 5, track_iterations: int = 2, renderer=None,
                 hypotheses: int = 252, refiner=None, scorer=None, symmetry_tfs=None, devices=None,
                 health_threshold: Optional[float] = HEALTH_THRESHOLD, health_tolerance: float = HEALTH_TOLERANCE,
                 search_margin: float = SEARCH_MARGIN):
        """Load the mesh, the refiner/scorer pair and the rotation hypotheses.

        Args:
            mesh: path (OBJ/PLY/STL/GLB/...), ``trimesh.Trimesh`` or chunkpose Mesh, in metres (a path
                or trimesh goes through chunkpose.io.mesh.load_mesh).
            budget_gb: peak device memory in GiB (2**30 bytes) for each call; None = unbounded.
            device: "cpu", "cuda", "cuda:N" or a torch.device; None = "cuda" when available, else "cpu".
            weights: None -> the weight-free geometric refiner/scorer; a FoundationPose weights folder
                (str or Path) -> the learned pair (chunkpose.pipeline.learned.load_learned).
            refine_iterations: int >= 0, refinement iterations at registration.
            track_iterations: int >= 0, refinement iterations per tracked frame.
            renderer: a chunkpose renderer of the re-centred mesh; None = make_renderer for ``device``.
            hypotheses: int >= 1, number of rotation hypotheses at registration (252 = FoundationPose).
            refiner: a chunkpose.pipeline.base.Refiner to use instead of the one ``weights`` selects.
            scorer: a chunkpose.pipeline.base.Scorer to use instead of the one ``weights`` selects.
            symmetry_tfs: optional (S,4,4) object-frame symmetry transforms of the mesh (e.g. from BOP's
                models_info.json, translations in metres); hypotheses that coincide modulo a symmetry
                (within 30 degrees) are clustered away, as upstream does, so fewer than ``hypotheses``
                may run.
            devices: optional list of two or more devices ("cuda:0", "cuda:1", ...) to split each
                registration's hypotheses over (chunkpose.pipeline.shards): the first is the primary
                (``device`` must be None or the same), every device gets its own replica of the pair,
                a renderer and an Engine with ``budget_gb``; the pose equals the one-device pose.
                Tracking (one hypothesis) runs on the primary.
            health_threshold: a tracked frame whose health figure (see PoseResult.health) is below
                this is lost, and the estimator re-registers (see track); None = no health figure, no
                re-registration (upstream's tracker). Default 0.7.
            health_tolerance: depth agreement tolerance of the health figure, fraction of the
                diameter (default 0.1).
            search_margin: without a new mask, re-registration searches the last good pose's
                silhouette hull grown by this fraction of the object's image diameter (default 0.5).

        Raises:
            InputError: an iteration count or ``hypotheses`` is not a valid integer, the mesh cannot be
                loaded or is not in metres, or (CheckpointError) ``weights`` is not a usable weights
                folder.
            ValueError: ``budget_gb`` is not a positive number or None, or ``device`` is unusable.
        """
        devices = _device_list(devices, device)
        device = devices[0] if devices else device
        if health_threshold is not None and not 0.0 <= float(health_threshold) <= 1.0:
            raise InputError(f"health_threshold: expected a fraction in [0, 1] or None, got {health_threshold!r}")
        if not float(health_tolerance) > 0 or not float(search_margin) >= 0:
            raise InputError(f"health_tolerance must be > 0 and search_margin >= 0, got {health_tolerance!r}, "
                             f"{search_margin!r}")
        self.health_threshold = None if health_threshold is None else float(health_threshold)
        self.health_tolerance = float(health_tolerance)
        self.search_margin = float(search_margin)
        for name, value in (("refine_iterations", refine_iterations), ("track_iterations", track_iterations),
                            ("hypotheses", hypotheses)):
            if int(value) != value or value < (1 if name == "hypotheses" else 0):
                raise InputError(f"{name}: expected a non-negative integer (hypotheses >= 1), got {value!r}")
        self.mesh = mesh if isinstance(mesh, Mesh) else load_mesh(mesh)
        # The pipeline works on the mesh re-centred on its bbox centre (as upstream): crops
        # and rotations are about the object's middle, not an arbitrary model origin.
        self._centered = self.mesh.centered()
        self._offset = _translate(-np.asarray(self.mesh.center, dtype=np.float64))
        self.device = torch.device(device or _default_device())
        self.engine = Engine(budget_gb, device=self.device)
        self.budget_gb = budget_gb
        self.renderer = renderer if renderer is not None else make_renderer(self._centered, self.device)
        if weights is not None and (refiner is None or scorer is None):
            from chunkpose.pipeline.learned import load_learned

            learned_refiner, learned_scorer = load_learned(weights, device=self.device)
            refiner = refiner or learned_refiner
            scorer = scorer or learned_scorer
        if refiner is None or scorer is None:
            from chunkpose.pipeline.geometric import GeometricRefiner, GeometricScorer

            refiner = refiner or GeometricRefiner()
            scorer = scorer or GeometricScorer()
        self.refiner, self.scorer = refiner, scorer
        self.refine_iterations = int(refine_iterations)
        self.track_iterations = int(track_iterations)
        self.hypotheses = int(hypotheses)
        # Choose the rotation set now: its selection and clustering work on
        # (rotations x rotations) tables that have no business inside a budgeted call.
        rotations = rotation_hypotheses(self.hypotheses)
        if symmetry_tfs is not None:
            rotations = cluster_rotations(rotations, symmetry_tfs)
        self._rotations = rotations.to(self.device)
        self._shards = self._replicate(devices[1:], budget_gb, renderer is not None) if devices else None
        self._last_pose = None  # (4,4) float64, re-centred mesh in camera
        self._last_good = None  # the last pose that passed the health check (same frame)
        # other objects' estimators on the same engine (MultiObjectEstimator): what they hold
        # stays on the device during this one's calls, so it is counted there too
        self._companions: list = []
        self._calibrated: set = set()

    # ------------------------------------------------------------------ public API

    @property
    def last_pose(self) -> Optional[np.ndarray]:
        """The last returned pose (original mesh frame), or None before register."""
        return None if self._last_pose is None else self._last_pose @ self._offset

    def reset(self) -> None:
        """Forget the tracked pose (the next call must be register)."""
        self._last_pose = None
        self._last_good = None

    def register(self, rgb, depth, K, mask) -> PoseResult:
        """Pose of the object in one frame from scratch.

        The pose is also kept as the starting point of track().

        Args:
            rgb: (H,W,3) uint8 colour image (numpy array or tensor).
            depth: (H,W) float depth in metres, 0 (or NaN/inf) = missing.
            K: (3,3) camera intrinsics in pixels.
            mask: (H,W) bool (or numeric, non-zero = object) mask of the object; at least
                MIN_MASK_DEPTH_PIXELS of its pixels need valid depth.

        Returns:
            PoseResult: pose (4,4) float64 in the original mesh frame, its score, the call's report and
            the best-scored candidates.

        Raises:
            InputError: an input has the wrong shape, dtype or units, the mask is empty, or too few mask
                pixels have valid depth.
            BudgetTooSmall: not even the smallest downscaled plan fits ``budget_gb``.
        """
        rgb, depth, K, _ = observation.validate_inputs(rgb, depth, K, None, require_mask=False)
        return register_objects([self], rgb, depth, K, [registration_mask(mask, depth)])[0]

    def track(self, rgb, depth, K, mask=None) -> PoseResult:
        """Pose in the next frame, refined from the last one (track_iterations, no scoring), with a
        health check.

        Call register() first. When the tracked pose's health figure is below health_threshold the
        frame is lost and the estimator re-registers on it: from ``mask`` when given, otherwise from
        the last good pose's silhouette grown by search_margin (chunkpose.pipeline.health). If the
        re-registration's pose is healthy it is returned (reregistered=True) and tracking goes on
        from it; otherwise the tracked pose is returned with lost=True and the next frame starts
        again from the last good pose.

        Args:
            rgb: (H,W,3) uint8 colour image.
            depth: (H,W) float depth in metres, 0 (or NaN/inf) = missing.
            K: (3,3) camera intrinsics in pixels.
            mask: optional (H,W) bool object mask of this frame (e.g. from a detector), used only
                when the frame is lost.

        Returns:
            PoseResult with pose (4,4) float64 (original mesh frame), health, lost and reregistered;
            score NaN and empty candidates unless it was re-registered.

        Raises:
            RuntimeError: there is no pose to start from (register() was not called, or reset()).
            InputError: an input has the wrong shape, dtype or units.
            BudgetTooSmall: not even the smallest downscaled plan fits ``budget_gb``.
        """
        rgb, depth, K, _ = observation.validate_inputs(rgb, depth, K, None, require_mask=False)
        results = track_objects([self], rgb, depth, K)
        return settle_tracks([self], results, rgb, depth, K, [mask])[0]

    def required_budget_gb(self, rgb, depth, K, mask=None, scale: float = 1.0) -> float:
        """The smallest budget_gb (GiB) under which this frame runs at `scale` x its resolution
        without being downscaled further.

        Register when a mask is given, track (from the last pose) without one. The same estimate
        register/track use to decide on downscaling (chunkpose.pipeline.sizing); it calibrates the
        stages' cost models first if they are not yet.

        Args:
            rgb: (H,W,3) uint8 colour image.
            depth: (H,W) float depth in metres.
            K: (3,3) camera intrinsics in pixels.
            mask: (H,W) bool object mask for a register estimate; None estimates a track call.
            scale: resolution factor in (0, 1] the frame would run at (1.0 = full resolution).

        Returns:
            float: the budget in GiB (margins included).

        Raises:
            InputError: an input has the wrong shape, dtype or units.
            RuntimeError: ``mask`` is None but there is no pose to track from yet.
        """
        geometry, rgb, depth = self._what_if_geometry(rgb, depth, K, mask)
        self._calibrate(geometry, rgb, depth, mask)
        need = call_sizing([self], geometry.mode).minimum_bytes([geometry], float(scale))
        return Budget.from_gb(1.0, self.device).budget_for_usable(need) / GIB

    def estimate_peak_bytes(self, rgb, depth, K, mask=None) -> int:
        """The peak device bytes (torch and outside it) a register (mask given) or track call on this
        frame is predicted to reach under this estimator's budget.

        The what-if the real call can be checked against (report.total_peak_bytes), at the scale the
        call would choose.

        Args:
            rgb: (H,W,3) uint8 colour image.
            depth: (H,W) float depth in metres.
            K: (3,3) camera intrinsics in pixels.
            mask: (H,W) bool object mask for a register estimate; None estimates a track call.

        Returns:
            int: predicted peak in bytes.

        Raises:
            InputError: an input has the wrong shape, dtype or units.
            RuntimeError: ``mask`` is None but there is no pose to track from yet.
            BudgetTooSmall: the call would not fit the budget even downscaled.
        """
        geometry, rgb, depth = self._what_if_geometry(rgb, depth, K, mask)
        self._calibrate(geometry, rgb, depth, mask)
        sizing = call_sizing([self], geometry.mode)
        usable = self.engine.budget.usable_bytes
        return sizing.peak_bytes([geometry], scale_for(sizing, [geometry], usable), usable=usable)

    def inspect_crops(self, rgb, depth, K, poses, mask=None) -> dict:
        """What the refiner compares for each of ``poses``: its crop of the render beside the same crop
        of the observation (for debugging a bad pose).

        Runs outside the engine (no budget), on the CPU except for the render.

        Args:
            rgb: (H,W,3) uint8 colour image, as register takes it.
            depth: (H,W) float depth in metres.
            K: (3,3) camera intrinsics in pixels.
            poses: (k,4,4) object-in-camera poses in the original mesh frame (metres), e.g. a
                registration's result.candidates.
            mask: optional (H,W) bool object mask.

        Returns:
            dict of (k,3,s,s) float32 CPU tensors in 0..1 (s = the refiner's crop_size): "rendered" and
            "observed" colour, and "rendered_depth" and "observed_depth" scaled to the pose's depth +- a
            diameter (0 where there is no depth).

        Raises:
            InputError: an input has the wrong shape, dtype or units.
        """
        rgb, depth, K, mask = observation.validate_inputs(rgb, depth, K, mask, require_mask=False)
        centred = torch.as_tensor(np.asarray(poses, np.float64) @ np.linalg.inv(self._offset), dtype=torch.float32)
        boxes = [box_around_point(p[:3, 3].numpy(), K, self._centered.diameter, self.refiner.crop_ratio) for p in centred]
        region = CallRegion.of_box((min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                                    max(b[3] for b in boxes)), depth.shape, mask is not None)
        frame = observation.prepare_frame(rgb, depth, K, mask, region, self._centered.diameter, None, "cpu")
        size = int(self.refiner.crop_size)
        transforms = crop_windows(centred, frame.K, frame.diameter, self.refiner.crop_ratio, size).transforms
        with torch.no_grad():
            rendered = self.renderer.render_crops(centred.to(self.device), frame.K, transforms.to(self.device), size)
        observed_z = frame.xyz_crops(transforms, size)[:, 2]
        z0 = centred[:, 2, 3][:, None, None]

        def depth_picture(z):
            scaled = ((z - z0) / self._centered.diameter * 0.5 + 0.5).clamp(0, 1)
            return torch.where(z > 0, scaled, torch.zeros_like(scaled))[:, None].expand(-1, 3, -1, -1)

        return {"rendered": rendered["rgb"].cpu(), "observed": frame.rgb_crops(transforms, size) / 255.0,
                "rendered_depth": depth_picture(rendered["depth"].cpu()), "observed_depth": depth_picture(observed_z)}

    # ------------------------------------------------------------------ budget

    @property
    def _crop_ratio(self) -> float:
        return max(self.refiner.crop_ratio, self.scorer.crop_ratio)

    def _what_if_geometry(self, rgb, depth, K, mask):
        mode = "register" if mask is not None else "track"
        rgb, depth, K, mask = observation.validate_inputs(rgb, depth, K, mask, require_mask=mode == "register")
        if mode == "track":
            if self._last_pose is None:
                raise RuntimeError("a what-if without a mask estimates tracking: call register() first")
            return geometry_of(self, "track", depth.shape, K, self._last_pose[:3, 3]), rgb, depth
        anchor = translation_guess(mask, depth, K)
        return geometry_of(self, "register", depth.shape, K, anchor, mask_box(mask)), rgb, depth

    def _resident(self) -> list:
        """What the estimator holds on the device for a whole call: the networks, the
        renderer's tensors, the rotation set."""
        held = []
        for est in (self, *self._companions):
            # a companion's pair is usually this one's; it counts once (the meter keys by
            # storage, call_sizing by tensor)
            held.extend(pair_resident(est.refiner, est.scorer, est.renderer))
            held.append(est._rotations)
        return held

    def _external_bytes(self) -> int:
        """Renderer memory outside torch's allocator: this object's crop framebuffers and mesh
        buffers, and the mesh buffers its companions' renderers keep (the framebuffers of
        renderers in one process are shared)."""
        sizes = sorted({int(self.refiner.crop_size), int(self.scorer.crop_size)})
        total = 0
        for est in (self, *self._companions):
            external = getattr(est.renderer, "external_bytes", None)
            total += int(external(sizes if est is self else ())) if callable(external) else 0
        return total

    def _stage_names(self, mode: str) -> tuple:
        names = [getattr(self.refiner, "stage_name", None)]
        if mode == "register":
            names.append(getattr(self.scorer, "stage_name", None))
        return tuple(name for name in names if name)

    def _calibrate(self, geometry: CallGeometry, rgb, depth, mask) -> None:
        """Once per mode: run the call's stages on a few spread hypotheses of a small copy
        of this frame, so the engine holds measured cost models of every stage before the
        first decision that needs them (the what-if, the downscale, the first plan)."""
        if geometry.mode in self._calibrated:
            return
        region = geometry.region()
        side = max(region.roi[2] - region.roi[0], region.roi[3] - region.roi[1])
        factor = min(1.0, CALIBRATION_SIDE / side)
        rgb_s, depth_s, K_s, mask_s = observation.resize_inputs(rgb, depth, geometry.K, mask, factor)
        if mask_s is not None and not mask_s.any():
            mask_s = None
        small = call_region(geometry.mode, depth_s.shape, K_s, self._centered.diameter, self._crop_ratio,
                            geometry.center, mask=mask_s) if mask_s is not None or geometry.mode == "track" else None
        if small is None:
            return
        with self.engine.call(f"calibrate.{geometry.mode}", resident=self._resident()), \
                self.engine.external("renderer", self._external_bytes()):
            frame = observation.prepare_frame(rgb_s, depth_s, K_s, mask_s, small, self._centered.diameter, None,
                                              self.device)
            if geometry.mode == "register":
                picks = torch.linspace(0, len(self._rotations) - 1, CALIBRATION_HYPOTHESES).round().long().unique()
                poses = initial_poses(geometry.center, device=self.device, rotations=self._rotations[picks.to(self.device)])
            else:
                poses = torch.as_tensor(self._last_pose, dtype=torch.float32, device=self.device)[None]
            with self.engine.resident(*frame.tensors()), self.engine.calibrating(), torch.no_grad():
                poses = self.refiner.refine(poses, frame, self.renderer, self.engine, 2)
                if geometry.mode == "register":
                    self.scorer.score(poses, frame, self.renderer, self.engine)
        self._calibrated.add(geometry.mode)

    # ------------------------------------------------------------------ several devices

    def _replicate(self, others, budget_gb, custom_renderer: bool):
        """HypothesisShards over this estimator (primary) and a replica on each of ``others``."""
        from chunkpose.pipeline.shards import DeviceReplica, HypothesisShards, replicate_stage

        if custom_renderer:
            raise InputError("renderer: a renderer given by the caller cannot be replicated over devices=; "
                             "leave renderer=None with several devices")
        replicas = [DeviceReplica(self.device, self.engine, self.renderer, self.refiner, self.scorer)]
        for dev in others:
            replicas.append(DeviceReplica(dev, Engine(budget_gb, device=dev), make_renderer(self._centered, dev),
                                          replicate_stage(self.refiner, dev), replicate_stage(self.scorer, dev)))
        return HypothesisShards(replicas)

    @contextmanager
    def _call(self, name: str):
        """The engine's call context with what the estimator holds counted from the first
        byte, and the renderer's framebuffers declared as memory outside torch."""
        with self.engine.call(name, resident=self._resident()) as report, \
                self.engine.external("renderer", self._external_bytes()):
            yield report
