"""Which implementation of the csrc operators is active, and their fake kernels.

The compiled extension ``chunkpose._C`` registers torch operators under ``torch.ops.chunkpose``
(CPU kernels always, CUDA kernels when it was built with CUDA). When it is missing, or when
``CHUNKPOSE_NO_EXT=1`` is set, every op in chunkpose.ops runs its pure-torch path, which gives
identical results (exactly for nearest sampling and elementwise work, to float rounding for
the bilateral filter's sums and exp).

Fake (shape-only) kernels are registered here so the engine can trace the operators under
FakeTensorMode when it estimates a stage's memory.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch

_STATE: dict = {"loaded": None, "error": None, "cuda": False, "forced_torch": 0}


def _load() -> bool:
    if _STATE["loaded"] is not None:
        return _STATE["loaded"]
    _STATE["loaded"] = False
    if os.environ.get("CHUNKPOSE_NO_EXT", "0") == "1":
        _STATE["error"] = "disabled by CHUNKPOSE_NO_EXT=1"
        return False
    try:
        from chunkpose import _C  # noqa: F401  (registers torch.ops.chunkpose.*)
    except ImportError as exc:  # not built (e.g. a source checkout without the build step)
        _STATE["error"] = f"chunkpose._C not importable: {exc}"
        return False
    except OSError as exc:  # built against another torch
        _STATE["error"] = f"chunkpose._C failed to load: {exc}"
        warnings.warn(f"{_STATE['error']}; using the pure-torch ops (rebuild with "
                      "`pip install --no-build-isolation -e .`)", RuntimeWarning, stacklevel=3)
        return False
    _STATE["cuda"] = bool(_C.has_cuda_kernels())
    _register_fakes()
    _STATE["loaded"] = True
    return True


def _register_fakes() -> None:
    lib = "chunkpose::"

    @torch.library.register_fake(lib + "depth_to_xyz_out")
    def _depth_to_xyz_out(depth, fx, fy, cx, cy, row_offset, out):
        return None

    @torch.library.register_fake(lib + "xyz_crops")
    def _xyz_crops(depth, transforms, inverses, fx, fy, cx, cy, size, semantics, x0, y0):
        return depth.new_empty((transforms.shape[0], 3, size, size))

    @torch.library.register_fake(lib + "xyz_crops_cleaned")
    def _xyz_crops_cleaned(raw, transforms, inverses, fx, fy, cx, cy, size, semantics, x0, y0, w, h, wx0, wy0, H, W,
                           erode_radius, diff_thres, ratio_thres, bilateral_radius, sigma_d, sigma_r, zfar):
        return raw.new_empty((transforms.shape[0], 3, size, size))

    @torch.library.register_fake(lib + "warp_bilinear")
    def _warp_bilinear(image, inverses, size, x0, y0):
        return image.new_empty((inverses.shape[0], image.shape[0], size, size), dtype=torch.float32)

    @torch.library.register_fake(lib + "erode_depth")
    def _erode(depth, row_start, row_end, radius, diff_thres, ratio_thres, zfar):
        return depth.new_empty((row_end - row_start, depth.shape[1]))

    @torch.library.register_fake(lib + "bilateral_filter_depth")
    def _bilateral(depth, row_start, row_end, radius, sigma_d, sigma_r, zfar):
        return depth.new_empty((row_end - row_start, depth.shape[1]))


def available() -> bool:
    """True when the compiled operators are loaded and not disabled."""
    return _load()


def use_ext(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` go through the compiled operators."""
    if _STATE["forced_torch"] or not _load():
        return False
    kind = torch.device(device).type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return _STATE["cuda"]
    return kind == "meta"


def backend(device: torch.device | str | None = None) -> str:
    """"cuda" | "cpp" | "torch": the implementation used for ``device`` (default: CUDA when
    available, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if not use_ext(kind):
        return "torch"
    return "cuda" if kind == "cuda" else "cpp"


def load_error() -> str | None:
    """Why the extension is not in use (None when it is)."""
    _load()
    return _STATE["error"]


def ops():
    """torch.ops.chunkpose (call only when available())."""
    return torch.ops.chunkpose


@contextmanager
def torch_path():
    """Within the block, every op runs its pure-torch implementation (tests, benchmarks)."""
    _STATE["forced_torch"] += 1
    try:
        yield
    finally:
        _STATE["forced_torch"] -= 1
