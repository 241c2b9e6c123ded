"""Events of a synthetic sequence: abrupt jumps and full occlusions of one object.

``Jump(frame=k)``: between frames k-1 and k the object turns by ``rotation_deg`` about a
random axis through its centre and moves by ``translation_diameters`` of its diameter
parallel to the image, in a direction that keeps it wholly in view (and apart from the
other objects) for the rest of the sequence; then it moves smoothly again. The defaults
(1.2 diameters, 90 degrees) are far beyond what frame-to-frame tracking can follow.

``Occlusion(start=k, frames=n)``: the object is completely hidden in frames k .. k+n-1 and
visible again from frame k+n (the reappearance, which must be a frame of the scene).
``by="occluder"``: a textured board halfway between the camera and the object, shaped
like its silhouette's convex hull and a little larger, covers it whole (the full
silhouette is still recorded); ``by="out_of_view"``: the object leaves the field of view
(its full silhouette is empty too) and returns to its path.

Per frame each object records tags: ``"jump"`` on a jump's frame, ``"occluded"`` on the
hidden frames, ``"reappeared"`` on the first frame after them. Random choices (jump axes
and directions, occluder textures) come from the scene's seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from chunkpose.errors import InputError
from chunkpose.io.mesh import Mesh, mesh_from_trimesh

from .placement import circle_radius_px, project, ray
from .separation import apart

JUMP = "jump"
OCCLUDED = "occluded"
REAPPEARED = "reappeared"
OCCLUDERS = ("occluder", "out_of_view")
# Directions tried for a jump's translation, evenly spaced (in a random order), and start
# positions tried for an object whose jump fits no direction.
JUMP_DIRECTIONS = 36
JUMP_PLACEMENT_TRIES = 30
# The occluder: this fraction of the way from the camera to the object's nearest point,
# and this many pixels wider than the silhouette's convex hull on every side.
OCCLUDER_DEPTH_FRACTION = 0.5
OCCLUDER_MARGIN_PX = 2.0
# An object out of view is this many of its image radii past the nearest image edge.
OUT_OF_VIEW_RADII = 3.0


@dataclass(frozen=True)
class Jump:
    """An abrupt change of one object's pose between frame ``frame - 1`` and ``frame``.

    Attributes:
        frame: the first frame at the new pose (1 .. frames-1).
        translation_diameters: the move parallel to the image, in object diameters (>= 0,
            default 1.2).
        rotation_deg: the turn about a random axis through the object's centre, degrees in
            [0, 180] (default 90).
        obj: the object (index into the scene's objects, or its name; default 0).
    """

    frame: int
    translation_diameters: float = 1.2
    rotation_deg: float = 90.0
    obj: int | str = 0


@dataclass(frozen=True)
class Occlusion:
    """One object completely hidden in frames ``start`` .. ``start + frames - 1``.

    Attributes:
        start: the first hidden frame (>= 1: frame 0 is where the object is registered).
        frames: how many frames it stays hidden (default 3); it reappears at ``start + frames``
            (``stop``), which must be a frame of the scene.
        obj: index or name of the object (default 0).
        by: "occluder" (a board in front of it, default) or "out_of_view" (it leaves the field
            of view).
    """

    start: int
    frames: int = 3
    obj: int | str = 0
    by: str = "occluder"

    @property
    def stop(self) -> int:
        """The reappearance frame."""
        return self.start + self.frames


def _whole(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what}: expected a whole frame number, got {value!r}")
    return int(value)


def _object_index(obj, names: list, where: str) -> int:
    if isinstance(obj, str):
        if obj not in names:
            raise InputError(f"{where}.obj: no object named {obj!r} (the scene has {', '.join(names)})")
        return names.index(obj)
    index = _whole(obj, f"{where}.obj")
    if not 0 <= index < len(names):
        raise InputError(f"{where}.obj: expected an object index in 0..{len(names) - 1}, got {index}")
    return index


def _check_jump(event: Jump, frames: int, where: str) -> None:
    frame = _whole(event.frame, f"{where}.frame")
    if not 1 <= frame <= frames - 1:
        raise InputError(f"{where}: Jump(frame={frame}) must be in 1..{frames - 1} for a {frames}-frame scene "
                         "(it needs a frame before it; pass more frames)")
    if not (math.isfinite(event.translation_diameters) and event.translation_diameters >= 0):
        raise InputError(f"{where}.translation_diameters: expected a number >= 0 (object diameters), "
                         f"got {event.translation_diameters!r}")
    if not (math.isfinite(event.rotation_deg) and 0 <= event.rotation_deg <= 180):
        raise InputError(f"{where}.rotation_deg: expected degrees in [0, 180], got {event.rotation_deg!r}")
    if event.translation_diameters == 0 and event.rotation_deg == 0:
        raise InputError(f"{where}: a Jump with translation_diameters=0 and rotation_deg=0 does not move the object")


def _check_occlusion(event: Occlusion, frames: int, where: str) -> None:
    start = _whole(event.start, f"{where}.start")
    count = _whole(event.frames, f"{where}.frames")
    if start < 1:
        raise InputError(f"{where}: Occlusion(start={start}) must start at frame 1 or later "
                         "(frame 0 is where the object is registered)")
    if count < 1:
        raise InputError(f"{where}.frames: expected at least 1 hidden frame, got {count}")
    if start + count > frames - 1:
        raise InputError(
            f"{where}: Occlusion(start={start}, frames={count}) hides frames {start}..{start + count - 1} and the "
            f"object reappears at frame {start + count}, past the last frame ({frames - 1}) of a {frames}-frame "
            f"scene; pass frames >= {start + count + 1} or end the occlusion earlier")
    if event.by not in OCCLUDERS:
        raise InputError(f"{where}.by: expected one of {OCCLUDERS}, got {event.by!r}")


def check_events(events, frames: int, names: list) -> list:
    """Validate ``events`` for a scene of ``frames`` frames and objects ``names``.

    Args:
        events: a Jump or Occlusion, a list of them, or None.
        frames: number of frames of the scene.
        names: the objects' names, in order.

    Returns:
        [(event, object index)] in the given order.

    Raises:
        InputError: an event is not a Jump / Occlusion, is out of range, names an unknown object,
            or conflicts with another event of the same object (the message names it).
    """
    if isinstance(events, (Jump, Occlusion)):
        events = [events]
    checked = []
    for i, event in enumerate(events or ()):
        where = f"events[{i}]"
        if isinstance(event, Jump):
            _check_jump(event, frames, where)
        elif isinstance(event, Occlusion):
            _check_occlusion(event, frames, where)
        else:
            raise InputError(f"{where}: expected a Jump or an Occlusion (from chunkpose.synth), got {event!r}")
        checked.append((event, _object_index(event.obj, names, where)))
    _check_no_overlap(checked)
    return checked


def _check_no_overlap(checked: list) -> None:
    """One object's occlusions must not overlap, and it cannot jump while hidden."""
    for i, (a, obj_a) in enumerate(checked):
        for j, (b, obj_b) in enumerate(checked[:i]):
            if obj_a != obj_b:
                continue
            if isinstance(a, Occlusion) and isinstance(b, Occlusion) and a.start < b.stop and b.start < a.stop:
                raise InputError(f"events[{i}], events[{j}]: two occlusions of one object overlap; merge them")
            if isinstance(a, Jump) and isinstance(b, Jump) and a.frame == b.frame:
                raise InputError(f"events[{i}], events[{j}]: two jumps of one object at frame {a.frame}; merge them")
            jump, hide = (a, b) if isinstance(a, Jump) else (b, a)
            if isinstance(jump, Jump) and isinstance(hide, Occlusion) and hide.start <= jump.frame < hide.stop:
                raise InputError(
                    f"events[{i}], events[{j}]: a jump at frame {jump.frame} while the object is hidden "
                    f"(frames {hide.start}..{hide.stop - 1}); put it at the reappearance, Jump(frame={hide.stop})")


def frame_tags(checked: list, object_index: int, frames: int) -> list:
    """Per frame, the tuple of event tags of one object.

    Args:
        checked: check_events output.
        object_index: the object's index.
        frames: number of frames.

    Returns:
        list of ``frames`` tuples of "jump", "occluded", "reappeared".
    """
    tags = [[] for _ in range(frames)]
    for event, index in checked:
        if index != object_index:
            continue
        if isinstance(event, Jump):
            tags[event.frame].append(JUMP)
        else:
            for k in range(event.start, event.stop):
                tags[k].append(OCCLUDED)
            tags[event.stop].append(REAPPEARED)
    return [tuple(t) for t in tags]


# ----------------------------------------------------------------------------- jumps


def _in_view(outline: np.ndarray, width: int, height: int) -> bool:
    """Whether a silhouette hull (convex polygon, pixels) lies inside the image with a 3%
    margin."""
    margin = 0.03 * min(width, height)
    lo, hi = outline.min(axis=0), outline.max(axis=0)
    return lo[0] >= margin and lo[1] >= margin and hi[0] <= width - 1 - margin and hi[1] <= height - 1 - margin


def _jumped_path(track, rotations, centers, jump: Jump, others: list, K, width, height, rng):
    """(rotations, centres, what was done) of ``track``'s path (rotations, centers) with
    ``jump`` applied, or None when no direction keeps it in view and apart from
    ``others`` in every later frame. Directions are tried in a random order."""
    k = jump.frame
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    turn = Rotation.from_rotvec(axis * np.radians(jump.rotation_deg)).as_matrix()
    distance = jump.translation_diameters * track.mesh.diameter
    offset_angle = rng.uniform(0, 2 * np.pi)
    turned = rotations[:k] + [turn @ R for R in rotations[k:]]
    later = range(k, len(centers))
    for step in rng.permutation(JUMP_DIRECTIONS):
        angle = offset_angle + 2 * np.pi * step / JUMP_DIRECTIONS
        shift = distance * np.array([np.cos(angle), np.sin(angle), 0.0])  # parallel to the image
        moved = centers[:k] + [c + shift for c in centers[k:]]
        if not all(_in_view(track.shape.outline(K, turned[j], moved[j]), width, height) for j in later):
            continue
        if not all(apart(track, turned, moved, other, K, later) for other in others):
            continue
        return turned, moved, {"frame": k, "object": track.name, "translation_m": float(distance),
                               "direction_camera": shift.tolist(), "rotation_deg": float(jump.rotation_deg),
                               "axis": axis.tolist()}
    return None


def apply_jumps(track, jumps: list, others: list, K, width, height, rng, redraw) -> list:
    """Apply one object's ``jumps`` (in frame order) to ``track`` in place; returns what each did
    (for Scene.info).

    When a jump has no direction that keeps the object in view and apart from ``others``, the
    object gets a new start position from ``redraw()`` (False: that one broke the placement
    rule) and all its jumps are tried again, up to JUMP_PLACEMENT_TRIES times.

    Args:
        track: the object's placement.Track (rotations and centres are replaced).
        jumps: its Jump events.
        others: the other objects' Tracks.
        K: (3,3) intrinsics in pixels.
        width: image width in pixels.
        height: image height in pixels.
        rng: numpy Generator the axes and directions are drawn from.
        redraw: ``() -> bool``, gives the track a new start (see placement.redraw_path).

    Returns:
        list of dicts (frame, object, translation_m, direction_camera, rotation_deg, axis).

    Raises:
        InputError: no start position tried lets the jumps fit the image.
    """
    for attempt in range(JUMP_PLACEMENT_TRIES):
        if attempt > 0 and not redraw():
            continue
        rotations, centers, done = track.rotations, track.centers, []
        for jump in sorted(jumps, key=lambda j: j.frame):
            result = _jumped_path(track, rotations, centers, jump, others, K, width, height, rng)
            if result is None:
                break
            rotations, centers, info = result
            done.append(info)
        else:
            track.rotations, track.centers = rotations, centers
            return done
    jump = jumps[0]
    raise InputError(
        f"events: Jump(frame={jump.frame}, translation_diameters={jump.translation_diameters:g}) of {track.name!r} "
        f"does not fit in the {width}x{height} image (with the other objects) from any start position tried; "
        "pass a smaller footprint or translation_diameters")


# ----------------------------------------------------------------------------- occlusions


def _outside(outline: np.ndarray, width: int, height: int) -> bool:
    """Whether a silhouette hull (pixels) lies wholly outside the image, a pixel apart."""
    lo, hi = outline.min(axis=0), outline.max(axis=0)
    return hi[0] < -1 or hi[1] < -1 or lo[0] > width or lo[1] > height


def move_out_of_view(track, occlusion: Occlusion, K, width, height) -> None:
    """Move ``track`` sideways (at its depth) past the nearest image edge in the occlusion's
    frames, until its silhouette hull is wholly outside (in place); those frames become hidden.

    Args:
        track: the object's placement.Track.
        occlusion: an Occlusion with by="out_of_view".
        K: (3,3) intrinsics in pixels.
        width: image width in pixels.
        height: image height in pixels.
    """
    for k in range(occlusion.start, occlusion.stop):
        c = track.centers[k]
        u, v = project(K, c)
        gaps = {"left": u, "right": width - 1 - u, "top": v, "bottom": height - 1 - v}
        edge = min(gaps, key=gaps.get)
        away = OUT_OF_VIEW_RADII * circle_radius_px(K, c, track.radius)
        while True:
            target = {"left": (-away, v), "right": (width - 1 + away, v), "top": (u, -away),
                      "bottom": (u, height - 1 + away)}[edge]
            moved = c[2] * ray(K, *target)
            if _outside(track.shape.outline(K, track.rotations[k], moved), width, height):
                break
            away *= 2.0  # seen from the side an object looks wider than its circle
        track.centers[k] = moved
        track.hidden.add(k)


def occluder_texture(rng, size: int = 128) -> np.ndarray:
    """(size,size,3) uint8: a bold check pattern in two random colours (a board or a sleeve,
    clearly not the background).

    Args:
        rng: numpy Generator.
        size: side in pixels (default 128).

    Returns:
        (size,size,3) uint8 RGB.
    """
    a, b = rng.uniform(0.1, 0.9, size=3), rng.uniform(0.1, 0.9, size=3)
    cells = max(2, int(rng.integers(3, 7)))
    y, x = np.mgrid[0:size, 0:size] * cells // size
    image = np.where(((x + y) % 2 == 0)[..., None], a, b)
    return (image * 255).round().astype(np.uint8)


def occluder_patch(full_mask: np.ndarray, nearest_z: float, K, texture: np.ndarray) -> Mesh | None:
    """A fronto-parallel textured board, in camera coordinates (render it at the identity pose).

    Shaped like the convex hull of ``full_mask`` grown by OCCLUDER_MARGIN_PX, at depth
    ``OCCLUDER_DEPTH_FRACTION * nearest_z``: it hides every pixel of the silhouette and, being
    no wider than its hull, little of any neighbour.

    Args:
        full_mask: (H,W) bool full silhouette of the object.
        nearest_z: the object's nearest camera z in metres.
        K: (3,3) intrinsics in pixels.
        texture: (h,w,3) uint8 texture (e.g. occluder_texture).

    Returns:
        Mesh in camera coordinates (metres), or None when the mask is empty.
    """
    import cv2
    import trimesh
    from PIL import Image

    ys, xs = np.nonzero(full_mask)
    if len(xs) == 0:
        return None
    hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.float32)).reshape(-1, 2).astype(np.float64)
    # grow the hull by the margin on every side (an octagon around each corner), past the
    # image border too: a silhouette cut by the border must stay covered up to it
    angles = np.arange(8) * np.pi / 4
    octagon = OCCLUDER_MARGIN_PX / math.cos(np.pi / 8) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    grown = (hull[:, None, :] + octagon[None]).reshape(-1, 2)
    outline = cv2.convexHull(grown.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    z = OCCLUDER_DEPTH_FRACTION * nearest_z
    # on a plane of constant depth, z * ray(u, v) projects exactly to (u, v)
    corners = np.array([z * ray(K, u, v) for u, v in outline])
    middle = corners.mean(axis=0)
    vertices = np.vstack([middle, corners])
    count = len(corners)
    faces = [[0, 1 + i, 1 + (i + 1) % count] for i in range(count)]
    lo, span = outline.min(axis=0), np.maximum(np.ptp(outline, axis=0), 1.0)
    uv = np.vstack([[0.5, 0.5], (outline - lo) / span.max()])
    visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(texture))
    return mesh_from_trimesh(trimesh.Trimesh(vertices, faces, visual=visual, process=False))
