"""chunkpose: model-based 6D pose estimation at full camera resolution under a VRAM budget.

Heavy submodules are imported lazily so that ``import chunkpose`` stays cheap and the
engine can be used without the renderer or the networks installed.
"""
from chunkpose._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "chunkpose.engine",
    "BudgetTooSmall": "chunkpose.engine",
    "RunReport": "chunkpose.engine",
    "load_mesh": "chunkpose.io.mesh",
    "Mesh": "chunkpose.io.mesh",
    "PoseEstimator": "chunkpose.estimator",
    "PoseResult": "chunkpose.estimator",
    "MultiObjectEstimator": "chunkpose.multi_object",
    "finetune": "chunkpose.training",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_getattr('chunkpose', _EXPORTS, globals())
