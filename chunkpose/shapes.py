"""Procedural test objects: asymmetric, coloured, in metres, built without downloads.

Each object is a union of simple parts (boxes, cylinders, spheres, tori), subdivided so
that per-vertex colour patterns read as texture, coloured per part with stripes, checks
and a "label" patch that breaks every rotational symmetry.
"""
from __future__ import annotations

import functools

import numpy as np
import trimesh

# Longest edge after subdivision: fine enough for colour patterns, few enough faces
# (a few thousand per object) for fast CPU rendering.
MAX_EDGE_M = 0.008


def _part(mesh: trimesh.Trimesh, color, pattern: str, frequency: float, transform=None) -> trimesh.Trimesh:
    mesh = mesh.copy()
    if transform is not None:
        mesh.apply_transform(transform)
    vertices, faces = trimesh.remesh.subdivide_to_size(mesh.vertices, mesh.faces, max_edge=MAX_EDGE_M, max_iter=12)
    part = trimesh.Trimesh(vertices, faces, process=False)
    part.merge_vertices()
    colors = _pattern(np.asarray(part.vertices), np.asarray(color, np.float64), pattern, frequency)
    part.visual = trimesh.visual.ColorVisuals(part, vertex_colors=_to_rgba(colors))
    return part


def _pattern(points: np.ndarray, base: np.ndarray, pattern: str, frequency: float) -> np.ndarray:
    x, y, z = points.T * frequency
    if pattern == "stripes":
        shade = 0.75 + 0.25 * np.sign(np.sin(2 * np.pi * (z + 0.3 * x)))
    elif pattern == "checks":
        shade = 0.7 + 0.3 * ((np.floor(x) + np.floor(y) + np.floor(z)) % 2)
    elif pattern == "waves":
        shade = 0.8 + 0.2 * np.sin(2 * np.pi * x) * np.cos(2 * np.pi * (y + z))
    else:
        shade = np.ones(len(points))
    return np.clip(base[None] * shade[:, None], 0.0, 1.0)


def _to_rgba(colors: np.ndarray) -> np.ndarray:
    rgba = np.ones((len(colors), 4))
    rgba[:, :3] = colors
    return (rgba * 255).round().astype(np.uint8)


def _label(part: trimesh.Trimesh, center, radius: float, color) -> None:
    """Paint the vertices within ``radius`` of ``center`` (a patch no symmetry maps to itself)."""
    near = np.linalg.norm(part.vertices - np.asarray(center), axis=1) < radius
    rgba = np.asarray(part.visual.vertex_colors).copy()
    rgba[near, :3] = (np.asarray(color) * 255).round().astype(np.uint8)
    part.visual = trimesh.visual.ColorVisuals(part, vertex_colors=rgba)


def _translate(x=0.0, y=0.0, z=0.0):
    return trimesh.transformations.translation_matrix([x, y, z])


def _rotate(angle, axis, point=None):
    return trimesh.transformations.rotation_matrix(angle, axis, point)


def _combine(parts) -> trimesh.Trimesh:
    mesh = trimesh.util.concatenate(parts)
    # centre on the bounding box so poses are easy to reason about
    mesh.apply_translation(-(mesh.bounds[0] + mesh.bounds[1]) / 2.0)
    return mesh


def mug() -> trimesh.Trimesh:
    """A mug (8 cm wide, 9.5 cm tall) with a handle and a label on one side."""
    body = _part(trimesh.creation.cylinder(radius=0.04, height=0.095, sections=48), (0.85, 0.25, 0.2), "stripes", 30.0)
    _label(body, (0.0, -0.04, 0.01), 0.022, (0.95, 0.9, 0.3))
    handle = _part(
        trimesh.creation.torus(major_radius=0.026, minor_radius=0.007, major_sections=32, minor_sections=12),
        (0.2, 0.3, 0.8), "none", 1.0,
        transform=_translate(0.043) @ _rotate(np.pi / 2, [1, 0, 0]),
    )
    return _combine([body, handle])


