"""OpenGL renderer: moderngl with a headless EGL context (Mesa llvmpipe on CPU machines,
the vendor driver on GPU machines).

Many crops are drawn in one instanced draw call: the crops are tiles of a square atlas
framebuffer, each instance carries its pose, its zoomed projection and its tile, and clip
distances at the tile's edges keep each instance inside its tile (exact geometric clipping,
so nothing leaks into a neighbour). A crop's tile is chosen from its own pose and transform
(see tile_passes), so a batch renders bitwise alike however the engine slices it. Colour,
camera-frame xyz and normals go to seven colour attachments (RGBA8 colour, one R32F plane
per float channel) and are read back tile by tile.

Shading is FoundationPose's headlight (chunkpose.ops.render.base.HEADLIGHT): a per-vertex
diffuse term clip(n_cam . (0,0,-1), 0, 1), interpolated over the triangle, and
rgb = clip(albedo * 0.8 + d * albedo * 0.5, 0, 1); ``shading=False`` returns the albedo.
Colour is rendered and read back as float32, like nvdiffrast's, not quantised to 8 bits.

Over 400 lines mostly because of the Args/Returns documentation of its public API; the code
is one concern and splitting it would scatter it.
"""
from __future__ import annotations

import threading
import zlib

import numpy as np
import torch

from .base import HEADLIGHT, BatchRenderer, clip_projection, near_far, output_bytes_per_pixel

GL_CLIP_DISTANCE0 = 0x3000
# Side of the square tile atlas one pass draws into: 6 x 6 crops of 160 px (10 x 10 of 96)
# per pass, 39 MiB of attachments (RGBA32F colour, six float planes, depth), memory the
# budget has to hold beside the tensors. A pass costs little beyond its instances (only its
# own tiles are cleared), so a larger atlas buys almost no speed (measured on Mesa: 252 crops
# of 96 px in about the same time at sides 1024 and 2048); larger images (full frames) get an
# atlas of one tile.
ATLAS_SIDE = 1024

_VERTEX_SHADER = """
#version 330
in vec3 in_pos;
in vec3 in_normal;
in vec3 in_color;
in vec2 in_uv;
in mat4 inst_pose;   // object -> camera
in mat4 inst_proj;   // camera -> clip space of this instance's own image (tile)
in vec4 inst_tile;   // tile in framebuffer NDC: scale x, scale y, offset x, offset y
out vec3 v_xyz;
out vec3 v_normal;
out vec3 v_color;
out vec2 v_uv;
out float v_light;
out float gl_ClipDistance[4];
void main() {
    vec4 cam = inst_pose * vec4(in_pos, 1.0);
    v_xyz = cam.xyz;
    v_normal = mat3(inst_pose) * in_normal;
    // headlight: per-vertex diffuse term towards the camera (-z), interpolated like a colour
    float len = length(v_normal);
    v_light = len > 0.0 ? clamp(dot(v_normal / len, vec3(0.0, 0.0, -1.0)), 0.0, 1.0) : 0.0;
    v_color = in_color;
    v_uv = in_uv;
    vec4 clip = inst_proj * cam;
    // keep the instance inside its tile: -w <= x <= w and -w <= y <= w in tile NDC
    gl_ClipDistance[0] = clip.w + clip.x;
    gl_ClipDistance[1] = clip.w - clip.x;
    gl_ClipDistance[2] = clip.w + clip.y;
    gl_ClipDistance[3] = clip.w - clip.y;
    gl_Position = vec4(inst_tile.x * clip.x + inst_tile.z * clip.w,
                       inst_tile.y * clip.y + inst_tile.w * clip.w,
                       clip.z, clip.w);
}
"""

