"""The pose-estimation algorithm: hypotheses, refinement, scoring (see base.py for the interface)."""
from chunkpose.pipeline.base import ObservedFrame, Refiner, Scorer

__all__ = ["ObservedFrame", "Refiner", "Scorer"]
