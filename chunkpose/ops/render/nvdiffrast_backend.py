"""CUDA renderer with nvdiffrast (PyPI package ``diffrp-nvdiffrast``, imports as nvdiffrast).

All B crops are rasterised in one instanced call: clip-space positions (B,V,4) come from
each pose and its zoomed projection (K composed with the crop transform, see
``base.clip_projection``); camera-frame xyz, normals and colours are interpolated from
per-vertex attributes. No antialiasing: depth and xyz must stay exact at pixel centres.
Colours are shaded with the headlight (base.HEADLIGHT): the per-vertex diffuse term is
interpolated like a colour and applied to the albedo per pixel, as FoundationPose does.

nvdiffrast writes image row 0 at NDC y = -1 and pixel i's centre at NDC -1 + (2i+1)/w,
the same layout as the GL backend reads back, so the two agree without flips.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import HEADLIGHT, BatchRenderer, clip_projection, near_far, output_bytes_per_pixel


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class NvdiffrastRenderer(BatchRenderer):
    """Renders one mesh with nvdiffrast on a CUDA device; see ``base.Renderer``."""

    backend = "nvdiffrast"

    def __init__(self, mesh, device="cuda", shading: bool = True):
        import nvdiffrast.torch as dr

        self._dr = dr
        self.mesh = mesh
        self.shading = bool(shading)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise RuntimeError(f"backend='nvdiffrast' needs a CUDA device, got {str(self.device)!r}")
        self._glctx = dr.RasterizeCudaContext(device=self.device)
        f32 = dict(dtype=torch.float32, device=self.device)
        vertices = torch.as_tensor(mesh.vertices, **f32)
        self._vertices_h = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=1)  # (V,4)
        self._normals = torch.as_tensor(mesh.normals, **f32)  # (V,3)
        self._colors = torch.as_tensor(mesh.vertex_colors, **f32)[None]  # (1,V,3)
        self._faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int32, device=self.device).contiguous()
        self._uv = None
        self._texture = None
        if mesh.has_texture:
            self._uv = torch.as_tensor(mesh.uv, **f32)[None].contiguous()  # (1,V,2)
            # nvdiffrast indexes texel rows by v from the first row; uv v = 0 is the image's bottom
            image = np.ascontiguousarray(np.flipud(mesh.texture[..., :3]))
            self._texture = (torch.as_tensor(image, device=self.device).float() / 255.0)[None].contiguous()
        self._center = np.asarray(mesh.center, dtype=np.float64)
        self._radius = float(mesh.radius)
        self._largest_pixels = 0

    def _render(self, poses, proj, width: int, height: int) -> dict:
        """poses (B,4,4), proj (B,4,4) torch float32 on device -> dict at (height, width)."""
        dr = self._dr
        # camera-frame homogeneous positions and clip positions, (B,V,4) each
        cam = torch.einsum("bij,vj->bvi", poses, self._vertices_h)
        clip = torch.einsum("bij,bvj->bvi", proj, cam).contiguous()
        self._largest_pixels = max(self._largest_pixels, clip.shape[0] * height * width)
        rast, _ = dr.rasterize(self._glctx, clip, self._faces, resolution=[height, width])
        mask = rast[..., 3] > 0  # (B,H,W)
        xyz, _ = dr.interpolate(cam[..., :3].contiguous(), rast, self._faces)
        normals_cam = torch.einsum("bij,vj->bvi", poses[:, :3, :3], self._normals).contiguous()
        normals, _ = dr.interpolate(normals_cam, rast, self._faces)
        normals = torch.nn.functional.normalize(normals, dim=-1)
        if self._texture is not None:
            uv, _ = dr.interpolate(self._uv, rast, self._faces)
            rgb = dr.texture(self._texture, uv, filter_mode="linear", boundary_mode="wrap")
        else:
            rgb, _ = dr.interpolate(self._colors, rast, self._faces)
        if self.shading:
            direction = torch.as_tensor(HEADLIGHT.direction, dtype=torch.float32, device=self.device)
            unit = torch.nn.functional.normalize(normals_cam, dim=-1)
            light = (unit @ direction).clamp_(0.0, 1.0)[..., None].contiguous()  # (B,V,1)
            light, _ = dr.interpolate(light, rast, self._faces)
            rgb = HEADLIGHT.shade(rgb, light)
        keep = mask[..., None].float()
        rgb = (rgb * keep).clamp_(0.0, 1.0)
        xyz = xyz * keep
        normals = normals * keep
        return {
            "rgb": rgb.permute(0, 3, 1, 2),
            "depth": xyz[..., 2],
            "xyz": xyz.permute(0, 3, 1, 2),
            "normals": normals.permute(0, 3, 1, 2),
            "mask": mask,
        }

    def _render_images(self, poses: np.ndarray, K: np.ndarray, transforms: np.ndarray, width: int, height: int):
        # old nvdiffrast versions need sizes divisible by 8; padding keeps pixel centres
        # where they are because the projection is built for the padded size
        padded_w, padded_h = _round_up(width, 8), _round_up(height, 8)
        near, far = near_far(poses, self._center, self._radius)
        proj = clip_projection(K, transforms, padded_w, padded_h, near, far)
        f32 = dict(dtype=torch.float32, device=self.device)
        out = self._render(torch.as_tensor(poses, **f32), torch.as_tensor(proj, **f32), padded_w, padded_h)
        if (padded_w, padded_h) != (width, height):
            out = {key: value[..., :height, :width] for key, value in out.items()}
        return {key: value.contiguous() for key, value in out.items()}

    def device_tensors(self) -> tuple:
        """The mesh tensors this renderer keeps on the device for every call."""
        kept = (self._vertices_h, self._normals, self._colors, self._faces, self._uv, self._texture)
        return tuple(t for t in kept if t is not None)

    def external_bytes(self, sizes=()) -> int:
        """nvdiffrast's own device buffers (outside torch's allocator): its CUDA rasteriser
        keeps buffers sized by the largest batch x resolution drawn so far, about 16 bytes
        per pixel drawn (depth and triangle id, colour and its copy); this is the estimate
        for the largest batch seen."""
        return int(self._largest_pixels * 16)

    def bytes_per_item(self, size: int) -> int:
        """Peak device bytes per crop: rasteriser output, interpolated attributes before and
        after the layout change, and the per-vertex camera/clip/normal arrays."""
        pixels = _round_up(size, 8) ** 2
        return pixels * (16 + 2 * 4 * 10 + output_bytes_per_pixel()) + len(self.mesh.vertices) * 4 * 11
