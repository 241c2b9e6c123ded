"""Input and output: meshes, scene readers and writers (YCBInEOAT, BOP).

Submodules are imported on first use so that reading a mesh does not pull in OpenCV.
"""
from importlib import import_module

_EXPORTS = {
    "Mesh": "chunkpose.io.mesh",
    "load_mesh": "chunkpose.io.mesh",
    "mesh_diameter": "chunkpose.io.mesh",
    "write_ycbineoat": "chunkpose.io.writers",
    "write_bop": "chunkpose.io.writers",
    "open_scene": "chunkpose.io.readers",
    "YCBInEOATReader": "chunkpose.io.readers",
    "BOPReader": "chunkpose.io.readers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chunkpose.io' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
