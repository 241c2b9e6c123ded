"""PoseEstimator: register an object in one RGB-D frame, then track it, under a memory budget.

    est = PoseEstimator("mesh.obj", budget_gb=4.0)
    res = est.register(rgb, depth, K, mask)    # rgb uint8 (H,W,3), depth float32 m (H,W)
    res = est.track(rgb2, depth2, K)           # later frames, from the last pose
    res.pose (4,4) float64 object-in-camera (original mesh frame), res.score, res.report

The algorithm (FoundationPose's, see chunkpose/pipeline): depth clean-up, a translation
guess from the mask, 252 rotation hypotheses, refinement, scoring, best pose. Every stage
that grows with hypotheses or image size runs through the engine; the full frame stays a
host array and only the region the crops read goes on the device. Only when even chunk
size 1 does not fit the budget is the input downscaled (and the report says so).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from chunkpose.pipeline import frame as framing
from chunkpose.pipeline.hypotheses import initial_poses, translation_guess

#: The ROI around the expected object covers this many crop windows' widths (registration:
#: the guess can be off by about a radius; tracking: the object moves between frames).
REGISTER_ROI_MARGIN = 2.0
TRACK_ROI_MARGIN = 3.0
#: Registration needs at least this many mask pixels with valid depth: fewer cannot pin
#: down a 6D pose (the refiners need tens of point pairs), so it stops with a clear error.
MIN_MASK_DEPTH_PIXELS = 30


@dataclass
class PoseResult:
    """pose (4,4) float64 object-in-camera in the original mesh frame (metres); score float
    (NaN when tracking, which does not score); report: the engine's RunReport of the call."""

    pose: np.ndarray
    score: float
    report: object


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _translate(offset) -> np.ndarray:
    T = np.eye(4)
    T[:3, 3] = offset
    return T


def crop_roi(center_cam: np.ndarray, K: np.ndarray, diameter: float, crop_ratio: float):
    """(x0,y0,x1,y1) full-frame box of a "box_3d" crop window (unclipped, end-exclusive)
    around the camera point center_cam (3,): the projection of center +- r x and +- r y,
    r = diameter * crop_ratio / 2."""
    r = diameter * crop_ratio / 2.0
    z = max(float(center_cam[2]), 1e-3)
    u = K[0, 0] * center_cam[0] / z + K[0, 2]
    v = K[1, 1] * center_cam[1] / z + K[1, 2]
    half = max(K[0, 0], K[1, 1]) * r / z + 2.0  # the +-r points project at f r / z
    return (int(math.floor(u - half)), int(math.floor(v - half)),
            int(math.ceil(u + half)) + 1, int(math.ceil(v + half)) + 1)


