"""chunkpose: model-based 6D pose estimation at full camera resolution under a VRAM budget.

Heavy submodules are imported lazily so that ``import chunkpose`` stays cheap and the
engine can be used without the renderer or the networks installed.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "chunkpose.engine",
    "BudgetTooSmall": "chunkpose.engine",
    "RunReport": "chunkpose.engine",
    "load_mesh": "chunkpose.io.mesh",
    "Mesh": "chunkpose.io.mesh",
    "PoseEstimator": "chunkpose.estimator",
    "PoseResult": "chunkpose.estimator",
    "finetune": "chunkpose.training",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chunkpose' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