def drill() -> trimesh.Trimesh:
    """A power-drill-like tool: body, chuck, slanted grip and battery (about 22 cm)."""
    body = _part(trimesh.creation.box((0.16, 0.06, 0.07)), (0.95, 0.6, 0.1), "checks", 40.0)
    chuck = _part(
        trimesh.creation.cylinder(radius=0.018, height=0.05, sections=32), (0.15, 0.15, 0.15), "stripes", 60.0,
        transform=_translate(0.105) @ _rotate(np.pi / 2, [0, 1, 0]),
    )
    grip = _part(
        trimesh.creation.box((0.04, 0.05, 0.11)), (0.1, 0.1, 0.12), "waves", 25.0,
        transform=_translate(-0.03, 0.0, -0.08) @ _rotate(0.25, [0, 1, 0]),
    )
    battery = _part(trimesh.creation.box((0.08, 0.07, 0.03)), (0.2, 0.6, 0.3), "none", 1.0, transform=_translate(-0.05, 0.0, -0.145))
    _label(body, (0.03, -0.03, 0.01), 0.018, (0.9, 0.9, 0.9))
    return _combine([body, chuck, grip, battery])


def blocks() -> trimesh.Trimesh:
    """An L of two boxes with a peg and a ball (about 14 cm)."""
    base = _part(trimesh.creation.box((0.12, 0.05, 0.03)), (0.2, 0.55, 0.85), "checks", 50.0)
    upright = _part(trimesh.creation.box((0.03, 0.05, 0.08)), (0.85, 0.85, 0.2), "stripes", 45.0, transform=_translate(-0.045, 0, 0.055))
    peg = _part(trimesh.creation.cylinder(radius=0.01, height=0.04, sections=24), (0.8, 0.2, 0.6), "none", 1.0, transform=_translate(0.035, 0.0, 0.035))
    ball = _part(trimesh.creation.icosphere(subdivisions=2, radius=0.014), (0.3, 0.8, 0.3), "waves", 60.0, transform=_translate(0.04, 0.015, -0.025))
    return _combine([base, upright, peg, ball])


def duck() -> trimesh.Trimesh:
    """A toy duck: ellipsoid body, head, beak and a tail fin (about 12 cm)."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    body = _part(sphere, (0.95, 0.8, 0.15), "waves", 20.0, transform=np.diag([0.055, 0.04, 0.035, 1.0]))
    head = _part(trimesh.creation.icosphere(subdivisions=3, radius=0.025), (0.95, 0.85, 0.2), "none", 1.0, transform=_translate(0.035, 0.0, 0.045))
    beak = _part(
        trimesh.creation.cone(radius=0.01, height=0.025, sections=20), (0.95, 0.4, 0.05), "none", 1.0,
        transform=_translate(0.057, 0.0, 0.045) @ _rotate(np.pi / 2, [0, 1, 0]),
    )
    tail = _part(trimesh.creation.box((0.03, 0.008, 0.03)), (0.7, 0.5, 0.1), "stripes", 80.0, transform=_translate(-0.055, 0.0, 0.02) @ _rotate(0.5, [0, 1, 0]))
    _label(head, (0.045, -0.016, 0.05), 0.006, (0.05, 0.05, 0.05))
    return _combine([body, head, beak, tail])


BUILDERS = {"mug": mug, "drill": drill, "blocks": blocks, "duck": duck}


@functools.lru_cache(maxsize=1)
def _built() -> dict[str, trimesh.Trimesh]:
    return {name: build() for name, build in BUILDERS.items()}


def builtin_meshes() -> dict[str, trimesh.Trimesh]:
    """name -> trimesh.Trimesh with vertex colours, metres, centred on its bounding box
    (fresh copies; built once per process)."""
    return {name: mesh.copy() for name, mesh in _built().items()}


def _clutter() -> dict[str, trimesh.Trimesh]:
    """Plain shapes unlike every builtin object (one part, one colour pattern each)."""
    return {
        "carton": _combine([_part(trimesh.creation.box((0.09, 0.06, 0.12)), (0.55, 0.45, 0.35), "checks", 35.0)]),
        "can": _combine([_part(trimesh.creation.cylinder(radius=0.033, height=0.11, sections=40), (0.4, 0.45, 0.5),
                               "stripes", 40.0)]),
        "ball": _combine([_part(trimesh.creation.icosphere(subdivisions=3, radius=0.045), (0.6, 0.2, 0.7), "waves",
                                30.0)]),
    }


@functools.lru_cache(maxsize=1)
def _built_clutter() -> dict[str, trimesh.Trimesh]:
    return _clutter()


def clutter_meshes() -> dict[str, trimesh.Trimesh]:
    """name -> plain distractor shapes (a carton, a can, a ball), like builtin_meshes: for
    scenes whose objects already use every builtin (fresh copies; built once per process)."""
    return {name: mesh.copy() for name, mesh in _built_clutter().items()}
