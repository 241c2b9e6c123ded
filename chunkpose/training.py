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
`ScenePairs` (the default) crops the observed side from chunkpose.synth RGB-D scenes
(background, distractors, sensor noise) and renders the hypothesis side; `RenderedPairs` renders a mesh (by default one of chunkpose.synth's built-in meshes) at a
ground-truth pose and at a perturbed hypothesis, into the hypothesis' crop window, exactly
as the refiner sees them; `random_pairs` gives random tensors (tests, smoke runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

import torch
from torch import nn

from chunkpose.models.refine_net import RefineNet
from chunkpose.ops.geometry import so3_exp, so3_log


@dataclass
class TrainingBatch:
    """A (N,6,s,s) rendered side, B (N,6,s,s) observed side, and the ideal network outputs:
    trans (N,3) (translation step in units of the radius) and rot (N,3) (the axis-angle w
    with so3_exp(w)^T @ R_hypothesis = R_truth, in radians)."""

    A: torch.Tensor
    B: torch.Tensor
    trans: torch.Tensor
    rot: torch.Tensor

    def __len__(self) -> int:
        return self.A.shape[0]

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(self.A.to(device), self.B.to(device), self.trans.to(device), self.rot.to(device))


PairSource = Callable[[int, int, torch.Generator], TrainingBatch]


def random_pairs(size: int = 160, rot_normalizer: float = 0.349, c_in: int = 6) -> PairSource:
    """A PairSource of random inputs and targets (no renderer needed): for tests and smoke runs."""

    def make(step: int, batch_size: int, generator: torch.Generator) -> TrainingBatch:
        A = torch.rand(batch_size, c_in, size, size, generator=generator)
        B = torch.rand(batch_size, c_in, size, size, generator=generator)
        trans = (torch.rand(batch_size, 3, generator=generator) - 0.5) * 0.2
        rot = (torch.rand(batch_size, 3, generator=generator) - 0.5) * rot_normalizer
        return TrainingBatch(A, B, trans, rot)

    return make


def perturb_poses(poses: torch.Tensor, rot_deg: float, trans_m: float, generator: torch.Generator) -> torch.Tensor:
    """Random hypotheses around poses (N,4,4): rotation by up to rot_deg about a random axis
    (camera frame), translation offset of up to trans_m per axis."""
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
    """The network outputs that move hypotheses (N,4,4) exactly onto truth (N,4,4):
    trans (N,3) = (t_truth - t_hyp) / (diameter/2); rot (N,3) = w with
    so3_exp(w)^T @ R_hyp = R_truth, i.e. w = log(R_hyp @ R_truth^T)."""
    trans = (truth[:, :3, 3] - hypotheses[:, :3, 3]) / (diameter / 2.0)
    rot = so3_log(hypotheses[:, :3, :3] @ truth[:, :3, :3].transpose(1, 2))
    return trans, rot


class RenderedPairs:
    """Render-and-compare pairs of one mesh: 'observed' = a render at the true pose, rendered
    = a render at a perturbed hypothesis, both in the hypothesis' crop window (crop_ratio),
    prepared exactly as LearnedRefiner prepares them.

    mesh: a chunkpose Mesh (re-centred here) or None for the first built-in synth mesh.
    """

    def __init__(self, mesh=None, renderer=None, device="cpu", size: int = 160, crop_ratio: float = 1.2,
                 rot_deg: float = 15.0, trans_frac: float = 0.05, distance: float = 0.6,
                 K: Optional[torch.Tensor] = None):
        if mesh is None:
            from chunkpose.io.mesh import load_mesh
            from chunkpose.synth import builtin_meshes

            name, tm = sorted(builtin_meshes().items())[0]
            mesh = load_mesh(tm)
        self.mesh = mesh.centered() if hasattr(mesh, "centered") else mesh
        if renderer is None:
            from chunkpose.ops.render import make_renderer

            renderer = make_renderer(self.mesh, device)
        self.renderer = renderer
        self.device = torch.device(device)
        self.size, self.crop_ratio = size, crop_ratio
        self.rot_deg, self.trans_frac, self.distance = rot_deg, trans_frac, distance
        self.K = K if K is not None else torch.tensor([[600.0, 0, 320], [0, 600.0, 240], [0, 0, 1]])
        self.diameter = float(self.mesh.diameter)

    def __call__(self, step: int, batch_size: int, generator: torch.Generator) -> TrainingBatch:
        from chunkpose.ops.crops import crop_windows
        from chunkpose.pipeline.learned import REFINER_MIN_Z, network_input

        n = batch_size
        w = torch.randn(n, 3, generator=generator)
        w = w / w.norm(dim=1, keepdim=True) * (torch.rand(n, 1, generator=generator) * math.pi)
        truth = torch.eye(4).repeat(n, 1, 1)
        truth[:, :3, :3] = so3_exp(w)
        truth[:, :3, 3] = torch.tensor([0.0, 0.0, self.distance])
        truth[:, :2, 3] += (torch.rand(n, 2, generator=generator) - 0.5) * 0.1
        hyp = perturb_poses(truth, self.rot_deg, self.trans_frac * self.diameter, generator)
        truth, hyp = truth.to(self.device), hyp.to(self.device)
        K = self.K.to(self.device, torch.float32)
        transforms = crop_windows(hyp, K, self.diameter, self.crop_ratio, self.size).transforms
        rendered = self.renderer.render_crops(hyp, K, transforms, self.size)
        observed = self.renderer.render_crops(truth, K, transforms, self.size)
        centers = hyp[:, :3, 3]
        A = network_input(rendered["rgb"], rendered["xyz"], centers, self.diameter, REFINER_MIN_Z)
        B = network_input(observed["rgb"], observed["xyz"], centers, self.diameter, REFINER_MIN_Z)
        trans, rot = update_targets(hyp, truth, self.diameter)
        return TrainingBatch(A, B, trans, rot)


class ScenePairs:
    """Render-and-compare pairs from chunkpose.synth scenes: one synthetic RGB-D frame per
    step (background, distractors, sensor noise), `batch_size` hypotheses perturbed around
    its ground truth; the observed side is cropped from the frame and the rendered side
    drawn at the hypothesis, prepared exactly as LearnedRefiner prepares them.

    mesh: a Mesh / trimesh / builtin name, or None (synth picks a builtin per scene seed).
    """

    def __init__(self, mesh=None, device="cpu", size: int = 160, crop_ratio: float = 1.2,
                 width: int = 640, height: int = 480, rot_deg: float = 15.0, trans_frac: float = 0.05,
                 footprint=(0.05, 0.2), seed: int = 0):
        self.mesh, self.device = mesh, torch.device(device)
        self.size, self.crop_ratio = size, crop_ratio
        self.width, self.height = width, height
        self.rot_deg, self.trans_frac = rot_deg, trans_frac
        self.footprint, self.seed = footprint, seed
        self._renderers = {}

    def _renderer(self, mesh):
        key = id(mesh)
        if key not in self._renderers:
            from chunkpose.ops.render import make_renderer

            self._renderers = {key: (mesh, make_renderer(mesh.centered(), self.device))}
        return self._renderers[key][1]

    def __call__(self, step: int, batch_size: int, generator: torch.Generator) -> TrainingBatch:
        import numpy as np

        from chunkpose.pipeline.frame import prepare_frame, validate_inputs
        from chunkpose.pipeline.learned import REFINER_MIN_Z, crop_pair
        from chunkpose.pipeline.roi import CallRegion
        from chunkpose.synth import make_scene

        lo, hi = self.footprint
        footprint = float(lo + (hi - lo) * torch.rand(1, generator=generator))
        # Only the arguments of the spec'd signature: the scene itself is host numpy data.
        scene = make_scene(self.mesh, self.width, self.height, footprint=footprint, seed=self.seed + step)
        mesh = scene.mesh
        dev = self.device
        to_centre = np.eye(4)
        to_centre[:3, 3] = np.asarray(mesh.center, dtype=np.float64)
        truth = torch.as_tensor(scene.poses[0] @ to_centre, dtype=torch.float32).repeat(batch_size, 1, 1)
        diameter = float(mesh.diameter)
        hyp = perturb_poses(truth, self.rot_deg, self.trans_frac * diameter, generator)
        # The observed side exactly as inference prepares it: validated, cleaned, uploaded.
        rgb, depth, K, mask = validate_inputs(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0], require_mask=False)
        region = CallRegion.of_box((0, 0, self.width, self.height), (self.height, self.width), mask is not None)
        frame = prepare_frame(rgb, depth, K, mask, region, diameter, None, dev)
        hyp, truth = hyp.to(dev), truth.to(dev)
        A, B = crop_pair(hyp, frame, self._renderer(mesh), self.crop_ratio, self.size, REFINER_MIN_Z, "refiner")
        trans, rot = update_targets(hyp, truth, diameter)
        return TrainingBatch(A, B, trans, rot)


def refine_loss(out: dict, trans_target: torch.Tensor, rot_target: torch.Tensor, rot_normalizer: float) -> torch.Tensor:
    """Per-item loss (N,): squared error of the translation step (radius units) plus that of
    the rotation step tanh(rot)*rot_normalizer against the target, in rot_normalizer units."""
    rot_pred = torch.tanh(out["rot"].float())
    rot_goal = (rot_target / rot_normalizer).clamp(-0.999, 0.999)
    return ((out["trans"].float() - trans_target) ** 2).sum(1) + ((rot_pred - rot_goal) ** 2).sum(1)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


class GradientAccumulator:
    """Sums slice gradients into fp32 buffers, each batch item exactly once.

    The engine may run an item twice (a probing slice, a retry after running out of
    memory); items already accumulated are masked out of the loss of later slices, and a
    slice's gradient is added only after its backward has completed.
    """

    def __init__(self, params: List[nn.Parameter], batch_size: int):
        self.params = params
        self.grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.done = torch.zeros(batch_size, dtype=torch.bool)
        self.batch_size = batch_size
        self.slices: List[int] = []

    def op(self, A, B, trans, rot, index, *, model: RefineNet, rot_normalizer: float):
        """Engine op over a slice: forward, backward, accumulate; returns per-item loss (n,).

        Under the engine's fake-tensor estimation it runs forward and backward (so their
        memory is measured) and leaves the accumulator alone.
        """
        with torch.enable_grad():
            loss_items = refine_loss(model(A, B), trans, rot, rot_normalizer)
            if _is_fake(A):
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
        if not bool(self.done.all()):
            raise RuntimeError(f"gradient accumulation saw {int(self.done.sum())} of {self.batch_size} items")
        for p, g in zip(self.params, self.grads):
            p.grad = g.to(p.dtype)


@dataclass
class FinetuneResult:
    """losses: mean loss per step; micro_batches: the slice sizes the engine used per step."""

    losses: List[float] = field(default_factory=list)
    micro_batches: List[List[int]] = field(default_factory=list)
    report: object = None


def training_step(model: RefineNet, batch: TrainingBatch, engine, *, rot_normalizer: float = 0.349,
                  name: str = "finetune.step") -> tuple:
    """Gradient of one batch into the parameters' .grad (through engine.map): (mean loss, slice sizes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    acc = GradientAccumulator(params, len(batch))
    index = torch.arange(len(batch), device=batch.A.device)
    args = (batch.A, batch.B, batch.trans, batch.rot, index)
    kwargs = dict(model=model, rot_normalizer=rot_normalizer)
    if engine is None:
        losses = acc.op(*args, **kwargs)
    else:
        # The op runs its own backward; the map itself runs without autograd so the engine
        # does not wrap the whole op in a checkpoint (the blocks inside are checkpointed).
        with engine.resident(*acc.grads), torch.no_grad():
            losses = engine.map(acc.op, *args, name=name, **kwargs)
    acc.write()
    return float(losses.mean()), acc.slices


def finetune(refiner, steps: int, budget_gb: Optional[float] = None, *, batch_size: int = 16,
             lr: float = 1e-4, pairs: Optional[PairSource] = None, device: Union[str, torch.device, None] = None,
             engine=None, checkpointing: bool = True, seed: int = 0, rot_normalizer: Optional[float] = None,
             callback: Optional[Callable[[int, float], None]] = None) -> FinetuneResult:
    """Train `refiner` (a RefineNet or a LearnedRefiner) for `steps` optimiser steps.

    budget_gb: peak device memory for the training (weights, Adam state and gradient
    buffers are counted as resident); the engine picks the micro-batch. pairs: a PairSource
    (default ScenePairs: chunkpose.synth scenes of built-in meshes). checkpointing: gradient
    checkpointing of the network's blocks inside each micro-batch. Returns FinetuneResult;
    the model is left in eval mode with the trained weights.
    """
    model = getattr(refiner, "model", refiner)
    if not isinstance(model, RefineNet):
        raise ValueError(f"refiner: expected a RefineNet or LearnedRefiner, got {type(refiner).__name__}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be positive")
    if rot_normalizer is None:
        config = getattr(refiner, "config", None)
        rot_normalizer = float(config["rot_normalizer"]) if config is not None else 0.349
    if engine is None:
        from chunkpose.engine import Engine

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
    optimizer = torch.optim.Adam(params, lr=lr)
    result = FinetuneResult()
    try:
        for p in params:  # Adam state exists from the start so the budget sees it
            optimizer.state[p]["step"] = torch.tensor(0.0)
            optimizer.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            optimizer.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        with engine.resident(model, *state):
            for step in range(steps):
                batch = pairs(step, batch_size, generator).to(device)
                optimizer.zero_grad(set_to_none=True)
                loss, slices = training_step(model, batch, engine, rot_normalizer=rot_normalizer)
                optimizer.step()
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
