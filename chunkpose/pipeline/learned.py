"""FoundationPose-compatible learned refiner and scorer (Refiner / Scorer of base.py).

Each refine iteration and the scorer's per-hypothesis part is ONE engine stage whose op
takes a slice of poses and does everything for it: crop windows, render the mesh into the
crops, warp the observed frame into the same crops, build the network inputs, run the
network (and, for the refiner, apply the pose update). Nothing of size B x crop survives a
chunk, so the engine can trade speed for memory freely. The scorer's att_cross, which
compares all hypotheses, runs once on the gathered (B,512) features.

Input preparation (as upstream's make_crop_data_batch and its dataset's transform_batch):
per side 6 channels, rgb in 0..1 and xyz relative to the hypothesis' translation, divided by
the radius when the config says normalize_xyz. Then, per channel, values with |value| >= 2
are zeroed, and all three channels where the camera z is below the side's threshold (0.001 m
refiner, 0.1 m scorer). A = rendered (headlight-shaded, drawn with upstream's crop box), B =
observed (sampled as kornia 0.7.2 samples). ``crop_pair`` returns both for given poses.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch

from chunkpose.models.checkpoint import CheckpointError, NetworkConfig, find_run_folders, load_weights, make_config
from chunkpose.models.refine_net import RefineNet, apply_update
from chunkpose.models.score_net import ScoreNetMultiPair
from chunkpose.engine import MapGroup
from chunkpose.pipeline.base import ObjectJob, ObservedFrame, Refiner, Scorer

#: Camera-z below which a point counts as missing (refiner / scorer inputs).
REFINER_MIN_Z = 0.001
SCORER_MIN_Z = 0.1
#: Normalised coordinates at or beyond this magnitude are zeroed (far from the object).
MAX_NORMALISED = 2.0
#: How the observed crops are sampled: as kornia 0.7.2 (pinned upstream) does, which is what
#: the official weights were trained on.
UPSTREAM_SAMPLING = "kornia_0.7.2"


def normalised_xyz(xyz: torch.Tensor, centers: torch.Tensor, diameter: float, min_z: float,
                   normalize: bool = True) -> torch.Tensor:
    """One side's xyz channels as the networks see them.

    Args:
        xyz: (N,3,s,s) camera-frame points in metres (0 where nothing was seen or rendered).
        centers: (N,3) the hypotheses' translations in metres (the re-centred mesh's origin in
            the camera).
        diameter: object diameter in metres.
        min_z: camera z in metres below which a pixel is missing (0.001 refiner, 0.1 scorer).
        normalize: the config's normalize_xyz (default True).

    Returns:
        (N,3,s,s) in xyz's dtype: with normalize, (xyz - centers) / (diameter/2) where each
        channel with |value| >= 2 is 0 on its own (a far background pixel stays (x, y, 0)) and
        all three are 0 where z < min_z; without, xyz - centers in metres and no masking (as
        upstream).
    """
    rel = xyz - centers[:, :, None, None].to(xyz.dtype)
    if not normalize:
        return rel
    rel = rel / (diameter / 2.0)
    invalid = (xyz[:, 2:3] < min_z) | (rel.abs() >= MAX_NORMALISED)
    return rel.masked_fill(invalid, 0.0)


def network_input(rgb01: torch.Tensor, xyz: torch.Tensor, centers: torch.Tensor, diameter: float,
                  min_z: float, normalize: bool = True) -> torch.Tensor:
    """One side's 6-channel input (N,6,s,s): rgb (N,3,s,s) in 0..1, then normalised_xyz.

    Args:
        rgb01: (N,3,s,s) colour in 0..1.
        xyz: (N,3,s,s) camera-frame points in metres.
        centers: (N,3) hypothesis translations in metres.
        diameter: object diameter in metres.
        min_z: camera z in metres below which a pixel is missing.
        normalize: the config's normalize_xyz (default True).

    Returns:
        (N,6,s,s) float32 (rgb channels first, then xyz).
    """
    return torch.cat([rgb01.to(torch.float32), normalised_xyz(xyz, centers, diameter, min_z, normalize)], dim=1)


def autocast_for(device: torch.device, enabled: bool = True):
    """fp16 autocast on CUDA (as upstream); a no-op elsewhere (CPU stays float32).

    Args:
        device: the device the networks run on.
        enabled: False always returns the no-op (default True).

    Returns:
        A context manager: torch.autocast(cuda, float16) or contextlib.nullcontext().
    """
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def crop_pair(poses: torch.Tensor, frame: ObservedFrame, renderer, crop_ratio: float, size: int,
              min_z: float, xyz_semantics: str, normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both network inputs for poses on a prepared frame, as upstream prepares them.

    The render uses upstream's crop box (crop pixel j shows T^-1((j + 1/2)(size-1)/size)); the
    observed crops are sampled as kornia 0.7.2 samples them (chunkpose.ops.crops.sampling_maps).

    Args:
        poses: (N,4,4) float32 re-centred object-in-camera poses, metres.
        frame: an ObservedFrame (chunkpose.pipeline.frame.prepare_frame).
        renderer: a chunkpose renderer of the re-centred mesh (headlight shading on).
        crop_ratio: the run config's crop_ratio (crop side / diameter).
        size: the run config's input_resize (crop side in pixels).
        min_z: 0.001 (refiner, REFINER_MIN_Z) or 0.1 (scorer, SCORER_MIN_Z), metres.
        xyz_semantics: "refiner" or "scorer" (see chunkpose.ops.warp.xyz_crops).
        normalize: the config's normalize_xyz (default True).

    Returns:
        (A, B): A rendered and B observed, each (N,6,size,size) float32 on the poses' device: rgb
        in 0..1, then the xyz channels of normalised_xyz.
    """
    from chunkpose.ops.crops import crop_windows, upstream_render_transforms

    transforms = crop_windows(poses, frame.K, frame.diameter, crop_ratio, size).transforms
    # Rendering happens inside the caller's engine chunk, so no second level of chunking.
    rendered = renderer.render_crops(poses, frame.K, upstream_render_transforms(transforms, size), size, engine=None)
    centers = poses[:, :3, 3]
    A = network_input(rendered["rgb"].to(poses.device), rendered["xyz"].to(poses.device), centers,
                      frame.diameter, min_z, normalize)
    del rendered
    observed_rgb = frame.rgb_crops(transforms, size, sampling=UPSTREAM_SAMPLING) / 255.0
    observed_xyz = frame.xyz_crops(transforms, size, semantics=xyz_semantics, sampling=UPSTREAM_SAMPLING)
    B = network_input(observed_rgb, observed_xyz, centers, frame.diameter, min_z, normalize)
    return A, B


