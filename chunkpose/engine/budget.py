"""Budget: how many bytes a run may use on which device, and the error when that is too few.

The budget counts GiB (2**30 bytes), as nvidia-smi and torch do. A planner never plans up to
the last byte: it keeps a margin, small on the CPU (the meter counts exact tensor bytes) and
larger on CUDA (the caching allocator rounds blocks up and keeps freed blocks cached, so the
reserved bytes it reports run ahead of the tensor bytes a cost model predicts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GIB = 2**30
MIB = 2**20

# Fraction of the budget and fixed bytes kept free by the planner, per device type.
CPU_MARGIN_FRACTION = 0.02
CPU_MARGIN_BYTES = 0
# CUDA: segments for 1-10 MiB blocks are 20 MiB, large blocks round to 2 MiB, and a freed
# block of one size is not always reusable for the next, so keep 8% plus two small segments.
CUDA_MARGIN_FRACTION = 0.08
CUDA_MARGIN_BYTES = 40 * MIB


class BudgetTooSmall(Exception):
    """Raised when not even the smallest plan fits the budget.

    ``minimum_bytes`` is the smallest budget (in bytes, margins included) that the engine
    predicts would work; the message names it in GiB so it can be passed as ``budget_gb``.

    Args:
        message: the error text.
        minimum_bytes: the predicted smallest working budget in bytes, or None when unknown.
        stage: the stage name that did not fit, or None.

    Attributes:
        minimum_bytes: int bytes or None.
        minimum_gb: the same in GiB (float) or None.
        stage: str or None.
    """

    def __init__(self, message: str, minimum_bytes: int | None = None, stage: str | None = None):
        super().__init__(message)
        self.minimum_bytes = None if minimum_bytes is None else int(minimum_bytes)
        self.stage = stage

    @property
    def minimum_gb(self) -> float | None:
        return None if self.minimum_bytes is None else self.minimum_bytes / GIB


def gib_ceil(nbytes: int, decimals: int = 3) -> float:
    """``nbytes`` in GiB rounded up to ``decimals`` so that passing it back is enough.

    Args:
        nbytes: int bytes.
        decimals: decimal places kept (default 3).

    Returns:
        float GiB (2**30 bytes), rounded up.
    """
    scale = 10**decimals
    return math.ceil(nbytes / GIB * scale) / scale


def normalize_device(device) -> torch.device:
    """``device`` as a torch.device with an index on CUDA (peak counters are per device).

    Args:
        device: "cpu", "cuda", "cuda:N", an int (CUDA index) or a torch.device.

    Returns:
        torch.device: CPU, or CUDA with an explicit index (the current device for bare "cuda").

    Raises:
        ValueError: not a CPU or CUDA device, or CUDA is requested but not available.
    """
    if isinstance(device, str) or isinstance(device, int):
        device = torch.device(device)
    if not isinstance(device, torch.device):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device} was requested but CUDA is not available; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    return device


@dataclass(frozen=True)
class Budget:
    """Bytes the engine may use on ``device``; ``total_bytes`` None means unbounded.

    Attributes:
        total_bytes: int budget in bytes, or None (unbounded).
        device: the torch.device the budget applies to.
        hard_cap: whether the engine enforces the budget (see Engine) rather than only plans for it.
    """

    total_bytes: int | None
    device: torch.device
    hard_cap: bool = False

    @classmethod
    def from_gb(cls, budget_gb, device, hard_cap: bool = False) -> "Budget":
        """A Budget of ``budget_gb`` GiB on ``device``.

        Args:
            budget_gb: positive number of GiB (2**30 bytes), or None for unbounded.
            device: "cpu", "cuda", "cuda:N" or a torch.device (see normalize_device).
            hard_cap: enforce the budget (default False).

        Returns:
            Budget with total_bytes = int(budget_gb * 2**30) (None when unbounded).

        Raises:
            ValueError: ``budget_gb`` is not a positive finite number or None, or ``device`` is unusable.
        """
        if budget_gb is None:
            total = None
        else:
            if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)):
                raise ValueError(f"budget_gb must be a positive number of GiB or None, got {budget_gb!r}")
            if not math.isfinite(budget_gb) or budget_gb <= 0:
                raise ValueError(
                    f"budget_gb must be a positive number of GiB (2**30 bytes) or None for unbounded, got {budget_gb!r}"
                )
            total = int(budget_gb * GIB)
        return cls(total, normalize_device(device), bool(hard_cap))

    @property
    def unbounded(self) -> bool:
        return self.total_bytes is None

    @property
    def margin_fraction(self) -> float:
        return CUDA_MARGIN_FRACTION if self.device.type == "cuda" else CPU_MARGIN_FRACTION

    @property
    def margin_bytes(self) -> int:
        return CUDA_MARGIN_BYTES if self.device.type == "cuda" else CPU_MARGIN_BYTES

    @property
    def usable_bytes(self) -> int | None:
        """What a plan may fill: the budget minus the margin (None when unbounded)."""
        if self.total_bytes is None:
            return None
        return int(self.total_bytes * (1.0 - self.margin_fraction)) - self.margin_bytes

    def budget_for_usable(self, usable: int) -> int:
        """The budget whose usable part is ``usable`` bytes (inverse of ``usable_bytes``).

        Args:
            usable: int bytes a plan needs to fill.

        Returns:
            int total budget in bytes, margins included (rounded up).
        """
        return int(math.ceil((usable + self.margin_bytes) / (1.0 - self.margin_fraction)))
