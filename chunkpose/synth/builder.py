"""make_scene: resolve the arguments, place the objects, apply the events, place the
background and distractors, render the frames.

Random streams: everything a one-object scene without events draws comes from
``default_rng(seed)`` in a fixed order (so such scenes stay what they always were); the
further objects and the events draw from two streams spawned from the same seed, so
adding an occlusion does not move the objects, and a jump moves its object's start only
when the jump does not fit in the image from there.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chunkpose.errors import InputError
from chunkpose.io.mesh import Mesh, load_mesh
from chunkpose.shapes import builtin_meshes

from . import events as ev
from .backdrop import place_distractors, place_plane
from .imaging import composite, render_frame
from .placement import draw_intrinsics, place_first_object, place_further_object, redraw_path
from .scene import ObjectTrack, Scene

FOOTPRINT_RANGE = (0.001, 0.5)
DEFAULT_FOOTPRINT = (0.02, 0.15)  # drawn log-uniformly when footprint=None
# Several objects, or jumps (which need room to land in view): smaller objects.
DEFAULT_CROWDED_FOOTPRINT = (0.015, 0.05)
# Several objects together may cover at most this much of the image.
MAX_TOTAL_FOOTPRINT = 0.3
MAX_OBJECTS = 4
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class _ObjectSpec:
    name: str
    mesh: Mesh
    builtin: str | None  # the builtin shape's name, None for a user mesh


@dataclass
class _Plan:
    """The checked arguments and what the seed decided before anything is placed."""

    width: int
    height: int
    frames: int
    outside: float
    K: np.ndarray
    specs: list  # [_ObjectSpec], the first object first
    checked: list  # [(event, object index)]
    footprints: list  # requested, one per object
    shapes: dict  # the builtins, for the distractors
    rng: np.random.Generator
    objects_rng: np.random.Generator
    events_rng: np.random.Generator


@dataclass
class _Layout:
    """Everything placed, nothing rendered yet."""

    tracks: list
    boards: list  # per frame, [(object index, occluder texture)]
    event_info: dict
    plane: object
    distractors: list  # [(mesh, pose)]


# ----------------------------------------------------------------------------- arguments


def _check_sizes(width, height, frames) -> tuple[int, int, int]:
    for name, value in (("width", width), ("height", height), ("frames", frames)):
        if int(value) != value or value < 1:
            raise InputError(f"{name}: expected a positive integer, got {value!r}")
    width, height, frames = int(width), int(height), int(frames)
    if width < 16 or height < 16:
        raise InputError(f"width, height: expected at least 16 pixels, got {width}x{height}")
    return width, height, frames


def _check_footprint(value, what: str = "footprint") -> float:
    if not (FOOTPRINT_RANGE[0] <= value <= FOOTPRINT_RANGE[1]):
        raise InputError(
            f"{what}: expected a fraction of the image area in [{FOOTPRINT_RANGE[0]}, {FOOTPRINT_RANGE[1]}] "
            f"(e.g. 0.01 for a small object, 0.3 for a large one), got {value!r}"
        )
    return float(value)


def _safe_name(name: str) -> str:
    """A name usable as a folder name (masks/<name>/)."""
    return _UNSAFE_NAME.sub("_", str(name)).strip("._") or "object"


def _user_object(source, default_name: str) -> _ObjectSpec:
    name = Path(source).stem if isinstance(source, (str, Path)) else default_name
    return _ObjectSpec(_safe_name(name), load_mesh(source), None)


def _object_spec(item, shapes: dict, default_name: str) -> _ObjectSpec:
    """One entry of ``objects``: a builtin name, a path, a Mesh/trimesh or (name, mesh)."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        spec = _object_spec(item[1], shapes, item[0])
        return _ObjectSpec(_safe_name(item[0]), spec.mesh, spec.builtin)
    if isinstance(item, str) and item in shapes:
        return _ObjectSpec(item, load_mesh(shapes[item]), item)
    return _user_object(item, default_name)


def _unique_names(specs: list) -> list:
    seen = {}
    for spec in specs:
        count = seen.get(spec.name, 0) + 1
        seen[spec.name] = count
        if count > 1:  # two mugs: "mug", "mug_2"
            spec.name = f"{spec.name}_{count}"
    return specs