def _resident(engine, *things):
    if engine is None or not hasattr(engine, "resident"):
        return nullcontext()
    return engine.resident(*things)


def _checked_poses(jobs) -> list:
    """Each job's poses as float32 on its frame's device; ValueError when not (B,4,4)."""
    for job in jobs:
        if job.poses.ndim != 3 or job.poses.shape[1:] != (4, 4):
            raise ValueError(f"poses: expected (B,4,4), got {tuple(job.poses.shape)}")
    return [job.poses.to(device=job.frame.device, dtype=torch.float32) for job in jobs]


def _groups(jobs, poses) -> list:
    return [MapGroup((p,), dict(frame=job.frame, renderer=job.renderer)) for p, job in zip(poses, jobs)]


class _NetworkStage:
    """What the learned refiner and scorer share: their run config and how they prepare the
    network's inputs (crop_pair with their own crop ratio, size, depth floor and xyz
    semantics). A subclass sets ``kind`` ("refiner" or "scorer") and ``min_z``."""

    kind: str
    min_z: float

    def __init__(self, model, config=None, fp16: bool = True, differentiable: bool = False):
        self.model = model
        self.config = config if isinstance(config, NetworkConfig) else make_config(self.kind, config)
        self.crop_ratio = float(self.config["crop_ratio"])
        self.crop_size = self.config.crop_size
        self.normalize_xyz = bool(self.config["normalize_xyz"])
        self.fp16 = fp16
        self.differentiable = differentiable

    def prepare(self, poses: torch.Tensor, frame: ObservedFrame, renderer) -> Tuple[torch.Tensor, torch.Tensor]:
        """A, B (N,6,s,s) for poses (N,4,4): what the network sees.

        Args:
            poses: (N,4,4) float32 re-centred object-in-camera poses, metres.
            frame: the prepared ObservedFrame.
            renderer: a renderer of the re-centred mesh.

        Returns:
            (A, B): rendered and observed inputs, each (N,6,s,s) float32 (s = crop_size).
        """
        return crop_pair(poses, frame, renderer, self.crop_ratio, self.crop_size, self.min_z, self.kind,
                         self.normalize_xyz)


