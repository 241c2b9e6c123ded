"""Renderers: draw a mesh at many poses straight into crops (and whole frames).

    renderer = make_renderer(mesh, device="cpu", backend=None)   # "gl" | "nvdiffrast"
    out = renderer.render_crops(poses (B,4,4), K (3,3), transforms (B,3,3), size, engine=None)
    out = renderer.render_full(pose (4,4), K (3,3), width, height)

Backends: "nvdiffrast" (CUDA rasteriser, picked on CUDA devices when importable) and "gl"
(moderngl with headless EGL: Mesa on CPU machines, the NVIDIA driver on GPUs).
"""
from __future__ import annotations

import torch

from .base import OUTPUT_KEYS, Renderer

BACKENDS = ("gl", "nvdiffrast")

__all__ = ["make_renderer", "Renderer", "OUTPUT_KEYS", "BACKENDS", "available_backends"]


def _nvdiffrast_importable() -> bool:
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception:
        return False
    return True


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on ``device`` here, preferred first.

    Args:
        device: "cpu", "cuda", "cuda:N" or a torch.device (default "cpu").

    Returns:
        list of backend names, e.g. ["nvdiffrast", "gl"]; empty when none can run.
    """
    device = torch.device(device)
    found = []
    if device.type == "cuda" and torch.cuda.is_available() and _nvdiffrast_importable():
        found.append("nvdiffrast")
    from .gl import gl_available

    if gl_available():
        found.append("gl")
    return found


#: What a renderer reads of a mesh (chunkpose.io.mesh.Mesh has all of it).
MESH_FIELDS = ("vertices", "faces", "normals", "vertex_colors", "uv", "texture", "center", "radius", "has_texture")


def make_renderer(mesh, device="cpu", backend: str | None = None, shading: bool = True):
    """A renderer for ``mesh`` on ``device``.

    Args:
        mesh: a chunkpose Mesh (chunkpose.load_mesh makes one from a file or a trimesh), in metres.
        device: "cpu" (default), "cuda", "cuda:N" or a torch.device.
        backend: "gl", "nvdiffrast", or None: nvdiffrast on a CUDA device when it imports, else "gl".
        shading: the headlight of FoundationPose's renders (base.HEADLIGHT, default True); False
            returns the albedo.

    Returns:
        A Renderer (see base.Renderer) whose outputs live on ``device``.

    Raises:
        ValueError: ``mesh`` lacks the fields of a chunkpose Mesh, or ``backend`` is unknown.
        RuntimeError: CUDA is requested but not available, or a forced backend cannot run (the
            message says what is missing).
    """
    missing = [name for name in MESH_FIELDS if not hasattr(mesh, name)]
    if missing:
        raise ValueError(f"mesh: expected a chunkpose Mesh (chunkpose.load_mesh(path_or_trimesh)), got "
                         f"{type(mesh).__name__} without {', '.join(missing)}")
    device = torch.device(device)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r} but CUDA is not available here; use device='cpu'")
    if backend is None:
        use_nvdiffrast = device.type == "cuda" and torch.cuda.is_available() and _nvdiffrast_importable()
        backend = "nvdiffrast" if use_nvdiffrast else "gl"
    if backend == "nvdiffrast":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                f"backend='nvdiffrast' needs a CUDA device (got device={str(device)!r}, "
                f"CUDA available: {torch.cuda.is_available()}); use backend='gl' on CPU"
            )
        if not _nvdiffrast_importable():
            raise RuntimeError(
                "backend='nvdiffrast' is not importable: pip install diffrp-nvdiffrast "
                "(it compiles its CUDA plugin on first use; needs nvcc and ninja), or use backend='gl'"
            )
        from .nvdiffrast_backend import NvdiffrastRenderer

        return NvdiffrastRenderer(mesh, device, shading=shading)
    from .gl import GLRenderer

    return GLRenderer(mesh, device, shading=shading)
