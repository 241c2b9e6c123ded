"""Synthetic RGB-D scenes with ground truth, at any resolution (default 3072x2048).

One object at a random pose in front of a textured, tilted background plane, with
distractor objects that never hide most of it; a depth sensor model (noise growing with
z^2, 1 mm quantisation, missing pixels at depth edges), RGB noise, the visible mask and
the ground-truth pose. ``footprint`` sets the fraction of the image the object covers (by
choosing its distance); ``frames > 1`` gives a smooth motion sequence for tracking.
Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same
scene.

    scene = make_scene(mesh=None, width=3072, height=2048, frames=1, footprint=None, seed=0)
    scene.save("out/scene", layout="ycbineoat")   # or layout="bop"
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_dilation, maximum_filter, minimum_filter
from scipy.spatial.transform import Rotation

from chunkpose.io.mesh import Mesh, load_mesh, mesh_from_trimesh
from chunkpose.shapes import builtin_meshes

__all__ = ["Scene", "make_scene", "builtin_meshes", "sensor_depth"]

FOOTPRINT_RANGE = (0.001, 0.5)
DEFAULT_FOOTPRINT = (0.02, 0.15)  # drawn log-uniformly when footprint=None
LIGHT = np.array([0.35, -0.55, 1.0]) / np.linalg.norm([0.35, -0.55, 1.0])  # camera frame
# Depth sensor model (metres): sigma(z) = a + b z^2, quantised to 1 mm.
DEPTH_NOISE_A = 0.0005
DEPTH_NOISE_B = 0.0015
RGB_NOISE_SIGMA = 2.0  # in 0..255 units
# Distractors may cover at most this fraction of the object's radius in the image.
MAX_OCCLUSION_OVERLAP = 0.35


@dataclass
class Scene:
    """A synthetic scene.

    rgb: list of (H,W,3) uint8; depth: list of (H,W) float32 metres (sensor model, 0 =
    missing); masks: list of (H,W) bool visible masks; K (3,3) float64; poses: list of
    (4,4) float64 ground truth (object in camera, metres); mesh: the object's Mesh.
    depth_clean: noise-free depth; full_masks: silhouettes ignoring occluders;
    footprint: the object's mean image fraction; info: how the scene was drawn.
    """

    rgb: list
    depth: list
    masks: list
    K: np.ndarray
    poses: list
    mesh: Mesh
    depth_clean: list = field(default_factory=list, repr=False)
    full_masks: list = field(default_factory=list, repr=False)
    footprint: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.rgb[0].shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb[0].shape[0])

    @property
    def frames(self) -> int:
        return len(self.rgb)

    def save(self, path, layout: str = "ycbineoat", overwrite: bool = False) -> Path:
        """Write the scene to ``path`` ("ycbineoat": rgb/, depth/, masks/, cam_K.txt,
        annotated_poses/; "bop": a BOP dataset with one object and scene 000001)."""
        from chunkpose.io.writers import write_bop, write_ycbineoat

        if layout == "ycbineoat":
            return write_ycbineoat(path, self.rgb, self.depth, self.K, masks=self.masks, poses=self.poses, overwrite=overwrite)
        if layout == "bop":
            return write_bop(
                path, self.rgb, self.depth, self.K, self.masks, self.poses, self.mesh,
                full_masks=self.full_masks or None, overwrite=overwrite,
            )
        raise ValueError(f"layout: expected 'ycbineoat' or 'bop', got {layout!r}")

    def __repr__(self) -> str:
        return (f"Scene({self.width}x{self.height}, frames={self.frames}, footprint={self.footprint:.3f}, "
                f"mesh={self.mesh!r})")


# ----------------------------------------------------------------------------- helpers


def _intrinsics(width: int, height: int, rng) -> np.ndarray:
    focal = 0.8 * width * (1.0 + rng.uniform(-0.05, 0.05))
    return np.array(
        [
            [focal, 0.0, (width - 1) / 2.0 + rng.uniform(-0.01, 0.01) * width],
            [0.0, focal * (1.0 + rng.uniform(-0.002, 0.002)), (height - 1) / 2.0 + rng.uniform(-0.01, 0.01) * height],
            [0.0, 0.0, 1.0],
        ]
    )


def _scaled_intrinsics(K: np.ndarray, factor: float) -> np.ndarray:
    """K for an image resized by ``factor`` with pixel centres at integers."""
    scaled = K.copy()
    scaled[0, 0] *= factor
    scaled[1, 1] *= factor
    scaled[0, 2] = (K[0, 2] + 0.5) * factor - 0.5
    scaled[1, 2] = (K[1, 2] + 0.5) * factor - 0.5
    return scaled


def _pose(rotation: np.ndarray, center_cam: np.ndarray, mesh_center: np.ndarray) -> np.ndarray:
    """Pose whose mesh bounding-box centre lands at ``center_cam`` (camera frame)."""
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = center_cam - rotation @ mesh_center
    return pose


def _ray(K: np.ndarray, u: float, v: float) -> np.ndarray:
    """Camera-frame direction with z = 1 through pixel (u, v)."""
    return np.linalg.solve(K, np.array([u, v, 1.0]))


def _silhouette(renderer, pose, K, width, height):
    """(area fraction, bbox (x0, y0, x1, y1) in pixels) of the object at ``pose``."""
    mask = renderer.render_full(pose, K, width, height)["mask"][0].cpu().numpy()
    if not mask.any():
        return 0.0, None
    ys, xs = np.nonzero(mask)
    return float(mask.mean()), (xs.min(), ys.min(), xs.max(), ys.max())


def _place_object(renderer, mesh: Mesh, rotation, K, width, height, footprint, rng, outside: float = 0.0):
    """Choose the object's image position and distance so it covers ``footprint`` of the
    image; returns the centre (camera frame). Measured on a small render: the area
    fraction does not depend on the resolution, and scales as 1/z^2. ``outside`` > 0 puts
    that fraction of the silhouette's width (or height) past a random image edge."""
    factor = min(1.0, 400.0 / max(width, height))
    small_w, small_h = max(8, round(width * factor)), max(8, round(height * factor))
    factor_x = small_w / width
    K_small = _scaled_intrinsics(K, factor_x)
    u0, v0 = K[0, 2], K[1, 2]
    z = K[0, 0] * mesh.diameter / (math.sqrt(footprint * width * height) * 1.2)
    for _ in range(3):  # converge on the distance at the image centre
        area, box = _silhouette(renderer, _pose(rotation, z * _ray(K, u0, v0), mesh.center), K_small, small_w, small_h)
        if area <= 0:
            z *= 2.0
            continue
        z *= math.sqrt(area / footprint)
    area, box = _silhouette(renderer, _pose(rotation, z * _ray(K, u0, v0), mesh.center), K_small, small_w, small_h)
    if box is None:
        raise RuntimeError("synth: the object is not visible at any tried distance (is the mesh degenerate?)")
    # the silhouette's extent about the projected centre, in full-resolution pixels
    cu, cv = (K_small[0, 2], K_small[1, 2])
    left, right = (cu - box[0]) / factor_x, (box[2] - cu) / factor_x
    top, bottom = (cv - box[1]) / factor_x, (box[3] - cv) / factor_x
    margin = 0.03 * min(width, height)
    lo_u, hi_u = left + margin, width - 1 - right - margin
    lo_v, hi_v = top + margin, height - 1 - bottom - margin
    u = rng.uniform(lo_u, hi_u) if hi_u > lo_u else u0
    v = rng.uniform(lo_v, hi_v) if hi_v > lo_v else v0
    if outside > 0:
        edge = int(rng.integers(4))  # left, right, top, bottom
        if edge == 0:
            u = left - outside * (left + right)
        elif edge == 1:
            u = width - 1 - right + outside * (left + right)
        elif edge == 2:
            v = top - outside * (top + bottom)
        else:
            v = height - 1 - bottom + outside * (top + bottom)
        lo_u = hi_u = lo_v = hi_v = 0.0  # no room to move: the trajectory stays put
    center = z * _ray(K, u, v)
    # off-centre the perspective changes the area slightly: one more correction
    area, _ = _silhouette(renderer, _pose(rotation, center, mesh.center), K_small, small_w, small_h)
    if area > 0 and outside <= 0:  # (a cut-off silhouette's area says nothing about the distance)
        center = center * math.sqrt(area / footprint)
    room = (min(u - lo_u, hi_u - u) if hi_u > lo_u else 0.0, min(v - lo_v, hi_v - v) if hi_v > lo_v else 0.0)
    return center, room


