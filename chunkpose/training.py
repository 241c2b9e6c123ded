"""Fine-tuning the learned refiner under a memory budget.

`finetune(refiner, steps, budget_gb)` runs optimiser steps of RefineNet on synthetic
render-and-compare pairs. Each step's batch goes through one `engine.map` stage whose op
does forward + backward on a slice (a micro-batch the engine sizes from the budget) and
adds that slice's gradient to an accumulator: gradient accumulation, with the micro-batch
never written down in this file. Inside the slice the network's blocks run under gradient
checkpointing (only block inputs stay alive), so a larger micro-batch fits a budget.

Determinism: the model trains with BatchNorm statistics frozen and dropout off (eval
mode, parameters still trainable), and the loss is a sum over items divided by the batch
size, so the accumulated gradient equals the full-batch gradient whatever the slicing.

Pairs come from a `PairSource`: `pairs(step, batch_size, generator) -> TrainingBatch`.
Both frame-based sources go through the inference path (validate_inputs, prepare_frame,
crop_pair), so training sees what the refiner sees: `ScenePairs` (the default) uses
chunkpose.synth RGB-D scenes (background, distractors, sensor noise); `RenderedPairs` a
clean render of one mesh (by default a built-in one) at a random pose. `random_pairs` gives
random tensors (tests, smoke runs).

Over 400 lines mostly because of the Args/Returns documentation of its public API; the code
is one concern and splitting it would scatter it.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

import numpy as np
import torch
from torch import nn

from chunkpose.engine import Engine, tracing_fake
from chunkpose.errors import InputError
from chunkpose.io.mesh import load_mesh
from chunkpose.models.refine_net import RefineNet
from chunkpose.ops.geometry import so3_exp, so3_log
from chunkpose.ops.render import make_renderer
from chunkpose.pipeline.frame import prepare_frame, validate_inputs
from chunkpose.pipeline.learned import REFINER_MIN_Z, crop_pair
from chunkpose.pipeline.roi import CallRegion
from chunkpose.shapes import builtin_meshes
from chunkpose.synth import make_scene


@dataclass
class TrainingBatch:
    """One batch of refiner training pairs and their targets.

    Attributes:
        A: (N,6,s,s) float32 rendered side (rgb 0..1, then normalised xyz).
        B: (N,6,s,s) float32 observed side.
        trans: (N,3) ideal translation step in units of the radius.
        rot: (N,3) ideal rotation output: the axis-angle w with so3_exp(w)^T @ R_hypothesis =
            R_truth, in radians.
    """

    A: torch.Tensor
    B: torch.Tensor
    trans: torch.Tensor
    rot: torch.Tensor

    def __len__(self) -> int:
        return self.A.shape[0]

    def to(self, device) -> "TrainingBatch":
        """The same batch with every tensor moved to ``device``.

        Args:
            device: target device.

        Returns:
            TrainingBatch.
        """
        return TrainingBatch(self.A.to(device), self.B.to(device), self.trans.to(device), self.rot.to(device))


PairSource = Callable[[int, int, torch.Generator], TrainingBatch]


def random_pairs(size: int = 160, rot_normalizer: float = 0.349, c_in: int = 6) -> PairSource:
    """A PairSource of random inputs and targets (no renderer needed): for tests and smoke runs.

    Args:
        size: crop side s in pixels (default 160).
        rot_normalizer: rot targets are uniform in +-rot_normalizer/2 radians (default 0.349).
        c_in: channels per side (default 6).

    Returns:
        PairSource: ``(step, batch_size, generator) -> TrainingBatch`` of A, B uniform in [0, 1)
        (batch_size, c_in, s, s), trans uniform in +-0.1 (batch_size, 3) and rot (batch_size, 3).
    """

    def make(step: int, batch_size: int, generator: torch.Generator) -> TrainingBatch:
        A = torch.rand(batch_size, c_in, size, size, generator=generator)
        B = torch.rand(batch_size, c_in, size, size, generator=generator)
        trans = (torch.rand(batch_size, 3, generator=generator) - 0.5) * 0.2
        rot = (torch.rand(batch_size, 3, generator=generator) - 0.5) * rot_normalizer
        return TrainingBatch(A, B, trans, rot)

    return make


def perturb_poses(poses: torch.Tensor, rot_deg: float, trans_m: float, generator: torch.Generator) -> torch.Tensor:
    """Random hypotheses around poses (N,4,4): rotation by up to rot_deg about a random axis
    (camera frame), translation offset of up to trans_m per axis.

    Args:
        poses: (N,4,4) object-in-camera poses, metres.
        rot_deg: largest rotation in degrees.
        trans_m: largest offset per axis in metres.
        generator: torch.Generator (CPU) the draws come from.

    Returns:
        (N,4,4) new poses, poses' dtype and device.
    """
    n = poses.shape[0]
    axis = torch.randn(n, 3, generator=generator)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-12)
    angle = torch.rand(n, 1, generator=generator) * math.radians(rot_deg)
    dR = so3_exp((axis * angle).to(poses.dtype))
    out = poses.clone()
    out[:, :3, :3] = dR.to(poses.device) @ poses[:, :3, :3]
    out[:, :3, 3] = poses[:, :3, 3] + ((torch.rand(n, 3, generator=generator) * 2 - 1) * trans_m).to(poses.device)
    return out


def update_targets(hypotheses: torch.Tensor, truth: torch.Tensor, diameter: float):
    """The network outputs that move hypotheses (N,4,4) exactly onto truth (N,4,4).

    trans = (t_truth - t_hyp) / (diameter/2); rot = w with so3_exp(w)^T @ R_hyp = R_truth,
    i.e. w = log(R_hyp @ R_truth^T).

    Args:
        hypotheses: (N,4,4) poses, metres.
        truth: (N,4,4) true poses, metres.
        diameter: object diameter in metres.

    Returns:
        (trans, rot): (N,3) in radius units and (N,3) axis-angle in radians.
    """
    trans = (truth[:, :3, 3] - hypotheses[:, :3, 3]) / (diameter / 2.0)
    rot = so3_log(hypotheses[:, :3, :3] @ truth[:, :3, :3].transpose(1, 2))
    return trans, rot


class _FramePairs:
    """Pairs from one observed RGB-D frame per step: `batch_size` hypotheses perturbed
    around the frame's true pose, both sides made by crop_pair on the frame prepared by
    prepare_frame, exactly as LearnedRefiner sees them at inference. A subclass says how
    the frame is made (`_observation`)."""

    def __init__(self, device, size: int, crop_ratio: float, rot_deg: float, trans_frac: float):
        self.device = torch.device(device)
        self.size, self.crop_ratio = size, crop_ratio
        self.rot_deg, self.trans_frac = rot_deg, trans_frac
        self._renderers = {}

    def _renderer(self, mesh):
        """A renderer of the re-centred mesh, kept while the same mesh comes back."""
        if id(mesh) not in self._renderers:
            self._renderers = {id(mesh): (mesh, make_renderer(mesh.centered(), self.device))}
        return self._renderers[id(mesh)][1]

    def _observation(self, step: int, generator: torch.Generator):
        """-> rgb (H,W,3) uint8, depth (H,W) metres, K (3,3), mask (H,W) or None, the
        mesh, and its true pose (4,4) with the mesh re-centred (Mesh.centered)."""
        raise NotImplementedError

    def __call__(self, step: int, batch_size: int, generator: torch.Generator) -> TrainingBatch:
        rgb, depth, K, mask, mesh, truth = self._observation(step, generator)
        rgb, depth, K, mask = validate_inputs(rgb, depth, K, mask, require_mask=False)
        height, width = depth.shape
        region = CallRegion.of_box((0, 0, width, height), (height, width), mask is not None)
        frame = prepare_frame(rgb, depth, K, mask, region, float(mesh.diameter), None, self.device)
        truth = torch.as_tensor(truth, dtype=torch.float32).repeat(batch_size, 1, 1)
        hyp = perturb_poses(truth, self.rot_deg, self.trans_frac * float(mesh.diameter), generator)
        hyp, truth = hyp.to(self.device), truth.to(self.device)
        A, B = crop_pair(hyp, frame, self._renderer(mesh), self.crop_ratio, self.size, REFINER_MIN_Z, "refiner")
        trans, rot = update_targets(hyp, truth, float(mesh.diameter))
        return TrainingBatch(A, B, trans, rot)


class RenderedPairs(_FramePairs):
    """Clean render-and-compare pairs of one mesh: the observed frame is a render of the mesh
    alone at a random true pose (any rotation, ``distance`` metres away, up to 5 cm off the
    optical axis), with its exact depth and mask.

    A PairSource: ``pairs(step, batch_size, generator) -> TrainingBatch``.

    Args:
        mesh: a chunkpose Mesh, or None for the first built-in synth mesh.
        device: where frames, crops and renders go (default "cpu").
        size: crop side in pixels (the refiner's crop_size, default 160).
        crop_ratio: crop side as a multiple of the diameter (default 1.2).
        rot_deg: hypotheses are rotated by up to this many degrees from the truth (default 15).
        trans_frac: and shifted by up to this fraction of the diameter per axis (default 0.05).
        distance: camera-to-object distance in metres (default 0.6).
        K: (3,3) intrinsics in pixels; None = fx = fy = 600 with the principal point centred.
        width: frame width in pixels (default 640).
        height: frame height in pixels (default 480).
    """

    def __init__(self, mesh=None, device="cpu", size: int = 160, crop_ratio: float = 1.2,
                 rot_deg: float = 15.0, trans_frac: float = 0.05, distance: float = 0.6,
                 K=None, width: int = 640, height: int = 480):
        super().__init__(device, size, crop_ratio, rot_deg, trans_frac)
        if mesh is None:
            mesh = load_mesh(sorted(builtin_meshes().items())[0][1])
        self.mesh, self.distance = mesh, distance
        self.width, self.height = width, height
        self.K = np.asarray(K if K is not None else [[600.0, 0, width / 2], [0, 600.0, height / 2], [0, 0, 1]],
                            dtype=np.float64)

    def _observation(self, step, generator):
        w = torch.randn(1, 3, generator=generator, dtype=torch.float64)
        w = w / w.norm() * (torch.rand(1, generator=generator, dtype=torch.float64) * math.pi)
        truth = np.eye(4)
        truth[:3, :3] = so3_exp(w)[0].numpy()
        truth[:3, 3] = [0.0, 0.0, self.distance]
        truth[:2, 3] += ((torch.rand(2, generator=generator, dtype=torch.float64) - 0.5) * 0.1).numpy()
        out = self._renderer(self.mesh).render_full(truth, self.K, self.width, self.height)
        rgb = (out["rgb"][0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return rgb, out["depth"][0].cpu().numpy(), self.K, out["mask"][0].cpu().numpy(), self.mesh, truth


class ScenePairs(_FramePairs):
    """Pairs from chunkpose.synth scenes: one synthetic RGB-D frame per step (background,
    distractors, sensor noise) and its ground-truth object mask.

    A PairSource: ``pairs(step, batch_size, generator) -> TrainingBatch``; step k uses scene
    seed ``seed + k``.

    Args:
        mesh: a Mesh / trimesh / builtin name, or None (synth picks a builtin per scene seed).
        device: where frames, crops and renders go (default "cpu").
        size: crop side in pixels (the refiner's crop_size, default 160).
        crop_ratio: crop side as a multiple of the diameter (default 1.2).
        width: frame width in pixels (default 640).
        height: frame height in pixels (default 480).
        rot_deg: hypotheses are rotated by up to this many degrees from the truth (default 15).
        trans_frac: and shifted by up to this fraction of the diameter per axis (default 0.05).
        footprint: (lo, hi) range the scene's object footprint (fraction of the image) is drawn
            from (default (0.05, 0.2)).
        seed: the first scene's seed (default 0).
    """

    def __init__(self, mesh=None, device="cpu", size: int = 160, crop_ratio: float = 1.2,
                 width: int = 640, height: int = 480, rot_deg: float = 15.0, trans_frac: float = 0.05,
                 footprint=(0.05, 0.2), seed: int = 0):
        super().__init__(device, size, crop_ratio, rot_deg, trans_frac)
        self.mesh, self.width, self.height = mesh, width, height
        self.footprint, self.seed = footprint, seed

    def _observation(self, step, generator):
        lo, hi = self.footprint
        footprint = float(lo + (hi - lo) * torch.rand(1, generator=generator))
        scene = make_scene(self.mesh, self.width, self.height, footprint=footprint, seed=self.seed + step)
        to_centre = np.eye(4)
        to_centre[:3, 3] = np.asarray(scene.mesh.center, dtype=np.float64)
        return (scene.rgb[0], scene.depth[0], scene.K, scene.masks[0], scene.mesh,
                scene.poses[0] @ to_centre)


def refine_loss(out: dict, trans_target: torch.Tensor, rot_target: torch.Tensor, rot_normalizer: float) -> torch.Tensor:
    """Per-item loss (N,): squared error of the translation step (radius units) plus that of the
    rotation step tanh(rot)*rot_normalizer against the target, in rot_normalizer units.

    Args:
        out: RefineNet output dict with "trans" (N,3) and "rot" (N,3).
        trans_target: (N,3) translation targets in radius units.
        rot_target: (N,3) axis-angle targets in radians.
        rot_normalizer: the config's rot_normalizer, radians.

    Returns:
        (N,) float32 losses.
    """
    rot_pred = torch.tanh(out["rot"].float())
    rot_goal = (rot_target / rot_normalizer).clamp(-0.999, 0.999)
    return ((out["trans"].float() - trans_target) ** 2).sum(1) + ((rot_pred - rot_goal) ** 2).sum(1)


class GradientAccumulator:
    """Sums slice gradients into fp32 buffers, each batch item exactly once.

    The engine may run an item twice (a probing slice, a retry after running out of memory);
    items already accumulated are masked out of the loss of later slices, and a slice's
    gradient is added only after its backward has completed.

    Args:
        params: the parameters that receive gradients.
        batch_size: number of items N of the batch.
    """

    def __init__(self, params: List[nn.Parameter], batch_size: int):
        self.params = params
        self.grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.done = torch.zeros(batch_size, dtype=torch.bool)
        self.batch_size = batch_size
        self.slices: List[int] = []

    def op(self, A, B, trans, rot, index, *, model: RefineNet, rot_normalizer: float):
        """Engine op over a slice: forward, backward, accumulate; returns per-item loss (n,).

        While the engine estimates the op on fake tensors it runs forward and backward (so their
        memory is counted) and leaves the accumulator alone.

        Args:
            A: (n,6,s,s) rendered side of the slice.
            B: (n,6,s,s) observed side.
            trans: (n,3) translation targets.
            rot: (n,3) rotation targets.
            index: (n,) int64 batch indices of the slice's items.
            model: the RefineNet.
            rot_normalizer: radians, see refine_loss.

        Returns:
            (n,) float32 detached losses.
        """
        with torch.enable_grad():
            loss_items = refine_loss(model(A, B), trans, rot, rot_normalizer)
            if tracing_fake():
                torch.autograd.grad(loss_items.sum() / self.batch_size, self.params, allow_unused=True)
                return loss_items.detach()
            fresh = ~self.done[index.cpu()]
            if bool(fresh.any()):
                weight = fresh.to(loss_items.device, loss_items.dtype) / self.batch_size
                total = (loss_items * weight).sum()
                grads = torch.autograd.grad(total, self.params, allow_unused=True)
                for acc, g in zip(self.grads, grads):
                    if g is not None:
                        acc.add_(g.float())
                self.done[index.cpu()] = True
                self.slices.append(int(index.shape[0]))
        return loss_items.detach()

    def write(self) -> None:
        """Put the accumulated gradients into the parameters' ``.grad`` (in their dtypes).

        Raises:
            RuntimeError: not every batch item was accumulated.
        """
        if not bool(self.done.all()):
            raise RuntimeError(f"gradient accumulation saw {int(self.done.sum())} of {self.batch_size} items")
        for p, g in zip(self.params, self.grads):
            p.grad = g.to(p.dtype)


def _state_tensors(optimizer: torch.optim.Optimizer) -> list:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


@dataclass
class FinetuneResult:
    """What finetune did.

    Attributes:
        losses: mean loss per step.
        micro_batches: the slice sizes the engine used per step.
        report: the engine's RunReport (or None).
    """

    losses: List[float] = field(default_factory=list)
    micro_batches: List[List[int]] = field(default_factory=list)
    report: object = None


def training_step(model: RefineNet, batch: TrainingBatch, engine, *, rot_normalizer: float = 0.349,
                  name: str = "finetune.step") -> tuple:
    """Gradient of one batch into the parameters' .grad (through engine.map).

    The op runs its own backward, so the engine does not checkpoint it (the network's blocks
    inside are).

    Args:
        model: the RefineNet.
        batch: the TrainingBatch on the model's device.
        engine: an Engine (the micro-batches are its chunks, stage ``name``), or None (one slice).
        rot_normalizer: radians, see refine_loss (default 0.349).
        name: the engine stage name (default "finetune.step").

    Returns:
        (mean loss as float, list of slice sizes).

    Raises:
        BudgetTooSmall: not even one item fits the engine's budget.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    acc = GradientAccumulator(params, len(batch))
    index = torch.arange(len(batch), device=batch.A.device)
    args = (batch.A, batch.B, batch.trans, batch.rot, index)
    kwargs = dict(model=model, rot_normalizer=rot_normalizer)
    if engine is None:
        losses = acc.op(*args, **kwargs)
    else:
        # The op runs its own backward, so the engine must not checkpoint it (the network's
        # blocks inside are checkpointed).
        with engine.resident(*acc.grads):
            losses = engine.map(acc.op, *args, name=name, checkpoint=False, **kwargs)
    acc.write()
    return float(losses.mean()), acc.slices


def finetune(refiner, steps: int, budget_gb: Optional[float] = None, *, batch_size: int = 16,
             lr: float = 1e-4, pairs: Optional[PairSource] = None, device: Union[str, torch.device, None] = None,
             engine=None, checkpointing: bool = True, seed: int = 0, rot_normalizer: Optional[float] = None,
             callback: Optional[Callable[[int, float], None]] = None,
             optimizer: Optional[Callable[[list], torch.optim.Optimizer]] = None) -> FinetuneResult:
    """Train ``refiner`` (a RefineNet or a LearnedRefiner) for ``steps`` optimiser steps.

    The model is left in eval mode with the trained weights.

    Args:
        refiner: a RefineNet or a LearnedRefiner (its ``model`` is trained in place).
        steps: number of optimiser steps, >= 1.
        budget_gb: peak device memory in GiB for the training (weights, the optimiser's state
            and gradient buffers are counted as resident); the engine picks the micro-batch.
            None = unbounded. Ignored when ``engine`` is given.
        batch_size: items per step, >= 1 (default 16).
        lr: learning rate of the default Adam (default 1e-4).
        pairs: a PairSource (default ScenePairs: chunkpose.synth scenes of built-in meshes, with
            the refiner's crop size and ratio).
        device: the engine's device; None = the model's.
        engine: an Engine to use instead of one made from ``budget_gb`` and ``device``.
        checkpointing: gradient checkpointing of the network's blocks inside each micro-batch
            (default True).
        seed: seed of the pair generator (default 0).
        rot_normalizer: radians; None = the refiner's config value, else 0.349.
        callback: optional ``callback(step, loss)`` after every step.
        optimizer: a factory params -> torch.optim.Optimizer (default Adam with ``lr``).

    Returns:
        FinetuneResult with the losses, micro-batch sizes and the engine's report.

    Raises:
        InputError: ``refiner`` is not a RefineNet or LearnedRefiner, or ``steps`` / ``batch_size``
            is not positive.
        BudgetTooSmall: not even one item fits the budget.
    """
    model = getattr(refiner, "model", refiner)
    if not isinstance(model, RefineNet):
        raise InputError(f"refiner: expected a RefineNet or LearnedRefiner, got {type(refiner).__name__}")
    if steps < 1 or batch_size < 1:
        raise InputError(f"steps, batch_size: expected positive integers, got {steps} and {batch_size}")
    if rot_normalizer is None:
        config = getattr(refiner, "config", None)
        rot_normalizer = float(config["rot_normalizer"]) if config is not None else 0.349
    if engine is None:
        engine = Engine(budget_gb, device=device or next(model.parameters()).device)
    device = engine.device if hasattr(engine, "device") else torch.device(device or "cpu")
    model.to(device).eval()  # frozen BatchNorm statistics, no dropout: slicing-invariant gradients
    previous = model.checkpointing
    model.checkpointing = bool(checkpointing)
    if pairs is None:  # crops as the refiner will see them
        pairs = ScenePairs(device=device, size=getattr(refiner, "crop_size", 160),
                           crop_ratio=getattr(refiner, "crop_ratio", 1.2))
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr) if optimizer is None else optimizer(params)
    result = FinetuneResult()
    try:
        with engine.resident(model), ExitStack() as optimizer_state:
            for step in range(steps):
                batch = pairs(step, batch_size, generator).to(device)
                optimizer.zero_grad(set_to_none=True)
                loss, slices = training_step(model, batch, engine, rot_normalizer=rot_normalizer)
                optimizer.step()
                if step == 0:
                    # The optimiser makes its state in its first step, after that step's
                    # transients are gone; from then on the plans count it as resident.
                    optimizer_state.enter_context(engine.resident(*_state_tensors(optimizer)))
                result.losses.append(loss)
                result.micro_batches.append(slices)
                if callback is not None:
                    callback(step, loss)
                del batch
    finally:
        model.checkpointing = previous
        model.eval()
    result.report = getattr(engine, "report", None)
    return result
