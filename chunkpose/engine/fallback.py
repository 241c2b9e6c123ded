"""The downscale decision when not even the smallest plan fits the budget.

Generic: it knows a function from a scale factor in (0, 1] to the minimum bytes the work
needs at that scale, and a budget. What the scale means (image side lengths, K scaled,
poses unchanged) is the caller's business.
"""
from __future__ import annotations

from typing import Callable, Iterable

from .budget import GIB, BudgetTooSmall, gib_ceil

DEFAULT_MIN_SCALE = 1.0 / 16.0
DEFAULT_TOLERANCE = 1.0 / 256.0


def choose_downscale(
    min_bytes_at: Callable[[float], int],
    budget_bytes: int,
    candidates: Iterable[float] | None = None,
    *,
    min_scale: float = DEFAULT_MIN_SCALE,
    tolerance: float = DEFAULT_TOLERANCE,
    what: str = "the work",
) -> float:
    """Largest scale in (0, 1] whose predicted minimum fits ``budget_bytes``.

    With ``candidates`` the answer is the largest candidate that fits; without, a bisection
    over [min_scale, 1] to ``tolerance``. Scale 1.0 is returned whenever it fits (no downscale).

    Args:
        min_bytes_at: ``min_bytes_at(scale) -> int`` bytes the smallest plan needs at that scale,
            assumed not to decrease as the scale grows.
        budget_bytes: usable bytes; None means unbounded (returns 1.0).
        candidates: optional scales in (0, 1] to choose from (e.g. [1, 0.75, 0.5, 0.25]).
        min_scale: smallest scale the bisection tries (default 1/16).
        tolerance: the bisection's resolution in scale units (default 1/256).
        what: what needs the memory, for the error message.

    Returns:
        float scale in (0, 1].

    Raises:
        BudgetTooSmall: none fits; it carries the minimum at the smallest allowed scale.
        ValueError: ``candidates``, ``min_scale`` or ``tolerance`` is out of range.
    """
    if budget_bytes is None:
        return 1.0
    budget_bytes = int(budget_bytes)

    def fits(scale: float) -> bool:
        return int(min_bytes_at(scale)) <= budget_bytes

    if candidates is not None:
        scales = sorted({float(s) for s in candidates}, reverse=True)
        if not scales or any(not (0.0 < s <= 1.0) for s in scales):
            raise ValueError(f"candidates must be scales in (0, 1], got {list(candidates)!r}")
        for scale in scales:
            if fits(scale):
                return scale
        smallest = scales[-1]
    else:
        if not (0.0 < min_scale <= 1.0):
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale!r}")
        if not tolerance > 0.0:
            raise ValueError(f"tolerance must be positive, got {tolerance!r}")
        if fits(1.0):
            return 1.0
        smallest = float(min_scale)
        if fits(smallest):
            low, high = smallest, 1.0  # fits(low), not fits(high)
            while high - low > tolerance:
                mid = 0.5 * (low + high)
                if fits(mid):
                    low = mid
                else:
                    high = mid
            return low
    minimum = int(min_bytes_at(smallest))
    raise BudgetTooSmall(
        f"budget {budget_bytes / GIB:.3f} GiB is below the minimum {minimum / GIB:.3f} GiB {what} needs "
        f"even downscaled by {smallest:g}; the minimum is {gib_ceil(minimum)} GiB",
        minimum_bytes=minimum,
    )