def _resolve_objects(mesh, objects, shapes: dict, rng, objects_rng) -> list:
    """[_ObjectSpec] of the scene's objects, the first one first."""
    names = sorted(shapes)
    if objects is None:
        if mesh is None:
            name = names[int(rng.integers(len(names)))]
            return [_ObjectSpec(name, load_mesh(shapes[name]), name)]
        return [_object_spec(mesh, shapes, "object")]
    if mesh is not None:
        raise InputError("mesh, objects: pass one of them (objects=[mesh, other, ...] for several objects)")
    if isinstance(objects, (int, np.integer)) and not isinstance(objects, bool):
        if not 1 <= objects <= min(MAX_OBJECTS, len(names)):
            raise InputError(f"objects: expected 1..{min(MAX_OBJECTS, len(names))} builtin objects, got {objects}")
        chosen = objects_rng.choice(len(names), size=int(objects), replace=False)
        return [_ObjectSpec(names[i], load_mesh(shapes[names[i]]), names[i]) for i in chosen]
    items = list(objects.items()) if isinstance(objects, dict) else list(objects)
    if not 1 <= len(items) <= MAX_OBJECTS:
        raise InputError(f"objects: expected 1..{MAX_OBJECTS} meshes (builtin names, files, Mesh or trimesh), "
                         f"got {len(items)}; make several scenes for more")
    return _unique_names([_object_spec(item, shapes, f"object{k + 1}") for k, item in enumerate(items)])


def _log_uniform(rng, bounds) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def _resolve_footprints(footprint, count: int, crowded: bool, rng, objects_rng) -> list:
    """One footprint per object: as given (a number for all, or one each), else drawn."""
    bounds = DEFAULT_CROWDED_FOOTPRINT if crowded else DEFAULT_FOOTPRINT
    if footprint is None:
        return [_log_uniform(rng, bounds)] + [_log_uniform(objects_rng, bounds) for _ in range(count - 1)]
    if np.ndim(footprint) == 0:
        footprints = [_check_footprint(footprint)] * count
    else:
        footprints = [_check_footprint(f, f"footprint[{k}]") for k, f in enumerate(footprint)]
        if len(footprints) != count:
            raise InputError(f"footprint: expected one number or {count} (one per object), got {len(footprints)}")
    if count > 1 and sum(footprints) > MAX_TOTAL_FOOTPRINT:
        raise InputError(f"footprint: {count} objects covering {sum(footprints):.2f} of the image in all cannot be "
                         f"kept apart; keep the sum under {MAX_TOTAL_FOOTPRINT} (e.g. footprint="
                         f"{MAX_TOTAL_FOOTPRINT / count / 1.5:.2f})")
    return footprints


def _side_streams(rng):
    """(objects stream, events stream) spawned from the main generator's seed; spawning
    does not advance the main stream."""
    children = rng.bit_generator.seed_seq.spawn(2)
    return np.random.default_rng(children[0]), np.random.default_rng(children[1])


def _check_arguments(width, height, frames, footprint, outside, K):
    """(width, height, frames, outside, K) checked, before any random draw."""
    width, height, frames = _check_sizes(width, height, frames)
    if footprint is not None and np.ndim(footprint) == 0:
        _check_footprint(footprint)
    if not (0.0 <= float(outside) <= 0.9):
        raise InputError(f"outside: expected a fraction of the object's extent in [0, 0.9], got {outside!r}")
    if K is not None:
        from chunkpose.ops.geometry import validate_intrinsics

        K = validate_intrinsics(K)
    return width, height, frames, float(outside), K


def _resolve_arguments(mesh, width, height, frames, footprint, seed, K, outside, objects, events) -> _Plan:
    """Check the arguments and draw what they leave open: the objects, their footprints
    and the intrinsics, in the main stream's order (see the module docstring)."""
    width, height, frames, outside, K = _check_arguments(width, height, frames, footprint, outside, K)
    rng = np.random.default_rng(seed)
    objects_rng, events_rng = _side_streams(rng)
    shapes = builtin_meshes()
    specs = _resolve_objects(mesh, objects, shapes, rng, objects_rng)
    checked = ev.check_events(events, frames, [s.name for s in specs])
    crowded = len(specs) > 1 or any(isinstance(e, ev.Jump) for e, _ in checked)
    footprints = _resolve_footprints(footprint, len(specs), crowded, rng, objects_rng)
    drawn_K = draw_intrinsics(width, height, rng)  # drawn either way: the same seed, the same scene
    return _Plan(width, height, frames, outside, drawn_K if K is None else K, specs, checked, footprints, shapes,
                 rng, objects_rng, events_rng)


