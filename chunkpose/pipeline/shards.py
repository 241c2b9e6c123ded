"""One frame's hypotheses split over several devices (lower latency per registration).

Each device holds a replica of the refiner/scorer pair and a renderer, with its own Engine
and so its own budget. Registration's hypotheses are cut into contiguous shards, one per
device: every shard is refined where it lives and its per-hypothesis scorer features are
computed there; the features are gathered on the primary device (the first one), where the
scorer's cross-hypothesis step (the learned scorer's att_cross; nothing for the geometric
one) runs once over all hypotheses in their original order, so the scores, and the best
pose, are those of a single-device run.

Shards run in one thread per device when every device is a distinct CUDA device (kernels
on different GPUs then overlap); otherwise one after another (CPU "devices" share the same
cores and memory, and OpenGL contexts belong to one thread).
"""
from __future__ import annotations

import copy
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from chunkpose.engine import Engine
from chunkpose.pipeline.base import ObservedFrame, pair_resident


@dataclass
class DeviceReplica:
    """What one device needs to work on a shard: its engine (own budget), renderer and pair.

    Attributes:
        device: the torch.device.
        engine: the Engine of this device (budget_gb of the estimator).
        renderer: a renderer of the re-centred mesh on this device.
        refiner: the refiner, its networks on this device.
        scorer: the scorer, its networks on this device.
    """

    device: torch.device
    engine: Engine
    renderer: object
    refiner: object
    scorer: object


def replicate_stage(stage, device: torch.device):
    """A shallow copy of a refiner or scorer whose torch modules are deep copies on ``device``.

    Args:
        stage: a chunkpose Refiner or Scorer.
        device: where the copy's networks go.

    Returns:
        the copy (the original is untouched).
    """
    replica = copy.copy(stage)
    for name, value in vars(stage).items():
        if isinstance(value, torch.nn.Module):
            setattr(replica, name, copy.deepcopy(value).to(device))
    return replica


def frame_on(frame: ObservedFrame, device: torch.device) -> ObservedFrame:
    """The same observation with its tensors copied to ``device``.

    Args:
        frame: a prepared ObservedFrame.
        device: the target device.

    Returns:
        ObservedFrame (``frame`` itself when it is already there).
    """
    if frame.device == device:
        return frame
    moved = {name: getattr(frame, name).to(device) for name in ("rgb", "depth", "K")}
    moved["mask"] = None if frame.mask is None else frame.mask.to(device)
    return dataclasses.replace(frame, **moved)


class HypothesisShards:
    """Refine and featurise one frame's hypotheses over several devices.

    Args:
        replicas: one DeviceReplica per device; the first is the primary (the estimator's own
            engine, renderer and pair), where features are gathered and scores computed.
    """

    def __init__(self, replicas: Sequence[DeviceReplica]):
        if len(replicas) < 2:
            raise ValueError("HypothesisShards needs at least two devices")
        self.replicas: List[DeviceReplica] = list(replicas)
        devices = [r.device for r in self.replicas]
        self.concurrent = all(d.type == "cuda" for d in devices) and len(set(map(str, devices))) == len(devices)

    @property
    def primary(self) -> DeviceReplica:
        return self.replicas[0]

    def _work(self, replica: DeviceReplica, poses: torch.Tensor, frame: ObservedFrame, iterations: int):
        """Refine one shard and compute its features on its own device, under its own engine."""
        with ExitStack() as stack:
            if replica is not self.primary:
                frame = frame_on(frame, replica.device)
                resident = [*pair_resident(replica.refiner, replica.scorer, replica.renderer), *frame.tensors()]
                stack.enter_context(replica.engine.call("register.shard", resident=resident))
            if replica.device.type == "cuda":
                stack.enter_context(torch.cuda.device(replica.device))
            stack.enter_context(torch.no_grad())
            poses = replica.refiner.refine(poses.to(replica.device), frame, replica.renderer, replica.engine,
                                           iterations)
            features = replica.scorer.hypothesis_features(poses, frame, replica.renderer, replica.engine)
        report = None if replica is self.primary else replica.engine.report
        return poses, features, report

    def refine_and_score(self, poses: torch.Tensor, frame: ObservedFrame, iterations: int
                         ) -> Tuple[torch.Tensor, torch.Tensor, dict]:
        """Refined poses and their scores for all hypotheses, in their order, on the primary device.

        Args:
            poses: (B,4,4) float32 initial poses of the re-centred mesh on the primary device.
            frame: the ObservedFrame prepared on the primary device.
            iterations: refinement iterations.

        Returns:
            (poses (B,4,4), scores (B,), {device name: RunReport of its shard}) with poses and
            scores on the primary device.
        """
        parts = [p for p in torch.tensor_split(poses, len(self.replicas)) if len(p)]
        jobs = list(zip(self.replicas, parts))
        if self.concurrent:
            with ThreadPoolExecutor(len(jobs)) as pool:
                done = list(pool.map(lambda job: self._work(job[0], job[1], frame, iterations), jobs))
        else:
            done = [self._work(replica, part, frame, iterations) for replica, part in jobs]
        target = self.primary.device
        refined = torch.cat([p.to(target) for p, _, _ in done])
        features = torch.cat([f.to(target) for _, f, _ in done])
        with torch.no_grad():
            scores = self.primary.scorer.combine(features)
        reports = {f"{i}:{replica.device}": report for i, ((replica, _), (_, _, report)) in enumerate(zip(jobs, done))
                   if report is not None}
        return refined, scores, reports