class LearnedRefiner(_NetworkStage, Refiner):
    """RefineNet render-and-compare refinement, one engine stage per iteration.

    Args:
        model: a RefineNet (its device is the engine's).
        config: the run's config.yml values (NetworkConfig or dict; defaults of the official run
            for missing keys; None = the defaults).
        fp16: run the network under fp16 autocast on CUDA (default True; CPU stays float32).
        differentiable: False (default) runs under no_grad; True keeps autograd (gradients flow
            to the poses and the weights, blocks checkpointed inside each chunk).
    """

    stage_name = "refine.learned"
    kind, min_z = "refiner", REFINER_MIN_Z

    def __init__(self, model: RefineNet, config: Union[NetworkConfig, Dict[str, Any], None] = None,
                 fp16: bool = True, differentiable: bool = False):
        super().__init__(model, config, fp16, differentiable)
        self.rot_normalizer = float(self.config["rot_normalizer"])
        self.trans_normalizer = self.config.get("trans_normalizer")

    def step(self, poses: torch.Tensor, *, frame: ObservedFrame, renderer, model: RefineNet) -> torch.Tensor:
        """One iteration for a slice of hypotheses: poses (n,4,4) -> refined poses (n,4,4).

        The op the engine maps over the hypotheses.

        Args:
            poses: (n,4,4) float32 re-centred object-in-camera poses, metres.
            frame: the prepared ObservedFrame.
            renderer: a renderer of the re-centred mesh.
            model: the RefineNet.

        Returns:
            (n,4,4) float32 updated poses.
        """
        A, B = self.prepare(poses, frame, renderer)
        with autocast_for(poses.device, self.fp16):
            out = model(A, B)
        return apply_update(poses, out["trans"], out["rot"], diameter=frame.diameter,
                            rot_normalizer=self.rot_normalizer, normalize_xyz=self.normalize_xyz,
                            trans_normalizer=self.trans_normalizer)

    def refine_many(self, jobs, engine, iterations: int) -> list:
        """``iterations`` network updates of several objects' hypotheses (refine is the one-object
        case), every update one engine stage "refine.learned" over all of them (chunks may hold
        several objects' hypotheses).

        Args:
            jobs: one chunkpose.pipeline.base.ObjectJob per object.
            engine: the Engine, or None (each object in one batch).
            iterations: number of updates.

        Returns:
            list of (B_j,4,4) float32 refined poses on the frames' device.

        Raises:
            ValueError: a job's poses are not (B,4,4).
        """
        poses = _checked_poses(jobs)
        grad = torch.enable_grad() if self.differentiable else torch.no_grad()
        with grad, _resident(engine, self.model):
            for _ in range(int(iterations)):
                if engine is None:
                    poses = [self.step(p, frame=job.frame, renderer=job.renderer, model=self.model)
                             for p, job in zip(poses, jobs)]
                else:
                    poses = engine.map_groups(self.step, _groups(jobs, poses), name=self.stage_name, model=self.model)
        return poses


