"""Pure tensor ops with a leading item axis: depth clean-up, point maps, crops.

``backend()`` says which implementation of the csrc operators is active: "cuda" (compiled
CUDA kernels), "cpp" (compiled CPU kernels) or "torch" (the pure-torch path, identical
results; forced with the environment variable CHUNKPOSE_NO_EXT=1). The renderers live in
chunkpose.ops.render and are imported from there.
"""
from ._ext import backend, load_error, torch_path
from .crops import CropWindows, crop_roi, crop_windows, inverse_transforms
from .depth import bilateral_filter_depth, depth_to_xyz, erode_depth
from .warp import sample_positions, warp_crops, xyz_crops

__all__ = [
    "CropWindows",
    "backend",
    "bilateral_filter_depth",
    "crop_roi",
    "crop_windows",
    "depth_to_xyz",
    "erode_depth",
    "inverse_transforms",
    "load_error",
    "sample_positions",
    "torch_path",
    "warp_crops",
    "xyz_crops",
]
