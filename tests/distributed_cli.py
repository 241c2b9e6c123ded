"""`chunkpose run` under torchrun with a deterministic stand-in estimator, for
tests/test_cli_distributed.py (not collected by pytest).

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/distributed_cli.py run --bop ...

The stand-in's pose depends only on its inputs (the mask's back-projected centre, or the
last pose when tracking), so a run's outputs do not depend on which rank did which unit,
and a single-process run with the same stand-in must write the same files.
"""
import sys

import numpy as np

from chunkpose import cli
from chunkpose.pipeline.hypotheses import translation_guess
from test_cli import FakeResult


class InputPose:
    """register: identity rotation at the mask's translation guess, score from the mask's
    size; track: the last pose again."""

    def __init__(self, mesh, **kwargs):
        self.mesh, self.last = mesh, None

    def register(self, rgb, depth, K, mask):
        pose = np.eye(4)
        pose[:3, 3] = translation_guess(mask, depth, K)
        self.last = pose
        return FakeResult(pose, float(mask.mean()))

    def track(self, rgb, depth, K, mask=None):
        return FakeResult(self.last, 0.5)


if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:], estimator_factory=InputPose))