class LearnedScorer(_NetworkStage, Scorer):
    """ScoreNetMultiPair scoring: per-hypothesis features as an engine stage, att_cross once.

    Args:
        model: a ScoreNetMultiPair (its device is the engine's).
        config: the run's config.yml values (NetworkConfig or dict; None = the defaults).
        fp16: run the network under fp16 autocast on CUDA (default True).
        differentiable: False (default) runs under no_grad; True keeps autograd.
    """

    stage_name = "score.learned.features"
    kind, min_z = "scorer", SCORER_MIN_Z

    def features(self, poses: torch.Tensor, *, frame: ObservedFrame, renderer, model: ScoreNetMultiPair) -> torch.Tensor:
        """Per-hypothesis features (n,512) float32 for a slice of poses (n,4,4).

        The op the engine maps over the hypotheses.

        Args:
            poses: (n,4,4) float32 re-centred object-in-camera poses, metres.
            frame: the prepared ObservedFrame.
            renderer: a renderer of the re-centred mesh.
            model: the ScoreNetMultiPair.

        Returns:
            (n,512) float32 features.
        """
        A, B = self.prepare(poses, frame, renderer)
        with autocast_for(poses.device, self.fp16):
            feats = model.features(A, B)
        return feats.float()

    def _grad(self):
        return torch.enable_grad() if self.differentiable else torch.no_grad()

    def hypothesis_features(self, poses: torch.Tensor, frame: ObservedFrame, renderer, engine) -> torch.Tensor:
        """The per-hypothesis features (B,512) of all poses (B,4,4), through the engine.

        Args:
            poses: (B,4,4) re-centred object-in-camera poses, metres.
            frame: the prepared ObservedFrame.
            renderer: a renderer of the re-centred mesh.
            engine: the Engine (stage "score.learned.features"), or None (one batch).

        Returns:
            (B,512) float32 features on the frame's device.

        Raises:
            ValueError: ``poses`` is not (B,4,4).
        """
        return self.hypothesis_features_many([ObjectJob(poses, frame, renderer)], engine)[0]

    def hypothesis_features_many(self, jobs, engine) -> list:
        """``hypothesis_features`` of several objects' hypotheses as one engine stage.

        Args:
            jobs: one chunkpose.pipeline.base.ObjectJob per object.
            engine: the Engine, or None (each object in one batch).

        Returns:
            list of (B_j,512) float32 features.

        Raises:
            ValueError: a job's poses are not (B,4,4).
        """
        poses = _checked_poses(jobs)
        with self._grad(), _resident(engine, self.model):
            if engine is None:
                return [self.features(p, frame=job.frame, renderer=job.renderer, model=self.model)
                        for p, job in zip(poses, jobs)]
            return engine.map_groups(self.features, _groups(jobs, poses), name=self.stage_name, model=self.model)

    def score_many(self, jobs, engine) -> list:
        """``score`` of several objects: their features as one engine stage, att_cross per object
        (it compares one object's hypotheses).

        Args:
            jobs: one chunkpose.pipeline.base.ObjectJob per object.
            engine: the Engine, or None.

        Returns:
            list of (B_j,) float32 logits.
        """
        return [self.combine(features) for features in self.hypothesis_features_many(jobs, engine)]

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """att_cross and the head over the gathered features of all hypotheses: logits (B,).

        att_cross compares all hypotheses, so it runs once on all of them.

        Args:
            features: (B,512) features of every hypothesis, in hypothesis order.

        Returns:
            (B,) float32 logits.
        """
        with self._grad(), autocast_for(features.device, self.fp16):
            logits = self.model.cross(features)
        return logits.float()


def holds_weights(path) -> bool:
    """Whether ``path`` holds FoundationPose's refiner and scorer runs (what load_learned loads).

    Args:
        path: a folder.

    Returns:
        bool.
    """
    try:
        find_run_folders(path)
    except CheckpointError:
        return False
    return True


def load_learned(weights: Union[str, Path], device: Union[str, torch.device] = "cpu", fp16: bool = True
                 ) -> Tuple[LearnedRefiner, LearnedScorer]:
    """A FoundationPose weights folder -> (LearnedRefiner, LearnedScorer) on ``device``.

    See chunkpose.models.checkpoint for the accepted layouts and the error messages.

    Args:
        weights: path of the weights folder (str or Path).
        device: where the networks go (default "cpu").
        fp16: fp16 autocast on CUDA for both (default True).

    Returns:
        (LearnedRefiner, LearnedScorer) with their run configs.

    Raises:
        CheckpointError: (an InputError) the folder, a weights file or a config cannot be used.
    """
    refiner, scorer, configs = load_weights(weights, device=device)
    return (LearnedRefiner(refiner, configs["refiner"], fp16=fp16),
            LearnedScorer(scorer, configs["scorer"], fp16=fp16))