# ----------------------------------------------------------------------------- steps


def _place_objects(specs, footprints, K, width, height, frames, outside, rng, objects_rng, make_renderer) -> list:
    """Tracks of every object: the first from the main stream (optionally part outside),
    the others kept apart from those before them."""
    first = specs[0]
    tracks = [place_first_object(first.name, first.mesh, make_renderer(first.mesh), footprints[0], K, width, height,
                                 frames, outside, rng)]
    for spec, footprint in zip(specs[1:], footprints[1:]):
        tracks.append(place_further_object(spec.name, spec.mesh, make_renderer(spec.mesh), footprint, tracks, K,
                                           width, height, frames, objects_rng))
    return tracks


def _apply_events(checked: list, tracks: list, K, width, height, events_rng) -> tuple[list, dict]:
    """Jumps (each object's in frame order), then objects leaving the view; returns (per frame the
    [(object index, occluder texture)] hidden behind a board, what the jumps did)."""
    done = []
    for i, track in enumerate(tracks):
        jumps = [e for e, index in checked if index == i and isinstance(e, ev.Jump)]
        if jumps:
            others = tracks[:i] + tracks[i + 1:]
            redraw = functools.partial(redraw_path, track, others, K, width, height, events_rng)
            done += ev.apply_jumps(track, jumps, others, K, width, height, events_rng, redraw)
    boards = [[] for _ in tracks[0].centers]
    for event, i in checked:
        if not isinstance(event, ev.Occlusion):
            continue
        if event.by == "out_of_view":
            ev.move_out_of_view(tracks[i], event, K, width, height)
            continue
        texture = ev.occluder_texture(events_rng)
        for k in range(event.start, event.stop):
            boards[k].append((i, texture))
    return boards, {"jumps": done}


def _static_layers(plane, distractors: list, K, width, height, make_renderer):
    """(rgb, depth) of the plane and the distractors, rendered once; a generator so that
    only one full-resolution render is alive at a time."""
    statics = [(plane.mesh, np.eye(4))] + distractors
    layers = ((i, make_renderer(m).render_full(p, K, width, height)) for i, (m, p) in enumerate(statics))
    rgb, depth, _ = composite(layers, width, height)
    return rgb, depth


def _render_frames(tracks, poses, boards, static, K, width, height, noise, rng, make_renderer) -> list:
    objects = [(track.renderer, track_poses) for track, track_poses in zip(tracks, poses)]
    return [render_frame(k, objects, boards[k], static, K, width, height, noise, rng, make_renderer)
            for k in range(len(boards))]


def _object_tracks(tracks, poses, specs, rendered, checked) -> list:
    out = []
    for i, (track, spec) in enumerate(zip(tracks, specs)):
        tags = ev.frame_tags(checked, i, len(rendered))
        full = [frame.full_masks[i] for frame in rendered]
        shown = [f.mean() for f, t in zip(full, tags) if ev.OCCLUDED not in t]
        out.append(ObjectTrack(
            name=track.name, mesh=spec.mesh, poses=poses[i], masks=[frame.masks[i] for frame in rendered],
            full_masks=full, events=tags, obj_id=i + 1, footprint=float(np.mean(shown)) if shown else 0.0,
        ))
    return out


def _lay_out(plan: _Plan, distractors: int, make_renderer) -> _Layout:
    """Objects, events, plane, distractors: in this order, because the plane and the
    distractors must clear the objects where the events moved them."""
    K, width, height = plan.K, plan.width, plan.height
    tracks = _place_objects(plan.specs, plan.footprints, K, width, height, plan.frames, plan.outside, plan.rng,
                            plan.objects_rng, make_renderer)
    boards, event_info = _apply_events(plan.checked, tracks, K, width, height, plan.events_rng)
    plane = place_plane(tracks, K, width, height, plan.rng)
    used = {s.builtin for s in plan.specs if s.builtin is not None}
    placed = place_distractors(distractors, plan.shapes, used, tracks, plane, K, width, height, plan.rng)
    return _Layout(tracks, boards, event_info, plane, placed)


