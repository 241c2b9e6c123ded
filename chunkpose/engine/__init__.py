"""The memory-budget engine: knows tensors, bytes and time, nothing about poses.

    from chunkpose.engine import Engine
    engine = Engine(budget_gb=0.125, device="cpu")
    out = engine.map(op, items, name="stage", **whole_kwargs)
    print(engine.report.summary())
"""
from .budget import GIB, Budget, BudgetTooSmall
from .executor import Engine
from .fallback import choose_downscale
from .groups import MapGroup
from .meter import HardCapExceeded, Meter, Span
from .planner import CostModel, Planner, tracing_fake
from .report import RunReport, StageReport

__all__ = [
    "GIB",
    "Budget",
    "BudgetTooSmall",
    "CostModel",
    "Engine",
    "HardCapExceeded",
    "MapGroup",
    "Meter",
    "Planner",
    "RunReport",
    "Span",
    "StageReport",
    "choose_downscale",
    "tracing_fake",
]
