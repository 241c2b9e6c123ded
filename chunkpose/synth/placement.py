"""Where the scene's objects go: the camera, each object's distance, start position and smooth
motion, and the placement of several objects kept apart.

The rule that keeps several objects apart (no interpenetration, little silhouette overlap)
and its tests live in chunkpose.synth.separation; the background plane and the distractors
in chunkpose.synth.backdrop.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from chunkpose.errors import InputError
from chunkpose.io.mesh import Mesh
from chunkpose.ops.geometry import scale_intrinsics

from .separation import Shape, apart

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
    K_small = scale_intrinsics(K, factor_x)
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


def place_further_object(name, mesh, renderer, footprint, placed: list, K, width, height, frames, rng) -> Track:
    """Another object of the scene, kept apart from the ``placed`` tracks in every frame (see
    chunkpose.synth.separation for the rule).

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

