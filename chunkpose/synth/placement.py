"""Where things go: the camera, each object's start pose and smooth motion, the background
plane and the distractors.

Placement rules:

- objects of the scene: in every frame their convex hulls do not intersect (no
  interpenetration), and the convex hulls of their silhouettes overlap by at most
  ``MAX_OBJECT_OVERLAP`` of the smaller hull's area. A silhouette lies inside its hull, so
  one object hides at most that area of another: each keeps nearly all of its silhouette
  (about 85% or more even for the hollow mug; most never touch at all);
- a distractor in front of the farthest object overlaps each object's bounding circle
  (its bounding sphere, radius ``Mesh.radius``, seen from the camera) by at most
  ``MAX_OCCLUSION_OVERLAP`` of that object's radius (behind every object it may be
  anywhere), and never intersects an object's bounding sphere or another distractor;
- the background plane lies behind every object position.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from chunkpose.errors import InputError
from chunkpose.io.mesh import Mesh, load_mesh, mesh_from_trimesh

# Distractors may cover at most this fraction of an object's radius in the image.
MAX_OCCLUSION_OVERLAP = 0.35
# Objects of the scene: their silhouettes' convex hulls overlap by at most this fraction
# of the smaller hull.
MAX_OBJECT_OVERLAP = 0.1
# Positions tried for each further object before giving up (each costs one small render).
PLACEMENT_TRIES = 200
# Renders used to fit an object's distance are at most this many pixels wide.
FIT_RENDER_SIDE = 400.0


@dataclass
class Track:
    """An object being placed: its per-frame rotation and bounding-box centre in the camera
    frame, and the frames in which it is moved out of the view (hidden).

    Attributes:
        name: the object's name.
        mesh: its Mesh (metres).
        renderer: a renderer of the mesh.
        footprint: target image fraction of its silhouette.
        rotations: [(3,3)] per frame.
        centers: [(3,)] bounding-box centre per frame, camera frame, metres.
        room: (du, dv) free pixels about the start position for the motion.
        hidden: frames in which it is moved out of view.
        fit: the DistanceFit of its distance (to draw another start), or None.
        outside: fraction of its extent placed past an image edge (0 = wholly inside).
    """

    name: str
    mesh: Mesh
    renderer: object
    footprint: float
    rotations: list
    centers: list
    room: tuple = (0.0, 0.0)
    hidden: set = field(default_factory=set)
    fit: "DistanceFit | None" = None  # how its distance was fitted (to draw another start)
    outside: float = 0.0

    @property
    def radius(self) -> float:
        return self.mesh.radius

    @property
    def poses(self) -> list:
        return [object_pose(R, c, self.mesh.center) for R, c in zip(self.rotations, self.centers)]

    def shown_centers(self) -> list:
        """Centres of the frames in which the object is in its place (not moved out of view).

        Returns:
            list of (3,) camera-frame centres, metres.
        """
        return [c for k, c in enumerate(self.centers) if k not in self.hidden]

    @functools.cached_property
    def shape(self) -> "Shape":
        """The Shape of the track's mesh (computed once).

        Returns:
            Shape.
        """
        return Shape.of(self.mesh)


@dataclass(frozen=True)
class Shape:
    """What the placement rules need of a mesh.

    Attributes:
        hull: (P,3) convex-hull vertices relative to the bounding-box centre, metres (they bound
            the silhouette's extent from any view).
        half: (3,) half sizes of the bounding box, metres.
        radius: the hull's radius about the centre, metres.
    """

    hull: np.ndarray
    half: np.ndarray
    radius: float

    @classmethod
    def of(cls, mesh: Mesh) -> "Shape":
        """The Shape of ``mesh`` (all vertices for a flat mesh without a 3D hull).

        Args:
            mesh: a Mesh.

        Returns:
            Shape.
        """
        from scipy.spatial import ConvexHull

        vertices = np.asarray(mesh.vertices, np.float64) - mesh.center
        try:
            hull = vertices[ConvexHull(vertices).vertices]
        except Exception:  # flat meshes have no 3D hull: all their vertices will do
            hull = vertices
        return cls(hull, (vertices.max(axis=0) - vertices.min(axis=0)) / 2.0,
                   float(np.linalg.norm(hull, axis=1).max()))

    def points(self, rotation, center) -> np.ndarray:
        """(P,3) hull vertices at this pose (camera frame).

        Args:
            rotation: (3,3) rotation.
            center: (3,) bounding-box centre in the camera frame, metres.

        Returns:
            (P,3) float64 metres.
        """
        return self.hull @ np.asarray(rotation).T + center

    def outline(self, K, rotation, center) -> np.ndarray:
        """(P,2) float32 convex polygon (pixels) holding the silhouette at this pose.

        Args:
            K: (3,3) intrinsics in pixels.
            rotation: (3,3) rotation.
            center: (3,) bounding-box centre in the camera frame, metres (in front of the camera).

        Returns:
            (Q,2) float32 hull polygon in pixels.
        """
        import cv2

        points = self.points(rotation, center)
        pixels = (points @ K.T)[:, :2] / points[:, 2:3]
        return cv2.convexHull(pixels.astype(np.float32)).reshape(-1, 2)


# ----------------------------------------------------------------------------- camera


def draw_intrinsics(width: int, height: int, rng) -> np.ndarray:
    """K (3,3): focal ~0.8 width, principal point within 1% of the centre.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        rng: numpy Generator.

    Returns:
        (3,3) float64 in pixels.
    """
    focal = 0.8 * width * (1.0 + rng.uniform(-0.05, 0.05))
    return np.array(
        [
            [focal, 0.0, (width - 1) / 2.0 + rng.uniform(-0.01, 0.01) * width],
            [0.0, focal * (1.0 + rng.uniform(-0.002, 0.002)), (height - 1) / 2.0 + rng.uniform(-0.01, 0.01) * height],
            [0.0, 0.0, 1.0],
        ]
    )


def scaled_intrinsics(K: np.ndarray, factor: float) -> np.ndarray:
    """K for an image resized by ``factor`` with pixel centres at integers.

    Args:
        K: (3,3) intrinsics in pixels.
        factor: resize factor.

    Returns:
        (3,3) new array: focal lengths times factor, c' = (c + 0.5) factor - 0.5.
    """
    scaled = K.copy()
    scaled[0, 0] *= factor
    scaled[1, 1] *= factor
    scaled[0, 2] = (K[0, 2] + 0.5) * factor - 0.5
    scaled[1, 2] = (K[1, 2] + 0.5) * factor - 0.5
    return scaled


def object_pose(rotation: np.ndarray, center_cam: np.ndarray, mesh_center: np.ndarray) -> np.ndarray:
    """(4,4) pose whose mesh bounding-box centre lands at ``center_cam`` (camera frame).

    Args:
        rotation: (3,3) rotation.
        center_cam: (3,) camera-frame point, metres.
        mesh_center: (3,) the mesh's bounding-box centre in its own frame, metres.

    Returns:
        (4,4) float64 object-in-camera pose, metres.
    """
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = center_cam - rotation @ mesh_center
    return pose


def ray(K: np.ndarray, u: float, v: float) -> np.ndarray:
    """Camera-frame direction with z = 1 through pixel (u, v).

    Args:
        K: (3,3) intrinsics in pixels.
        u: pixel x.
        v: pixel y.

    Returns:
        (3,) float64.
    """
    return np.linalg.solve(K, np.array([u, v, 1.0]))


def project(K: np.ndarray, point: np.ndarray) -> np.ndarray:
    """(u, v) pixel of a camera-frame point.

    Args:
        K: (3,3) intrinsics in pixels.
        point: (3,) camera-frame point with z > 0.

    Returns:
        (2,) float64 pixels.
    """
    return (K @ point)[:2] / point[2]


def circle_radius_px(K: np.ndarray, center: np.ndarray, radius: float) -> float:
    """Image radius (pixels, approximately) of a sphere of ``radius`` at ``center``.

    Args:
        K: (3,3) intrinsics in pixels.
        center: (3,) camera-frame centre, metres.
        radius: sphere radius, metres.

    Returns:
        float pixels (fx * radius / z).
    """
    return float(K[0, 0] * radius / center[2])


# ----------------------------------------------------------------------------- one object


@dataclass
class DistanceFit:
    """An object's distance for a footprint and its silhouette's extent about the projected
    centre (full-resolution pixels), measured on a small render.

    Attributes:
        z: distance (camera z) in metres.
        left: silhouette extent left of the projected centre, pixels.
        right: extent to the right, pixels.
        top: extent above, pixels.
        bottom: extent below, pixels.
        K_small: (3,3) intrinsics of the small render.
        small_w: the small render's width in pixels.
        small_h: the small render's height in pixels.
    """

    z: float
    left: float
    right: float
    top: float
    bottom: float
    K_small: np.ndarray
    small_w: int
    small_h: int


def _silhouette(renderer, pose, K, width, height):
    """(area fraction, bbox (x0, y0, x1, y1) in pixels) of the object at ``pose``."""
    mask = renderer.render_full(pose, K, width, height)["mask"][0].cpu().numpy()
    if not mask.any():
        return 0.0, None
    ys, xs = np.nonzero(mask)
    return float(mask.mean()), (xs.min(), ys.min(), xs.max(), ys.max())


def fit_distance(renderer, mesh: Mesh, rotation, K, width, height, footprint) -> DistanceFit:
    """The distance at which the object at ``rotation`` covers ``footprint`` of the image when
    centred.

    Measured on a small render (at most FIT_RENDER_SIDE pixels wide): the area fraction does
    not depend on the resolution, and scales as 1/z^2.

    Args:
        renderer: a renderer of the mesh.
        mesh: the Mesh.
        rotation: (3,3) rotation.
        K: (3,3) intrinsics in pixels.
        width: image width in pixels.
        height: image height in pixels.
        footprint: target image fraction in (0, 1).

    Returns:
        DistanceFit.

    Raises:
        RuntimeError: the object is not visible at any distance tried.
    """
    factor = min(1.0, FIT_RENDER_SIDE / max(width, height))
    small_w, small_h = max(8, round(width * factor)), max(8, round(height * factor))
    factor_x = small_w / width
    K_small = scaled_intrinsics(K, factor_x)
    u0, v0 = K[0, 2], K[1, 2]
    z = K[0, 0] * mesh.diameter / (math.sqrt(footprint * width * height) * 1.2)
    for _ in range(3):  # converge on the distance at the image centre
        area, box = _silhouette(renderer, object_pose(rotation, z * ray(K, u0, v0), mesh.center), K_small, small_w, small_h)
        if area <= 0:
            z *= 2.0
            continue
        z *= math.sqrt(area / footprint)
    area, box = _silhouette(renderer, object_pose(rotation, z * ray(K, u0, v0), mesh.center), K_small, small_w, small_h)
    if box is None:
        raise RuntimeError("synth: the object is not visible at any tried distance (is the mesh degenerate?)")
    cu, cv = (K_small[0, 2], K_small[1, 2])
    return DistanceFit(
        z=z,
        left=(cu - box[0]) / factor_x, right=(box[2] - cu) / factor_x,
        top=(cv - box[1]) / factor_x, bottom=(box[3] - cv) / factor_x,
        K_small=K_small, small_w=small_w, small_h=small_h,
    )


def position_object(fit: DistanceFit, renderer, mesh: Mesh, rotation, K, width, height, footprint, rng,
                    outside: float = 0.0):
    """Draw the object's image position: wholly inside with a 3% margin, or with ``outside`` of
    its extent past a random edge.

    Args:
        fit: the object's DistanceFit.
        renderer: a renderer of the mesh.
        mesh: the Mesh.
        rotation: (3,3) rotation.
        K: (3,3) intrinsics in pixels.
        width: image width in pixels.
        height: image height in pixels.
        footprint: target image fraction.
        rng: numpy Generator.
        outside: fraction of its extent past an edge (default 0: inside).

    Returns:
        (centre, room): (3,) camera-frame centre in metres and (du, dv) free pixels about it for
        the motion.
    """
    u0, v0 = K[0, 2], K[1, 2]
    left, right, top, bottom = fit.left, fit.right, fit.top, fit.bottom
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
    center = fit.z * ray(K, u, v)
    # off-centre the perspective changes the area slightly: one more correction
    area, _ = _silhouette(renderer, object_pose(rotation, center, mesh.center), fit.K_small, fit.small_w, fit.small_h)
    if area > 0 and outside <= 0:  # (a cut-off silhouette's area says nothing about the distance)
        center = center * math.sqrt(area / footprint)
    room = (min(u - lo_u, hi_u - u) if hi_u > lo_u else 0.0, min(v - lo_v, hi_v - v) if hi_v > lo_v else 0.0)
    return center, room


def trajectory(rotation0, center0, room, K, frames: int, rng):
    """Smooth motion: a slow rotation about a random axis and a gentle sinusoidal drift that
    stays inside the image.

    Args:
        rotation0: (3,3) start rotation.
        center0: (3,) start centre, camera frame, metres.
        room: (du, dv) free pixels around the start position.
        K: (3,3) intrinsics in pixels.
        frames: number of frames.
        rng: numpy Generator.

    Returns:
        (rotations, centres): lists of (3,3) and (3,), one per frame.
    """
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


def place_first_object(name, mesh, renderer, footprint, K, width, height, frames, outside, rng) -> Track:
    """The scene's first object: a random rotation, anywhere in the image (or partly past an edge
    with ``outside``), moving smoothly.

    Args:
        name: the object's name.
        mesh: its Mesh.
        renderer: a renderer of the mesh.
        footprint: target image fraction.
        K: (3,3) intrinsics in pixels.
        width: image width in pixels.
        height: image height in pixels.
        frames: number of frames.
        outside: fraction of its extent past an edge (0: inside).
        rng: numpy Generator.

    Returns:
        Track.
    """
    rotation0 = Rotation.random(random_state=rng).as_matrix()
    fit = fit_distance(renderer, mesh, rotation0, K, width, height, footprint)
    center0, room = position_object(fit, renderer, mesh, rotation0, K, width, height, footprint, rng, outside)
    rotations, centers = trajectory(rotation0, center0, room, K, frames, rng)
    return Track(name, mesh, renderer, footprint, rotations, centers, room, fit=fit, outside=outside)


def redraw_path(track: Track, others: list, K, width, height, rng) -> bool:
    """Give ``track`` a new start position and motion (same rotation, distance and number of
    frames).

    Args:
        track: the Track to move.
        others: the other objects' Tracks.
        K: (3,3) intrinsics in pixels.
        width: image width in pixels.
        height: image height in pixels.
        rng: numpy Generator.

    Returns:
        bool: False, leaving the track unchanged, when the new path breaks the placement rule
        with one of ``others``.
    """
    rotation0 = track.rotations[0]
    center0, room = position_object(track.fit, track.renderer, track.mesh, rotation0, K, width, height,
                                    track.footprint, rng, track.outside)
    rotations, centers = trajectory(rotation0, center0, room, K, len(track.centers), rng)
    if not all(apart(track, rotations, centers, other, K) for other in others):
        return False
    track.rotations, track.centers, track.room = rotations, centers, room
    return True


def boxes_intersect(rot_a, center_a, half_a, rot_b, center_b, half_b) -> bool:
    """Whether two oriented boxes intersect: no separating axis among the 15 candidates.

    Args:
        rot_a: (3,3) rotation whose columns are box a's axes.
        center_a: (3,) centre of box a.
        half_a: (3,) half sizes of box a.
        rot_b: (3,3) axes of box b.
        center_b: (3,) centre of box b.
        half_b: (3,) half sizes of box b.

    Returns:
        bool.
    """
    axes = [rot_a[:, i] for i in range(3)] + [rot_b[:, i] for i in range(3)]
    axes += [np.cross(rot_a[:, i], rot_b[:, j]) for i in range(3) for j in range(3)]
    offset = center_b - center_a
    for axis in axes:
        norm = np.linalg.norm(axis)
        if norm < 1e-9:  # parallel edges: covered by the face axes
            continue
        axis = axis / norm
        reach_a = np.abs(rot_a.T @ axis) @ half_a
        reach_b = np.abs(rot_b.T @ axis) @ half_b
        if abs(offset @ axis) > reach_a + reach_b:
            return False
    return True


def separable(points_a: np.ndarray, points_b: np.ndarray) -> bool:
    """Whether a plane separates two point sets, i.e. their convex hulls are disjoint.

    A feasibility linear program for w, b with w.p >= b + 1 on one side and w.q <= b - 1 on the
    other.

    Args:
        points_a: (P,3) points.
        points_b: (Q,3) points.

    Returns:
        bool.
    """
    from scipy.optimize import linprog

    middle = (points_a.mean(axis=0) + points_b.mean(axis=0)) / 2.0
    scale = max(np.abs(points_a - middle).max(), np.abs(points_b - middle).max(), 1e-9)
    a, b = (points_a - middle) / scale, (points_b - middle) / scale  # well conditioned
    rows = np.vstack([np.hstack([-a, np.ones((len(a), 1))]), np.hstack([b, -np.ones((len(b), 1))])])
    result = linprog(np.zeros(4), A_ub=rows, b_ub=-np.ones(len(rows)), bounds=[(None, None)] * 4, method="highs")
    return result.status == 0


def solids_apart(a: "Shape", rot_a, center_a, b: "Shape", rot_b, center_b) -> bool:
    """Whether two objects' convex hulls are disjoint at these poses: bounding spheres, then
    oriented boxes, then (only when those cannot tell) a separating plane.

    Args:
        a: Shape of the first object.
        rot_a: (3,3) its rotation.
        center_a: (3,) its centre, metres.
        b: Shape of the second object.
        rot_b: (3,3) its rotation.
        center_b: (3,) its centre, metres.

    Returns:
        bool.
    """
    if np.linalg.norm(center_a - center_b) >= a.radius + b.radius:
        return True
    if not boxes_intersect(rot_a, center_a, a.half, rot_b, center_b, b.half):
        return True
    return separable(a.points(rot_a, center_a), b.points(rot_b, center_b))


def outlines_overlap(outline_a, outline_b, overlap: float = MAX_OBJECT_OVERLAP) -> bool:
    """Whether two silhouette hulls (convex polygons, pixels) overlap by more than ``overlap`` of
    the smaller one's area.

    Args:
        outline_a: (P,2) float32 convex polygon, pixels.
        outline_b: (Q,2) float32 convex polygon, pixels.
        overlap: allowed fraction (default MAX_OBJECT_OVERLAP).

    Returns:
        bool.
    """
    import cv2

    area, _ = cv2.intersectConvexConvex(outline_a, outline_b)
    smaller = min(cv2.contourArea(outline_a), cv2.contourArea(outline_b))
    return area > overlap * max(smaller, 1.0)


def apart(a: Track, a_rotations, a_centers, b: Track, K, frames=None) -> bool:
    """Whether object ``a`` on the path (a_rotations, a_centers) and object ``b`` on its own path
    keep the placement rule (see the module docstring) in ``frames``.

    Frames in which either object is hidden are skipped.

    Args:
        a: the first object's Track (its shape and hidden frames are used).
        a_rotations: [(3,3)] per frame for ``a``.
        a_centers: [(3,)] per frame for ``a``, metres.
        b: the other Track (its own rotations and centres).
        K: (3,3) intrinsics in pixels.
        frames: frame indices to check (default all).

    Returns:
        bool.
    """
    frames = range(len(a_centers)) if frames is None else frames
    for k in frames:
        if k in a.hidden or k in b.hidden:
            continue
        if outlines_overlap(a.shape.outline(K, a_rotations[k], a_centers[k]),
                            b.shape.outline(K, b.rotations[k], b.centers[k])):
            return False
        if not solids_apart(a.shape, a_rotations[k], a_centers[k], b.shape, b.rotations[k], b.centers[k]):
            return False
    return True


def place_further_object(name, mesh, renderer, footprint, placed: list, K, width, height, frames, rng) -> Track:
    """Another object of the scene, kept apart from the ``placed`` tracks in every frame (see the
    module docstring).

    Args:
        name: the object's name.
        mesh: its Mesh.
        renderer: a renderer of the mesh.
        footprint: target image fraction.
        placed: the Tracks placed so far.
        K: (3,3) intrinsics in pixels.
        width: image width in pixels.
        height: image height in pixels.
        frames: number of frames.
        rng: numpy Generator.

    Returns:
        Track.

    Raises:
        InputError: no position among PLACEMENT_TRIES works.
    """
    rotation0 = Rotation.random(random_state=rng).as_matrix()
    fit = fit_distance(renderer, mesh, rotation0, K, width, height, footprint)
    track = Track(name, mesh, renderer, footprint, [], [], fit=fit)
    for _ in range(PLACEMENT_TRIES):
        center0, room = position_object(fit, renderer, mesh, rotation0, K, width, height, footprint, rng)
        rotations, centers = trajectory(rotation0, center0, room, K, frames, rng)
        if all(apart(track, rotations, centers, other, K) for other in placed):
            track.rotations, track.centers, track.room = rotations, centers, room
            return track
    raise InputError(
        f"objects: could not place {name!r} (footprint {footprint:.3f}) next to {len(placed)} other object(s) in a "
        f"{width}x{height} image without them hiding each other; pass a smaller footprint or fewer objects"
    )


# ----------------------------------------------------------------------------- background


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