class PoseEstimator:
    """Model-based 6D pose estimation of one object.

    mesh: path, trimesh.Trimesh or chunkpose Mesh (metres). budget_gb: peak device memory
    in GiB for each call (None = unbounded). device: "cuda" when available, else "cpu".
    weights: None -> the weight-free geometric refiner/scorer; a FoundationPose weights
    folder -> the learned pair. refine_iterations (registration), track_iterations
    (tracking). renderer: a chunkpose renderer (default: make_renderer for the device).
    hypotheses: number of rotation hypotheses at registration (252 = FoundationPose).
    symmetry_tfs: optional (S,4,4) object-frame symmetry transforms of the mesh (e.g. from
    BOP's models_info.json); hypotheses that coincide modulo a symmetry (within 30 degrees)
    are clustered away, as upstream does, so fewer than `hypotheses` may run.
    """

    def __init__(self, mesh, budget_gb: Optional[float] = 4.0, device=None, weights=None,
                 refine_iterations: int = 5, track_iterations: int = 2, renderer=None,
                 hypotheses: int = 252, refiner=None, scorer=None, symmetry_tfs=None):
        from chunkpose.engine import Engine
        from chunkpose.io.mesh import Mesh, load_mesh

        for name, value in (("refine_iterations", refine_iterations), ("track_iterations", track_iterations),
                            ("hypotheses", hypotheses)):
            if int(value) != value or value < (1 if name == "hypotheses" else 0):
                raise ValueError(f"{name}: expected a non-negative integer (hypotheses >= 1), got {value!r}")
        self.mesh = mesh if isinstance(mesh, Mesh) else load_mesh(mesh)
        # The pipeline works on the mesh re-centred on its bbox centre (as upstream): crops
        # and rotations are about the object's middle, not an arbitrary model origin.
        self._centered = self.mesh.centered()
        self._offset = _translate(-np.asarray(self.mesh.center, dtype=np.float64))
        self.device = torch.device(device or _default_device())
        self.engine = Engine(budget_gb, device=self.device)
        self.budget_gb = budget_gb
        if renderer is None:
            from chunkpose.ops.render import make_renderer

            renderer = make_renderer(self._centered, self.device)
        self.renderer = renderer
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
        from chunkpose.pipeline.hypotheses import cluster_rotations, rotation_hypotheses

        rotations = rotation_hypotheses(self.hypotheses)
        self._rotations = rotations if symmetry_tfs is None else cluster_rotations(rotations, symmetry_tfs)
        self._last_pose = None  # (4,4) float64, re-centred mesh in camera

    # ------------------------------------------------------------------ public API

    @property
    def last_pose(self) -> Optional[np.ndarray]:
        """The last returned pose (original mesh frame), or None before register."""
        return None if self._last_pose is None else self._last_pose @ self._offset

    def reset(self) -> None:
        """Forget the tracked pose (the next call must be register)."""
        self._last_pose = None

    def register(self, rgb, depth, K, mask) -> PoseResult:
        """Pose of the object in one frame from scratch.

        rgb uint8 (H,W,3), depth float32 metres (H,W) (0 = missing), K (3,3), mask bool
        (H,W) of the object. Returns PoseResult; the pose is also kept for track().
        """
        rgb, depth, K, mask = framing.validate_inputs(rgb, depth, K, mask, require_mask=True)
        measured = int(np.count_nonzero(depth[mask] >= 0.001))
        if measured < MIN_MASK_DEPTH_PIXELS:
            raise ValueError(
                f"mask: only {measured} of its {int(mask.sum())} pixels have valid depth, registration needs at "
                f"least {MIN_MASK_DEPTH_PIXELS}; the object is too small or too far at this resolution, or the "
                "depth misses it (check that depth and mask are aligned)")
        with self._call("register") as report:
            rgb, depth, Ks, mask, factor = self._fit_to_budget(rgb, depth, K, mask, "register")
            diameter = self._centered.diameter
            # The ROI is chosen from the raw depth; the guess is then taken on the cleaned ROI.
            rough_t = translation_guess(mask, depth, Ks)
            roi = framing.union_roi(framing.mask_bbox(mask), self._roi_around(rough_t, Ks, REGISTER_ROI_MARGIN))
            frame = framing.prepare_frame(rgb, depth, Ks, mask, roi, diameter, self.engine, self.device)
            with self._resident(frame):
                t = self._guess_on_frame(frame, rough_t)
                poses = initial_poses(t, device=self.device, rotations=self._rotations)
                with torch.no_grad():
                    poses = self.refiner.refine(poses, frame, self.renderer, self.engine, self.refine_iterations)
                    scores = self.scorer.score(poses, frame, self.renderer, self.engine)
                    poses, scores = self._polish(poses, scores, frame)
                best = int(torch.argmax(scores))
                pose = poses[best].detach().to("cpu", torch.float64).numpy()
                score = float(scores[best])
            del frame, poses, scores
        self._last_pose = pose
        return PoseResult(pose=pose @ self._offset, score=score, report=report)

    def track(self, rgb, depth, K) -> PoseResult:
        """Pose in the next frame, refined from the last one (track_iterations, no scoring).

        rgb uint8 (H,W,3), depth float32 metres (H,W), K (3,3). Call register() first.
        """
        if self._last_pose is None:
            raise RuntimeError("track: no pose to start from; call register(rgb, depth, K, mask) first")
        rgb, depth, K, _ = framing.validate_inputs(rgb, depth, K, None, require_mask=False)
        with self._call("track") as report:
            rgb, depth, Ks, _, factor = self._fit_to_budget(rgb, depth, K, None, "track")
            roi = self._roi_around(self._last_pose[:3, 3], Ks, TRACK_ROI_MARGIN)
            frame = framing.prepare_frame(rgb, depth, Ks, None, roi, self._centered.diameter,
                                          self.engine, self.device)
            with self._resident(frame):
                poses = torch.as_tensor(self._last_pose, dtype=torch.float32, device=self.device)[None]
                with torch.no_grad():
                    poses = self.refiner.refine(poses, frame, self.renderer, self.engine, self.track_iterations)
                pose = poses[0].detach().to("cpu", torch.float64).numpy()
            del frame, poses
        self._last_pose = pose
        return PoseResult(pose=pose @ self._offset, score=float("nan"), report=report)

    def _polish(self, poses, scores, frame):
        """Second pass of the refiner over its polish_candidates best-scored poses (if it
        has one); the re-scored poses replace their originals when they score higher."""
        k = min(int(getattr(self.refiner, "polish_candidates", 0)), len(poses))
        if k <= 0:
            return poses, scores
        top = torch.argsort(scores, descending=True)[:k]
        polished = self.refiner.polish(poses[top], frame, self.renderer, self.engine)
        new_scores = self.scorer.score(polished, frame, self.renderer, self.engine)
        better = new_scores > scores[top]
        poses, scores = poses.clone(), scores.clone()
        poses[top[better]] = polished[better]
        scores[top[better]] = new_scores[better]
        return poses, scores

    # ------------------------------------------------------------------ budget

    def minimum_bytes(self, roi_pixels: int, hypotheses: int) -> int:
        """Smallest device footprint (bytes) of a call whose ROI has roi_pixels pixels:
        the resident ROI tensors, the renderer/network residents, the hypothesis state,
        and the largest stage at chunk size 1."""
        stage = max(self.refiner.item_bytes(), self.scorer.item_bytes())
        resident = self.refiner.resident_bytes() + self.scorer.resident_bytes() + self._renderer_bytes()
        state = hypotheses * (4 * 16 * 3 + 4 * 4)  # poses in/out/scores and small per-item bits
        return int(roi_pixels * framing.roi_bytes_per_pixel() + resident + state + stage)

    def _renderer_bytes(self) -> int:
        if self.device.type == "cpu" and getattr(self.renderer, "backend", "") == "gl":
            return 0  # GL buffers live in the GL driver, not in torch memory
        m = self._centered
        return int(m.vertices.shape[0] * 4 * 11 + m.faces.shape[0] * 8 * 3)

    def _roi_pixels(self, rgb_shape, K, mask, t_guess, mode: str, factor: float) -> int:
        """ROI size in pixels (halo included) for a frame downscaled by `factor`."""
        H, W = rgb_shape
        h, w = max(2, int(round(H * factor))), max(2, int(round(W * factor)))
        Ks = K.copy()
        Ks[0] *= w / W
        Ks[1] *= h / H
        margin = REGISTER_ROI_MARGIN if mode == "register" else TRACK_ROI_MARGIN
        roi = self._roi_around(t_guess, Ks, margin)
        if mask is not None:
            x0, y0, x1, y1 = framing.mask_bbox(mask)
            roi = framing.union_roi(roi, (int(x0 * w / W), int(y0 * h / H),
                                          int(math.ceil(x1 * w / W)), int(math.ceil(y1 * h / H))))
        x0, y0, x1, y1 = framing.clip_roi(roi, (h, w))
        halo = 2 * framing.CLEANUP_HALO
        return (min(h, y1 - y0 + halo)) * (min(w, x1 - x0 + halo))

    def required_budget_gb(self, rgb, depth, K, mask=None, scale: float = 1.0) -> float:
        """The smallest budget_gb (GiB) under which this frame runs at `scale` x its
        resolution without being downscaled further: register when a mask is given, track
        (from the last pose) without one. The same estimate register/track use to decide
        on downscaling: resident ROI tensors and networks plus the largest stage at chunk
        size 1. Arguments as register (mask None: as track)."""
        from chunkpose.engine import GIB, Budget

        mode = "register" if mask is not None else "track"
        _, depth, K, mask = framing.validate_inputs(rgb, depth, K, mask, require_mask=mode == "register")
        if mode == "track" and self._last_pose is None:
            raise RuntimeError("required_budget_gb without a mask estimates tracking: call register() first")
        need = self._need_at_scale(depth, K, mask, mode)(float(scale))
        return Budget.from_gb(1.0, self.device).budget_for_usable(need) / GIB

    def _need_at_scale(self, depth, K, mask, mode: str):
        """factor -> minimum bytes of a register/track call on this frame downscaled by factor."""
        t = translation_guess(mask, depth, K) if mode == "register" else self._last_pose[:3, 3]
        count = len(self._rotations) if mode == "register" else 1
        return lambda factor: self.minimum_bytes(self._roi_pixels(depth.shape, K, mask, t, mode, factor), count)

    def _fit_to_budget(self, rgb, depth, K, mask, mode: str):
        """Downscale only if the call cannot fit the budget at full resolution."""
        budget = self.engine.budget_bytes
        if budget is None:
            return rgb, depth, K, mask, 1.0
        need = self._need_at_scale(depth, K, mask, mode)
        usable = self.engine.budget.usable_bytes
        full = need(1.0)
        if full <= usable:
            return rgb, depth, K, mask, 1.0
        from chunkpose.engine.fallback import choose_downscale

        # Raises BudgetTooSmall (with the minimum) when not even the smallest scale fits.
        factor = choose_downscale(lambda s: need(s), usable, what=f"{mode} of one frame")
        reason = (f"{mode} needs at least {full / 2**30:.3f} GiB at full resolution "
                  f"{depth.shape[1]}x{depth.shape[0]} (chunk size 1), the budget allows "
                  f"{usable / 2**30:.3f} GiB")
        self.engine.note_downscale(factor, reason)
        rgb, depth, K, mask = framing.resize_inputs(rgb, depth, K, mask, factor)
        return rgb, depth, K, mask, factor

    # ------------------------------------------------------------------ helpers

    def _roi_around(self, center_cam, K, margin: float):
        ratio = max(self.refiner.crop_ratio, self.scorer.crop_ratio) * margin
        return crop_roi(np.asarray(center_cam, dtype=np.float64), K, self._centered.diameter, ratio)

    def _guess_on_frame(self, frame, fallback_t) -> np.ndarray:
        """Translation guess on the cleaned depth (as upstream), from the ROI tensors."""
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

    def _resident(self, frame):
        tensors = [t for t in (frame.rgb, frame.depth, frame.xyz, frame.mask) if t is not None]
        return self.engine.resident(*tensors)

    def _call(self, name: str):
        return _Call(self.engine, name)


class _Call:
    """One measured call: a fresh report, one engine session around everything."""

    def __init__(self, engine, name):
        self.engine, self.name = engine, name

    def __enter__(self):
        from chunkpose.engine import RunReport

        # Each call reports on itself; the planner's cache (per stage signature) is kept,
        # so a tracking loop plans once.
        self.engine.report = RunReport(budget_bytes=self.engine.budget_bytes, device=str(self.engine.device))
        self._session = self.engine.session(self.name)
        self._session.__enter__()
        return self.engine.report

    def __exit__(self, *exc):
        return self._session.__exit__(*exc)