def _render_layout(plan: _Plan, layout: _Layout, noise: bool, make_renderer) -> list:
    static = _static_layers(layout.plane, layout.distractors, plan.K, plan.width, plan.height, make_renderer)
    poses = [track.poses for track in layout.tracks]
    return _render_frames(layout.tracks, poses, layout.boards, static, plan.K, plan.width, plan.height, noise,
                          plan.rng, make_renderer)


def _scene_info(plan: _Plan, layout: _Layout, first: ObjectTrack, seed) -> dict:
    return {
        "seed": seed,
        "object": plan.specs[0].builtin or "user mesh",
        "requested_footprint": plan.footprints[0],
        "distractors": len(layout.distractors),
        "plane_point": layout.plane.point.tolist(),
        "plane_normal": layout.plane.normal.tolist(),
        "visible_fraction": first.visible_fraction,
        "object_names": [s.name for s in plan.specs],
        "requested_footprints": plan.footprints,
        "events": [repr(e) for e, _ in plan.checked],
        **layout.event_info,
    }


def _assemble_scene(plan: _Plan, layout: _Layout, rendered: list, seed) -> Scene:
    """The Scene; its single-object fields are the first object's."""
    poses = [track.poses for track in layout.tracks]
    objects_out = _object_tracks(layout.tracks, poses, plan.specs, rendered, plan.checked)
    first = objects_out[0]
    # frames behind a board would pull the achieved footprint towards 0
    achieved = float(np.mean([m.mean() for m, t in zip(first.full_masks, first.events) if ev.OCCLUDED not in t]))
    return Scene(
        rgb=[f.rgb for f in rendered], depth=[f.depth for f in rendered], masks=first.masks, K=plan.K,
        poses=first.poses, mesh=first.mesh, depth_clean=[f.depth_clean for f in rendered],
        full_masks=first.full_masks, footprint=achieved if math.isfinite(achieved) else 0.0,
        info=_scene_info(plan, layout, first, seed), objects=objects_out,
    )


# ----------------------------------------------------------------------------- make_scene


def make_scene(
    mesh=None,
    width: int = 3072,
    height: int = 2048,
    frames: int = 1,
    footprint=None,
    seed: int = 0,
    *,
    distractors: int = 3,
    noise: bool = True,
    device="cpu",
    backend: str | None = "gl",
    K=None,
    outside: float = 0.0,
    objects=None,
    events=(),
) -> Scene:
    """A synthetic RGB-D scene (or sequence) with ground truth.

    Args:
        mesh: the object: a Mesh, trimesh, path or builtin name (None: a builtin chosen by
            seed). Leave it None when passing ``objects``.
        width, height: image size in pixels (at least 16).
        frames: number of frames (> 1: smooth motion, and room for events).
        footprint: fraction of the image each object covers (0.01..0.3 typical); one number
            for all objects or one per object. None: drawn in 0.02..0.15, or in 0.015..0.05
            with several objects or a Jump. Several objects may cover at most 0.3 in all.
        seed: everything random comes from it (the same seed, the same scene).
        distractors: other objects in the scene, never hiding most of an object.
        noise: sensor noise on depth and RGB (False: clean images, depth still 0 where
            there is no surface).
        device, backend: where and with which renderer to draw (the default, OpenGL on the
            CPU, gives the same images on every machine).
        K: (3,3) intrinsics to use (None: drawn from the seed, focal ~0.8 width, centred
            principal point).
        outside: fraction (0..0.9) of the first object's image extent placed past a random
            image edge (a partly cut-off object; 0: fully inside with a margin).
        objects: several objects instead of ``mesh``: a list (or dict name -> mesh) of 1..4
            builtin names, paths, Mesh or trimesh, or (name, mesh) pairs; or a number of
            distinct builtins chosen by seed. They are placed apart (see
            chunkpose.synth.separation) and each moves on its own.
        events: Jump and Occlusion events (chunkpose.synth.events), each naming its object
            by index or name (default the first).
    Returns:
        A Scene: images, K, and per-object ground truth in ``scene.objects`` (the
        single-object fields masks, poses, mesh, full_masks are the first object's).
    """
    from chunkpose.ops.render import make_renderer

    plan = _resolve_arguments(mesh, width, height, frames, footprint, seed, K, outside, objects, events)

    def renderer_of(m):
        return make_renderer(m, device, backend=backend)

    layout = _lay_out(plan, distractors, renderer_of)
    rendered = _render_layout(plan, layout, noise, renderer_of)
    return _assemble_scene(plan, layout, rendered, seed)
