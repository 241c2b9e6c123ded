"""Input and output: meshes, scene readers and writers (YCBInEOAT, BOP).

Submodules are imported on first use so that reading a mesh does not pull in OpenCV.
"""
from chunkpose._lazy import lazy_getattr

_EXPORTS = {
    "Mesh": "chunkpose.io.mesh",
    "load_mesh": "chunkpose.io.mesh",
    "mesh_diameter": "chunkpose.io.mesh",
    "write_ycbineoat": "chunkpose.io.writers",
    "write_bop": "chunkpose.io.bop_writer",
    "write_bop_dataset": "chunkpose.io.bop_writer",
    "BopImage": "chunkpose.io.bop_writer",
    "BopGt": "chunkpose.io.bop_writer",
    "read_detections": "chunkpose.io.bop",
    "select_detections": "chunkpose.io.bop",
    "read_targets": "chunkpose.io.bop",
    "results_filename": "chunkpose.io.bop_results",
    "open_scene": "chunkpose.io.readers",
    "YCBInEOATReader": "chunkpose.io.readers",
    "BOPReader": "chunkpose.io.bop_reader",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr('chunkpose.io', _EXPORTS, globals())