_FRAGMENT_SHADER = """
#version 330
in vec3 v_xyz;
in vec3 v_normal;
in vec3 v_color;
in vec2 v_uv;
in float v_light;
uniform sampler2D texture0;
uniform int use_texture;
uniform int use_shading;
uniform float ambient;
uniform float diffuse;
// float colour (RGBA32F, alpha = coverage) and one plane per float channel: read-back
// planes are already channels-first
layout(location = 0) out vec4 out_color;
layout(location = 1) out float out_x;
layout(location = 2) out float out_y;
layout(location = 3) out float out_z;
layout(location = 4) out float out_nx;
layout(location = 5) out float out_ny;
layout(location = 6) out float out_nz;
void main() {
    vec3 albedo = v_color;
    if (use_texture != 0) {
        albedo = texture(texture0, v_uv).rgb;
    }
    vec3 color = albedo;
    if (use_shading != 0) {
        color = clamp(albedo * ambient + v_light * albedo * diffuse, 0.0, 1.0);
    }
    out_color = vec4(color, 1.0);
    out_x = v_xyz.x;
    out_y = v_xyz.y;
    out_z = v_xyz.z;
    float len = length(v_normal);
    vec3 n = len > 0.0 ? v_normal / len : vec3(0.0);
    out_nx = n.x;
    out_ny = n.y;
    out_nz = n.z;
}
"""

_lock = threading.RLock()
_context = None
#: The crop atlas framebuffers, {(width, height): _Targets}, shared by every renderer of the
#: process (they all draw in its one context, one call at a time): several objects' renderers
#: keep one atlas, not one each.
_shared_targets: dict = {}


def gl_context():
    """The process's one moderngl EGL context (created on first use)."""
    global _context
    with _lock:
        if _context is None:
            try:
                import moderngl
            except ImportError as error:
                raise RuntimeError(
                    "backend='gl' needs moderngl (pip install moderngl) and EGL"
                ) from error
            try:
                _context = moderngl.create_standalone_context(backend="egl")
            except Exception as error:
                raise RuntimeError(
                    f"backend='gl': could not create a headless EGL OpenGL context ({error}); "
                    "install Mesa EGL (libegl1, libgl1-mesa-dri) or use backend='nvdiffrast' on CUDA"
                ) from error
            try:
                _context.gc_mode = "auto"  # release GL objects when their Python owners die
            except Exception:
                pass
        return _context


_program = None


def _shared_program(ctx):
    """The shader program, compiled once per process and shared by all renderers."""
    global _program
    with _lock:
        if _program is None:
            _program = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        return _program


def gl_available() -> bool:
    try:
        gl_context()
        return True
    except RuntimeError:
        return False


def tile_passes(poses: np.ndarray, transforms: np.ndarray, capacity: int):
    """Passes [(items, slots)] that draw every crop into a tile slot chosen from its own
    pose and transform only. A crop's framebuffer position enters the rasteriser's float
    arithmetic (coverage at silhouette edges, interpolation), so a slot that depended on
    the crop's place in the batch would make chunked renders differ from unchunked ones;
    with the slot a function of the crop, any slicing of a batch renders it bitwise alike.
    Crops whose slot is taken in every earlier pass go to a new pass."""
    passes: list[tuple[list, list]] = []
    taken: list[set] = []
    for i in range(len(poses)):
        slot = zlib.crc32(poses[i].tobytes() + transforms[i].tobytes()) % capacity
        k = next((k for k, used in enumerate(taken) if slot not in used), len(taken))
        if k == len(taken):
            passes.append(([], []))
            taken.append(set())
        passes[k][0].append(i)
        passes[k][1].append(slot)
        taken[k].add(slot)
    return [(np.asarray(items), np.asarray(slots)) for items, slots in passes]


