"""The scene's background: the textured, tilted plane behind the objects and the
distractors placed between them and the plane or beside them.

Rules:

- a distractor in front of the farthest object overlaps each object's bounding circle
  (its bounding sphere, radius ``Mesh.radius``, seen from the camera) by at most
  ``MAX_OCCLUSION_OVERLAP`` of that object's radius (behind every object it may be
  anywhere), and never intersects an object's bounding sphere or another distractor;
- the background plane lies behind every object position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from chunkpose.io.mesh import Mesh, load_mesh, mesh_from_trimesh

from .placement import object_pose, project, ray

# Distractors may cover at most this fraction of an object's radius in the image.
MAX_OCCLUSION_OVERLAP = 0.35


def background_texture(rng, size: int = 512) -> np.ndarray:
    """A tileable (size,size,3) uint8 texture: colour noise with a 1/f spectrum (periodic by
    construction, so repeats show no seams), planks and a few dark lines.

    Args:
        rng: numpy Generator.
        size: side in pixels (default 512).

    Returns:
        (size,size,3) uint8 RGB.
    """
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


def _background_quad(K, width, height, point, normal, rng) -> Mesh:
    """A textured quad through ``point`` with ``normal`` covering the whole view."""
    import trimesh
    from PIL import Image

    e1 = np.cross(normal, [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    corners = []
    for u, v in [(0, 0), (width, 0), (0, height), (width, height)]:
        d = ray(K, u - 0.5, v - 0.5)
        s = (normal @ point) / (normal @ d)
        corners.append(s * d)
    corners = np.array(corners)
    a, b = (corners - point) @ e1, (corners - point) @ e2
    pad = 0.1 * max(a.max() - a.min(), b.max() - b.min())
    a0, a1, b0, b1 = a.min() - pad, a.max() + pad, b.min() - pad, b.max() + pad
    quad = np.array([point + p * e1 + q * e2 for p, q in [(a0, b0), (a1, b0), (a1, b1), (a0, b1)]])
    tile_m = rng.uniform(0.3, 0.6)  # metres per texture repeat
    uv = np.array([[p / tile_m, q / tile_m] for p, q in [(a0, b0), (a1, b0), (a1, b1), (a0, b1)]])
    visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(background_texture(rng)))
    # Scene geometry, not an object: it may be wider than load_mesh's millimetre check allows.
    return mesh_from_trimesh(trimesh.Trimesh(quad, [[0, 1, 2], [0, 2, 3]], visual=visual, process=False))


@dataclass
class Plane:
    """The background: a textured quad through ``point`` facing the camera along ``normal``.

    Attributes:
        mesh: the quad's Mesh (camera frame, metres).
        point: (3,) a point of the plane, metres.
        normal: (3,) unit normal facing the camera.
        z_far_object: the farthest any object surface gets (camera z, metres).
    """

    mesh: Mesh
    point: np.ndarray
    normal: np.ndarray
    z_far_object: float  # the farthest any object surface gets (camera z, metres)


def place_plane(tracks: list, K, width, height, rng) -> Plane:
    """The background plane behind every object position, tilted by up to 25 degrees.

    Args:
        tracks: the objects' Tracks.
        K: (3,3) intrinsics in pixels.
        width: image width in pixels.
        height: image height in pixels.
        rng: numpy Generator.

    Returns:
        Plane.
    """
    first = tracks[0]
    z_far_object = max(c[2] + t.radius for t in tracks for c in t.shown_centers())
    tilt = Rotation.from_rotvec(np.append(rng.normal(size=2), 0.0) / np.sqrt(2) * np.radians(rng.uniform(0, 25)))
    normal = tilt.apply([0.0, 0.0, -1.0])  # faces the camera
    gap = first.radius * rng.uniform(0.3, 1.5) + 0.02
    point = np.array([0.0, 0.0, z_far_object + gap])
    # push the plane back until every object position is in front of it
    for track in tracks:
        for c in track.shown_centers():
            behind = normal @ (c - point) - track.radius  # > 0: in front (camera side)
            if behind < gap:
                point = point - normal * (gap - behind)
    return Plane(_background_quad(K, width, height, point, normal, rng), point, normal, z_far_object)


def _distractor_source(shapes: dict, used: set, rng):
    """A distractor shape: a builtin object the scene does not use, else plain clutter."""
    from chunkpose.shapes import clutter_meshes

    others = [n for n in sorted(shapes) if n not in used]
    if not others:  # every builtin is an object of the scene: a look-alike would confuse
        shapes, others = clutter_meshes(), sorted(clutter_meshes())
    return shapes[others[int(rng.integers(len(others)))]].copy()


def place_distractors(count: int, shapes: dict, used: set, tracks: list, plane: Plane, K, width, height, rng) -> list:
    """Up to ``count`` distractors between the objects and the plane or beside them (see the
    module docstring for the rules).

    Args:
        count: most distractors placed.
        shapes: {name: trimesh} of builtin shapes to draw from.
        used: names of the scene's own objects (not used as distractors).
        tracks: the objects' Tracks.
        plane: the background Plane.
        K: (3,3) intrinsics in pixels.
        width: image width in pixels.
        height: image height in pixels.
        rng: numpy Generator.

    Returns:
        [(Mesh, pose (4,4) metres)].
    """
    first_z = min(t.centers[0][2] for t in tracks)
    views = []  # (image centres, circle radius in pixels, 3D centres, radius) per object
    for track in tracks:
        centers = track.shown_centers()
        views.append(([project(K, c) for c in centers], K[0, 0] * track.radius / min(c[2] for c in centers),
                      centers, track.radius))
    placed = []  # (centre, radius, mesh, pose)
    for _ in range(int(count)):
        source = _distractor_source(shapes, used, rng)
        source.apply_scale(rng.uniform(0.6, 1.2))
        d_mesh = load_mesh(source)
        d_radius = d_mesh.radius
        d_rotation = Rotation.random(random_state=rng).as_matrix()
        for _attempt in range(60):
            u, v = rng.uniform(0, width), rng.uniform(0, height)
            direction = ray(K, u, v)
            plane_s = (plane.normal @ plane.point) / (plane.normal @ direction)  # where the ray meets the plane
            z_max = plane_s * direction[2] - d_radius * 1.2
            z_min = max(first_z * 0.7, 0.15)
            if z_max <= z_min:
                continue
            z = rng.uniform(z_min, z_max)
            c = z * direction
            if any(np.linalg.norm(c - oc) < radius + d_radius for _, _, centers, radius in views for oc in centers):
                continue  # would intersect an object
            if any(np.linalg.norm(c - pc) < pr + d_radius for pc, pr, _, _ in placed):
                continue  # would intersect another distractor
            d_r_px = K[0, 0] * d_radius / z
            in_front = z - d_radius < plane.z_far_object
            small_overlap = all(
                np.linalg.norm(np.array([u, v]) - p) > r_px + d_r_px - MAX_OCCLUSION_OVERLAP * r_px
                for pixels, r_px, _, _ in views for p in pixels
            )
            if in_front and not small_overlap:
                continue  # could hide a large part of an object
            placed.append((c, d_radius, d_mesh, object_pose(d_rotation, c, d_mesh.center)))
            break
    return [(m, p) for _, _, m, p in placed]