def _trajectory(rotation0, center0, room, K, frames: int, rng):
    """Smooth motion: a slow rotation about a random axis and a gentle sinusoidal drift
    that stays inside the image (``room`` = free pixels around the start position)."""
    if frames == 1:
        return [rotation0], [center0]
    z0 = center0[2]
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    step = np.radians(rng.uniform(1.0, 2.5))  # per frame
    # drift amplitude: at most the room in pixels (converted to metres) and 8% of z
    amp_x = min(0.08 * z0, room[0] * z0 / K[0, 0])
    amp_y = min(0.08 * z0, room[1] * z0 / K[1, 1])
    amp_z = 0.05 * z0
    phase = rng.uniform(0, 2 * np.pi, size=3)
    period = max(frames, 8) * rng.uniform(1.0, 2.0)
    rotations, centers = [], []
    for k in range(frames):
        rotations.append(Rotation.from_rotvec(axis * step * k).as_matrix() @ rotation0)
        s = np.sin(2 * np.pi * k / period + phase) - np.sin(phase)  # starts at 0
        offset = np.array([amp_x * s[0], amp_y * s[1], amp_z * s[2]]) / 2.0
        centers.append(center0 + offset)
    return rotations, centers


def _background_texture(rng, size: int = 512) -> np.ndarray:
    """A tileable (size,size,3) uint8 texture: colour noise with a 1/f spectrum (periodic by
    construction, so repeats show no seams), planks and a few dark lines."""
    freq = np.fft.fftfreq(size)
    radius = np.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    falloff = 1.0 / np.maximum(radius * size, 1.0) ** 1.2
    falloff[0, 0] = 0.0
    noise = np.stack(
        [np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * falloff)) for _ in range(3)], axis=-1
    )
    noise = 0.7 * noise.mean(axis=-1, keepdims=True) + 0.3 * noise  # mostly brightness
    noise /= noise.std() + 1e-12
    base = rng.uniform(0.35, 0.7, size=3)
    y = np.arange(size)[:, None]
    planks = 0.06 * np.sign(np.sin(2 * np.pi * y * int(rng.integers(3, 7)) / size))
    image = base[None, None] + 0.1 * noise + planks[..., None]
    for _ in range(6):  # thin dark lines for structure
        row = int(rng.integers(1, size))
        image[row - 1 : row + 1, :, :] *= 0.6
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _background_plane(K, width, height, point, normal, rng):
    """A textured quad through ``point`` with ``normal`` covering the whole view."""
    import trimesh
    from PIL import Image

    e1 = np.cross(normal, [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    corners = []
    for u, v in [(0, 0), (width, 0), (0, height), (width, height)]:
        d = _ray(K, u - 0.5, v - 0.5)
        s = (normal @ point) / (normal @ d)
        corners.append(s * d)
    corners = np.array(corners)
    a, b = (corners - point) @ e1, (corners - point) @ e2
    pad = 0.1 * max(a.max() - a.min(), b.max() - b.min())
    a0, a1, b0, b1 = a.min() - pad, a.max() + pad, b.min() - pad, b.max() + pad
    quad = np.array([point + p * e1 + q * e2 for p, q in [(a0, b0), (a1, b0), (a1, b1), (a0, b1)]])
    tile_m = rng.uniform(0.3, 0.6)  # metres per texture repeat
    uv = np.array([[p / tile_m, q / tile_m] for p, q in [(a0, b0), (a1, b0), (a1, b1), (a0, b1)]])
    visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(_background_texture(rng)))
    # Scene geometry, not an object: it may be wider than load_mesh's millimetre check allows.
    return mesh_from_trimesh(trimesh.Trimesh(quad, [[0, 1, 2], [0, 2, 3]], visual=visual, process=False))


def _composite(layers, width, height):
    """Z-buffer composite of full-frame renders: (rgb (H,W,3) float, depth (H,W), id (H,W))."""
    depth = np.full((height, width), np.inf, dtype=np.float32)
    rgb = np.zeros((height, width, 3), dtype=np.float32)
    ids = np.full((height, width), -1, dtype=np.int32)
    for index, out in layers:
        out = {key: value[0].cpu().numpy() for key, value in out.items()}
        d = out["depth"]
        hit = out["mask"] & (d < depth)
        depth[hit] = d[hit]
        shade = _shade(out["normals"])
        colour = out["rgb"]
        for c in range(3):
            rgb[..., c][hit] = colour[c][hit] * shade[hit]
        ids[hit] = index
    depth[~np.isfinite(depth)] = 0.0
    return rgb, depth, ids


def _shade(normals: np.ndarray) -> np.ndarray:
    """Lambertian shading with a fixed light near the camera (both normal orientations)."""
    cosine = np.abs(np.tensordot(LIGHT, normals, axes=(0, 0)))
    return 0.35 + 0.65 * cosine


def sensor_depth(depth: np.ndarray, rng, scale: int = 1) -> np.ndarray:
    """Depth sensor model on a noise-free depth (H,W) in metres: Gaussian noise with sigma
    = 0.5 mm + 1.5 mm * z^2, 1 mm quantisation, most pixels at depth edges missing (the
    band is ``scale`` pixels wide), and a few random dropouts."""
    valid = depth > 0
    noisy = depth + rng.normal(size=depth.shape).astype(np.float32) * (DEPTH_NOISE_A + DEPTH_NOISE_B * depth**2)
    noisy = np.round(noisy * 1000.0) / 1000.0
    filled = np.where(valid, depth, 0.0)
    spread = maximum_filter(filled, size=3) - minimum_filter(np.where(valid, depth, np.inf), size=3)
    # jumps between neighbours (occlusion boundaries) and the border of the valid region
    edges = (spread > np.maximum(0.01, 0.02 * depth)) | (valid & binary_dilation(~valid, iterations=1))
    if scale > 1:
        edges = binary_dilation(edges, iterations=scale - 1)
    drop = (edges & (rng.uniform(size=depth.shape) < 0.8)) | (rng.uniform(size=depth.shape) < 0.002)
    noisy[drop | ~valid] = 0.0
    return noisy.astype(np.float32)


# ------------------------------------------------------------------------------- scene


def make_scene(
    mesh=None,
    width: int = 3072,
    height: int = 2048,
    frames: int = 1,
    footprint: float | None = None,
    seed: int = 0,
    *,
    distractors: int = 3,
    noise: bool = True,
    device="cpu",
    backend: str | None = "gl",
    K=None,
    outside: float = 0.0,
) -> Scene:
    """A synthetic RGB-D scene (or sequence) with ground truth.

    mesh: a Mesh, trimesh, path or builtin name (None: a builtin object chosen by seed);
    width, height: image size; frames: number of frames (> 1: smooth motion);
    footprint: fraction of the image the object covers (0.01..0.3 typical; None: drawn in
    0.02..0.15); seed: everything random comes from it; distractors: other objects in the
    scene; noise: sensor noise on depth and RGB (False: clean images, depth still 0 where
    there is no surface); device, backend: where and with which renderer to draw (the
    default, OpenGL on the CPU, gives the same images on every machine); K: (3,3)
    intrinsics to use (None: drawn from the seed, focal ~0.8 width, centred principal
    point); outside: fraction (0..0.9) of the object's image extent placed past a random
    image edge (a partly cut-off object; 0: fully inside with a margin).
    """
    from chunkpose.ops.render import make_renderer

    for name, value in (("width", width), ("height", height), ("frames", frames)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    width, height, frames = int(width), int(height), int(frames)
    if width < 16 or height < 16:
        raise ValueError(f"width, height: expected at least 16 pixels, got {width}x{height}")
    if footprint is not None and not (FOOTPRINT_RANGE[0] <= footprint <= FOOTPRINT_RANGE[1]):
        raise ValueError(
            f"footprint: expected a fraction of the image area in [{FOOTPRINT_RANGE[0]}, {FOOTPRINT_RANGE[1]}] "
            f"(e.g. 0.01 for a small object, 0.3 for a large one), got {footprint!r}"
        )
    if not (0.0 <= float(outside) <= 0.9):
        raise ValueError(f"outside: expected a fraction of the object's extent in [0, 0.9], got {outside!r}")
    if K is not None:
        from chunkpose.pipeline.frame import validate_intrinsics

        K = validate_intrinsics(K)
    rng = np.random.default_rng(seed)
    shapes = builtin_meshes()
    names = sorted(shapes)
    if mesh is None:
        object_name = names[int(rng.integers(len(names)))]
        mesh = load_mesh(shapes[object_name])
    elif isinstance(mesh, str) and mesh in shapes:
        object_name = mesh
        mesh = load_mesh(shapes[mesh])
    else:
        object_name = None
        mesh = load_mesh(mesh)
    if footprint is None:
        footprint = float(np.exp(rng.uniform(np.log(DEFAULT_FOOTPRINT[0]), np.log(DEFAULT_FOOTPRINT[1]))))

    drawn_K = _intrinsics(width, height, rng)  # drawn either way: the same seed, the same scene
    K = drawn_K if K is None else K
    renderer = make_renderer(mesh, device, backend=backend)
    rotation0 = Rotation.random(random_state=rng).as_matrix()
    center0, room = _place_object(renderer, mesh, rotation0, K, width, height, footprint, rng, float(outside))
    rotations, centers = _trajectory(rotation0, center0, room, K, frames, rng)
    poses = [_pose(R, c, mesh.center) for R, c in zip(rotations, centers)]
    radius = mesh.radius
    z_far_object = max(c[2] for c in centers) + radius

    # background plane behind every object position, tilted by up to 25 degrees
    tilt = Rotation.from_rotvec(np.append(rng.normal(size=2), 0.0) / np.sqrt(2) * np.radians(rng.uniform(0, 25)))
    normal = tilt.apply([0.0, 0.0, -1.0])  # faces the camera
    gap = radius * rng.uniform(0.3, 1.5) + 0.02
    plane_point = np.array([0.0, 0.0, z_far_object + gap])
    # push the plane back until every object position is in front of it
    for c in centers:
        behind = normal @ (c - plane_point) - radius  # > 0: in front (camera side)
        if behind < gap:
            plane_point = plane_point - normal * (gap - behind)
    plane = _background_plane(K, width, height, plane_point, normal, rng)

    # distractors: other builtin objects, between the object and the plane or beside it
    others = [n for n in names if n != object_name]
    placed = []  # (centre, radius, mesh, pose)
    obj_px = [(K @ c)[:2] / c[2] for c in centers]
    obj_r_px = K[0, 0] * radius / min(c[2] for c in centers)
    for _ in range(int(distractors)):
        name = others[int(rng.integers(len(others)))]
        d_source = shapes[name].copy()
        d_source.apply_scale(rng.uniform(0.6, 1.2))
        d_mesh = load_mesh(d_source)
        d_radius = d_mesh.radius
        d_rotation = Rotation.random(random_state=rng).as_matrix()
        for _attempt in range(60):
            u, v = rng.uniform(0, width), rng.uniform(0, height)
            ray = _ray(K, u, v)
            plane_s = (normal @ plane_point) / (normal @ ray)  # where the ray meets the plane
            z_max = plane_s * ray[2] - d_radius * 1.2
            z_min = max(center0[2] * 0.7, 0.15)
            if z_max <= z_min:
                continue
            z = rng.uniform(z_min, z_max)
            c = z * ray
            if any(np.linalg.norm(c - oc) < radius + d_radius for oc in centers):
                continue  # would intersect the object
            if any(np.linalg.norm(c - pc) < pr + d_radius for pc, pr, _, _ in placed):
                continue  # would intersect another distractor
            d_r_px = K[0, 0] * d_radius / z
            in_front = z - d_radius < z_far_object
            small_overlap = all(
                np.linalg.norm(np.array([u, v]) - p) > obj_r_px + d_r_px - MAX_OCCLUSION_OVERLAP * obj_r_px
                for p in obj_px
            )
            if in_front and not small_overlap:
                continue  # could hide a large part of the object
            placed.append((c, d_radius, d_mesh, _pose(d_rotation, c, d_mesh.center)))
            break
    placed_meshes = [(m, p) for _, _, m, p in placed]

    # static layers: the plane and the distractors, rendered once and composited one at a
    # time (a generator) so that only one full-resolution render is alive at once
    statics = [(plane, np.eye(4))] + placed_meshes
    static_layers = (
        (i, make_renderer(m, device, backend=backend).render_full(p, K, width, height))
        for i, (m, p) in enumerate(statics)
    )
    static_rgb, static_depth, _ = _composite(static_layers, width, height)

    object_id = 99
    rgb_frames, depth_frames, clean_frames, masks, full_masks = [], [], [], [], []
    edge_scale = max(1, round(width / 1280))
    for pose in poses:
        out = renderer.render_full(pose, K, width, height)
        obj_rgb, obj_depth, obj_ids = _composite([(object_id, out)], width, height)
        full = obj_ids == object_id
        visible = full & ((static_depth == 0) | (obj_depth < static_depth))
        rgb = np.where(visible[..., None], obj_rgb, static_rgb)
        depth = np.where(visible, obj_depth, static_depth).astype(np.float32)
        if noise:
            rgb = rgb * 255.0 + rng.normal(scale=RGB_NOISE_SIGMA, size=rgb.shape)
            measured = sensor_depth(depth, rng, edge_scale)
        else:
            rgb = rgb * 255.0
            measured = depth.copy()
        rgb_frames.append(np.clip(np.round(rgb), 0, 255).astype(np.uint8))
        depth_frames.append(measured)
        clean_frames.append(depth)
        masks.append(visible)
        full_masks.append(full)
    achieved = float(np.mean([m.mean() for m in full_masks]))
    return Scene(
        rgb=rgb_frames,
        depth=depth_frames,
        masks=masks,
        K=K,
        poses=poses,
        mesh=mesh,
        depth_clean=clean_frames,
        full_masks=full_masks,
        footprint=achieved,
        info={
            "seed": seed,
            "object": object_name or "user mesh",
            "requested_footprint": footprint,
            "distractors": len(placed_meshes),
            "plane_point": plane_point.tolist(),
            "plane_normal": normal.tolist(),
            "visible_fraction": [float(v.sum() / max(f.sum(), 1)) for v, f in zip(masks, full_masks)],
        },
    )