class _Targets:
    """Attachments of one framebuffer size: colour (RGBA32F), x, y, z, nx, ny, nz (R32F
    each) and depth."""

    #: bytes per framebuffer pixel: RGBA32F colour, six R32F planes, a 24-bit depth buffer
    #: (allocated as 32 bits)
    BYTES_PER_PIXEL = 16 + 6 * 4 + 4

    def __init__(self, ctx, width: int, height: int):
        size = (width, height)
        self.width, self.height = width, height
        self.color = ctx.renderbuffer(size, 4, dtype="f4")
        self.planes = [ctx.renderbuffer(size, 1, dtype="f4") for _ in range(6)]
        self.depth = ctx.depth_renderbuffer(size)
        self.fbo = ctx.framebuffer([self.color, *self.planes], self.depth)

    def release(self):
        for item in (self.fbo, self.color, *self.planes, self.depth):
            item.release()


class GLRenderer(BatchRenderer):
    """Renders one mesh with OpenGL; see :class:`chunkpose.ops.render.base.Renderer`."""

    backend = "gl"

    def __init__(self, mesh, device="cpu", shading: bool = True):
        self.mesh = mesh
        self.device = torch.device(device)
        self.shading = bool(shading)
        self.ctx = gl_context()
        ctx = self.ctx
        self._program = _shared_program(ctx)
        n = len(mesh.vertices)
        uv = mesh.uv if mesh.has_texture else np.zeros((n, 2), np.float32)
        vertex_data = np.concatenate(
            [mesh.vertices, mesh.normals, mesh.vertex_colors, uv], axis=1
        ).astype(np.float32)
        self._vbo = ctx.buffer(vertex_data.tobytes())
        self._ibo = ctx.buffer(np.asarray(mesh.faces, dtype=np.uint32).tobytes())
        self._instances = None
        self._instance_capacity = 0
        self._texture = None
        if mesh.has_texture:
            # uv v = 0 is the image's bottom row; GL's first texel row is t = 0
            image = np.ascontiguousarray(np.flipud(mesh.texture[..., :3]).astype(np.uint8))
            self._texture = ctx.texture((image.shape[1], image.shape[0]), 3, image.tobytes(), alignment=1)
            self._texture.filter = (ctx.LINEAR, ctx.LINEAR)
            self._texture.repeat_x = self._texture.repeat_y = True
        self._vao = None
        self._targets: dict[tuple[int, int], _Targets] = _shared_targets
        self._current = None  # key of the framebuffer last drawn into
        self._center = np.asarray(mesh.center, dtype=np.float64)
        self._radius = float(mesh.radius)

    # -- GL resources -------------------------------------------------------------------
    def _vertex_array(self, count: int):
        if count > self._instance_capacity:
            capacity = max(count, 2 * self._instance_capacity, 16)
            if self._instances is not None:
                self._instances.release()
                self._vao.release()
            self._instances = self.ctx.buffer(reserve=capacity * 36 * 4)
            self._instance_capacity = capacity
            # attributes the shader compiler removed must be skipped (padding), not named
            names, parts = [], []
            for name, width in (("in_pos", 3), ("in_normal", 3), ("in_color", 3), ("in_uv", 2)):
                if name in self._program:
                    names.append(name)
                    parts.append(f"{width}f")
                else:
                    parts.append(f"{width}x4")
            fmt = " ".join(parts)
            self._vao = self.ctx.vertex_array(
                self._program,
                [
                    (self._vbo, fmt, *names),
                    (self._instances, "16f 16f 4f /i", "inst_pose", "inst_proj", "inst_tile"),
                ],
                index_buffer=self._ibo,
                index_element_size=4,
            )
        return self._vao

    def _framebuffer(self, width: int, height: int) -> _Targets:
        key = (width, height)
        targets = self._targets.get(key)
        if targets is None:
            # keep at most two sizes alive (crops + one full frame, typically)
            while len(self._targets) >= 2:
                self._targets.pop(next(iter(self._targets))).release()
            targets = _Targets(self.ctx, width, height)
            self._targets[key] = targets
        return targets

    def release(self):
        """Free the GL objects of this renderer (the shared context stays)."""
        for targets in self._targets.values():
            targets.release()
        self._targets.clear()
        for item in (self._vao, self._instances, self._vbo, self._ibo, self._texture):
            if item is not None:
                item.release()
        self._vao = self._instances = self._vbo = self._ibo = self._texture = None
        self._instance_capacity = 0

    # -- drawing ---------------------------------------------------------------------------
    def _draw_tiles(self, poses, proj, slots, tile_w, tile_h, grid):
        """Draw len(poses) instances, instance i into tile slots[i] of a (rows, cols) grid
        of tile_w x tile_h tiles (slot = row * cols + col, rows bottom-up), after clearing."""
        count = len(poses)
        rows, cols = grid
        fb_width, fb_height = cols * tile_w, rows * tile_h
        targets = self._framebuffer(fb_width, fb_height)
        self._current = (fb_width, fb_height)
        row, col = np.divmod(slots, cols)
        tiles = np.empty((count, 4), dtype=np.float64)
        tiles[:, 0] = tile_w / fb_width
        tiles[:, 1] = tile_h / fb_height
        tiles[:, 2] = -1.0 + (2.0 * col * tile_w + tile_w) / fb_width
        tiles[:, 3] = -1.0 + (2.0 * row * tile_h + tile_h) / fb_height
        instance = np.concatenate(
            [
                np.transpose(poses, (0, 2, 1)).reshape(count, 16),  # GLSL matrices are column-major
                np.transpose(proj, (0, 2, 1)).reshape(count, 16),
                tiles,
            ],
            axis=1,
        ).astype(np.float32)
        vao = self._vertex_array(count)
        self._instances.write(instance.tobytes())
        ctx = self.ctx
        targets.fbo.use()
        targets.fbo.viewport = (0, 0, fb_width, fb_height)
        # Only the tiles this pass draws into are cleared (the others are never read): clearing
        # the whole atlas (39 MiB of attachments) took ~4 ms a pass on Mesa, paid again by every
        # small chunk (252 crops of 96 px in chunks of 13: 0.80 s -> 0.66 s).
        for r, c in zip(row.tolist(), col.tolist()):
            targets.fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0, viewport=(c * tile_w, r * tile_h, tile_w, tile_h))
        ctx.enable_only(ctx.DEPTH_TEST)
        for plane in range(4):
            ctx.enable_direct(GL_CLIP_DISTANCE0 + plane)
        # the program is shared: set this mesh's uniforms before every draw
        self._program["use_texture"].value = 1 if self._texture is not None else 0
        self._program["use_shading"].value = 1 if self.shading else 0
        self._program["ambient"].value = HEADLIGHT.ambient
        self._program["diffuse"].value = HEADLIGHT.diffuse
        if "texture0" in self._program:
            self._program["texture0"].value = 0
        if self._texture is not None:
            self._texture.use(0)
        vao.render(instances=count)

    def _read_pass(self, out: dict, items: np.ndarray, slots: np.ndarray, tile_w: int, tile_h: int,
                   cols: int) -> None:
        """Read the tiles `slots` of the last pass into the outputs' rows `items`, tile by
        tile, straight into the output tensors' memory through numpy views (no torch op per
        tile), the colour through one tile-sized buffer. Only drawn tiles are read."""
        fbo = self._targets[self._current].fbo
        color = np.empty((tile_h, tile_w, 4), dtype=np.float32)
        rgb, depth, xyz = out["rgb"].numpy(), out["depth"].numpy(), out["xyz"].numpy()
        normals, mask = out["normals"].numpy(), out["mask"].numpy()
        for item, slot in zip(items.tolist(), slots.tolist()):
            row, col = divmod(slot, cols)
            viewport = (col * tile_w, row * tile_h, tile_w, tile_h)
            fbo.read_into(color, viewport, components=4, attachment=0, dtype="f4")
            np.copyto(rgb[item], color[..., :3].transpose(2, 0, 1))
            np.greater(color[..., 3], 0, out=mask[item])
            for attachment, target in ((1, xyz[item, 0]), (2, xyz[item, 1]), (3, depth[item]), (4, normals[item, 0]),
                                       (5, normals[item, 1]), (6, normals[item, 2])):
                fbo.read_into(target, viewport, components=1, attachment=attachment, dtype="f4")
            np.copyto(xyz[item, 2], depth[item])

    def _render(self, poses, K, transforms, tile_w, tile_h) -> dict:
        """Core: poses (B,4,4), transforms (B,3,3) numpy float64 -> dict of tensors.

        Tiles are stacked in one column and every float channel has its own attachment, so
        each read-back plane is already (n, h, w) channels-first.
        """
        count = len(poses)
        out = {
            "rgb": torch.empty((count, 3, tile_h, tile_w), dtype=torch.float32),
            "depth": torch.empty((count, tile_h, tile_w), dtype=torch.float32),
            "xyz": torch.empty((count, 3, tile_h, tile_w), dtype=torch.float32),
            "normals": torch.empty((count, 3, tile_h, tile_w), dtype=torch.float32),
            "mask": torch.empty((count, tile_h, tile_w), dtype=torch.bool),
        }
        if count == 0:
            return self._to_device(out)
        near, far = near_far(poses, self._center, self._radius)
        proj = clip_projection(K, transforms, tile_w, tile_h, near, far)
        side = min(ATLAS_SIDE, self._max_side())
        grid = (max(1, side // tile_h), max(1, side // tile_w))
        for items, slots in tile_passes(poses, transforms, grid[0] * grid[1]):
            self._draw_tiles(poses[items], proj[items], slots, tile_w, tile_h, grid)
            self._read_pass(out, items, slots, tile_w, tile_h, grid[1])
        return self._to_device(out)

    def atlas_size(self, size: int) -> tuple[int, int]:
        """(rows, cols) of the tile grid one pass draws crops of ``size`` into."""
        side = min(ATLAS_SIDE, self._max_side())
        return max(1, side // size), max(1, side // size)

    def external_bytes(self, sizes=()) -> int:
        """Bytes this renderer holds in the GL driver (not torch): the mesh's buffers and
        texture, and the crop atlas framebuffers for crops of each of ``sizes`` (at most two
        are kept at once, shared by all renderers of the process: pass no sizes to count a
        renderer beside one already counted with them). On a GPU this is device memory
        outside torch's allocator."""
        mesh = self.mesh
        total = len(mesh.vertices) * 11 * 4 + len(mesh.faces) * 3 * 4
        if mesh.has_texture:
            total += int(np.prod(mesh.texture.shape[:2])) * 3
        total += self._instance_capacity * 36 * 4
        for size in list(sizes)[-2:]:
            rows, cols = self.atlas_size(int(size))
            total += rows * int(size) * cols * int(size) * _Targets.BYTES_PER_PIXEL
        return int(total)

    def device_tensors(self) -> tuple:
        """Torch tensors the renderer keeps (none: everything lives in the GL driver)."""
        return ()

    def _max_side(self) -> int:
        return min(int(self.ctx.info["GL_MAX_RENDERBUFFER_SIZE"]), int(self.ctx.info["GL_MAX_VIEWPORT_DIMS"][1]))

    def _to_device(self, out: dict) -> dict:
        if self.device.type == "cpu":
            return out
        return {key: value.to(self.device) for key, value in out.items()}

    # -- the backend half of BatchRenderer ------------------------------------------------
    def bytes_per_item(self, size: int) -> int:
        """Returned tensors per crop (the read-back buffers are one tile row, not per crop)."""
        return size * size * output_bytes_per_pixel()

    def _check_full_size(self, width: int, height: int) -> None:
        limit = self._max_side()
        if width > limit or height > limit:
            raise ValueError(
                f"width, height: {width}x{height} exceeds this OpenGL's largest framebuffer side ({limit}); "
                "render a downscaled K or use backend='nvdiffrast'"
            )

    def _render_images(self, poses, K, transforms, width: int, height: int) -> dict:
        with _lock:
            return self._render(poses, K, transforms, width, height)

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass
