"""Object meshes in metres, with colours, ready for the renderers.

``load_mesh`` accepts a path (OBJ, PLY, STL, GLB, anything trimesh reads) or a
``trimesh.Trimesh`` / ``trimesh.Scene`` and returns a :class:`Mesh`: float32 vertices,
int64 faces, per-vertex colours (sampled from the texture when there is one, so every
backend can shade without a texture), the texture and UVs kept for backends that sample
them, vertex normals, the bounding-box centre and the diameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import trimesh

from chunkpose.errors import InputError

# A mesh wider than this is almost surely in millimetres (objects are hand-held).
MAX_DIAMETER_M = 3.0
#: Albedo of a mesh without texture or colours: trimesh's default vertex colour 102/255,
#: which is what FoundationPose's renders of such meshes start from.
DEFAULT_GREY = (102 / 255, 102 / 255, 102 / 255)


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh in metres.

    Attributes:
        vertices: (V,3) float32 positions in metres.
        faces: (F,3) int64 vertex indices.
        vertex_colors: (V,3) float32 albedo in 0..1.
        normals: (V,3) float32 unit vertex normals.
        diameter: largest distance between two vertices, metres.
        center: (3,) float64 bounding-box centre, metres.
        uv: (V,2) float32 texture coordinates, or None.
        texture: (Ht,Wt,3) uint8 image, or None (row 0 is the top of the image; uv v=0 is its
            bottom row, the OBJ convention).
        trimesh: the source mesh (in the same frame as ``vertices``), or None.
    """

    vertices: np.ndarray
    faces: np.ndarray
    vertex_colors: np.ndarray
    normals: np.ndarray
    diameter: float
    center: np.ndarray
    uv: np.ndarray | None = None
    texture: np.ndarray | None = None
    trimesh: trimesh.Trimesh | None = field(default=None, repr=False, compare=False)

    @property
    def radius(self) -> float:
        """Radius of the bounding sphere about ``center`` (half the bbox diagonal)."""
        extent = self.vertices.max(axis=0) - self.vertices.min(axis=0)
        return float(np.linalg.norm(extent) / 2.0)

    @property
    def has_texture(self) -> bool:
        return self.uv is not None and self.texture is not None

    def centered(self) -> "Mesh":
        """The same mesh with its bounding-box centre moved to the origin.

        A pose of the centred mesh ``P_c`` equals ``P @ translate(center)`` of the original.

        Returns:
            Mesh with vertices (V,3) float32 shifted by -center, center zeros(3), and a shifted copy
            of the source trimesh.
        """
        offset = self.center.astype(np.float32)
        source = None
        if self.trimesh is not None:
            source = self.trimesh.copy()
            source.apply_translation(-self.center)
        return replace(
            self,
            vertices=(self.vertices - offset).astype(np.float32),
            center=np.zeros(3),
            trimesh=source,
        )

    def __repr__(self) -> str:
        return (
            f"Mesh(vertices={len(self.vertices)}, faces={len(self.faces)}, "
            f"diameter={self.diameter:.4f} m, textured={self.has_texture})"
        )


def mesh_diameter(vertices: np.ndarray) -> float:
    """Largest distance between two points of ``vertices (V,3)``.

    The farthest pair always lies on the convex hull, so only hull vertices are compared, in
    blocks so that memory stays small for large hulls.

    Args:
        vertices: (V,3) array-like of points (metres for a chunkpose mesh).

    Returns:
        float distance in the vertices' units; 0.0 for fewer than two points.
    """
    points = np.asarray(vertices, dtype=np.float64)
    if len(points) < 2:
        return 0.0
    try:
        from scipy.spatial import ConvexHull

        points = points[ConvexHull(points).vertices]
    except Exception:  # flat or degenerate point sets: compare all points
        points = np.unique(points, axis=0)
    best = 0.0
    block = max(1, 4_000_000 // max(len(points), 1))
    for start in range(0, len(points), block):
        chunk = points[start : start + block]
        d2 = ((chunk[:, None, :] - points[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return float(np.sqrt(best))


def _as_trimesh(source) -> trimesh.Trimesh:
    if isinstance(source, trimesh.Trimesh):
        return source.copy()
    if isinstance(source, trimesh.Scene):
        return _scene_to_mesh(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"mesh: file {str(path)!r} does not exist")
        try:
            loaded = trimesh.load(str(path), process=False)
        except Exception as error:  # trimesh raises many types for unreadable files
            raise InputError(
                f"mesh: could not read {str(path)!r} ({error}); expected OBJ, PLY, STL or GLB"
            ) from error
        if isinstance(loaded, trimesh.Scene):
            return _scene_to_mesh(loaded)
        if not isinstance(loaded, trimesh.Trimesh):
            raise InputError(f"mesh: {str(path)!r} holds no triangles (got {type(loaded).__name__})")
        return loaded
    raise InputError(
        f"mesh: expected a file path or a trimesh.Trimesh, got {type(source).__name__}"
    )


def _scene_to_mesh(scene: trimesh.Scene) -> trimesh.Trimesh:
    """Concatenate every triangle geometry of a scene, in scene coordinates.

    Textures of different parts cannot share one image, so parts are baked to vertex
    colours first when there is more than one.
    """
    meshes = []
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geometry = scene.geometry[name]
        if not isinstance(geometry, trimesh.Trimesh) or len(geometry.faces) == 0:
            continue
        part = geometry.copy()
        part.apply_transform(transform)
        meshes.append(part)
    if not meshes:
        raise InputError("mesh: the scene holds no triangle meshes")
    if len(meshes) == 1:
        return meshes[0]
    for part in meshes:
        part.visual = _vertex_color_visual(part)
    return trimesh.util.concatenate(meshes)


def _vertex_color_visual(mesh: trimesh.Trimesh):
    colors = _vertex_colors(mesh)
    return trimesh.visual.ColorVisuals(mesh, vertex_colors=(colors * 255).round().astype(np.uint8))


def _texture_of(mesh: trimesh.Trimesh):
    """(uv (V,2) float32, texture (H,W,3) uint8) or (None, None)."""
    visual = mesh.visual
    if not isinstance(visual, trimesh.visual.TextureVisuals):
        return None, None
    uv = getattr(visual, "uv", None)
    material = visual.material
    image = getattr(material, "image", None)
    if image is None and hasattr(material, "baseColorTexture"):
        image = material.baseColorTexture
    if uv is None or image is None or len(uv) != len(mesh.vertices):
        return None, None
    texture = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.asarray(uv, dtype=np.float32), texture


def _vertex_colors(mesh: trimesh.Trimesh) -> np.ndarray:
    """(V,3) float32 colours in 0..1: texture sampled at the UVs, vertex colours, face
    colours averaged, material colour, or uniform grey, whichever is there first."""
    n = len(mesh.vertices)
    visual = mesh.visual
    try:
        if isinstance(visual, trimesh.visual.TextureVisuals):
            if getattr(visual, "uv", None) is not None and len(visual.uv) == n:
                colors = np.asarray(visual.to_color().vertex_colors)[:, :3]
                return colors.astype(np.float32) / 255.0
            main = getattr(visual.material, "main_color", None)
            if main is not None:
                return np.tile(np.asarray(main[:3], np.float32) / 255.0, (n, 1))
        elif isinstance(visual, trimesh.visual.ColorVisuals):
            kind = visual.kind
            if kind == "vertex":
                return np.asarray(visual.vertex_colors)[:, :3].astype(np.float32) / 255.0
            if kind == "face":
                face_colors = np.asarray(visual.face_colors)[:, :3].astype(np.float32)
                sums = np.zeros((n, 3), np.float64)
                counts = np.zeros(n, np.float64)
                for corner in range(3):
                    np.add.at(sums, mesh.faces[:, corner], face_colors)
                    np.add.at(counts, mesh.faces[:, corner], 1.0)
                return (sums / np.maximum(counts, 1)[:, None] / 255.0).astype(np.float32)
    except Exception:  # a broken material should not stop loading the geometry
        pass
    return np.tile(np.asarray(DEFAULT_GREY, np.float32), (n, 1))


def load_mesh(path_or_trimesh, scale: float | None = None) -> Mesh:
    """Load a mesh in metres.

    Args:
        path_or_trimesh: a path (OBJ/PLY/STL/GLB/...), a ``trimesh.Trimesh`` or ``trimesh.Scene``
            (scenes are concatenated), or an existing :class:`Mesh` (returned as is unless scaled).
        scale: multiply vertex coordinates by this (0.001 for a mesh in millimetres); None = 1.

    Returns:
        Mesh in metres.

    Raises:
        InputError: an unreadable or missing file, a non-positive scale, an empty mesh,
            non-finite vertices, coinciding vertices, or a diameter over 3 m (almost surely
            millimetres).
    """
    if isinstance(path_or_trimesh, Mesh):
        if scale is None:
            return path_or_trimesh
        path_or_trimesh = path_or_trimesh.trimesh
    if scale is not None and not (np.isfinite(scale) and scale > 0):
        raise InputError(f"scale: expected a positive number (0.001 for millimetres), got {scale!r}")
    source = _as_trimesh(path_or_trimesh)
    if len(source.faces) == 0 or len(source.vertices) < 3:
        raise InputError("mesh: it has no triangles")
    if scale is not None:
        source.apply_scale(float(scale))
    vertices = np.asarray(source.vertices, dtype=np.float64)
    if not np.isfinite(vertices).all():
        raise InputError("mesh: vertices contain NaN or infinity")
    diameter = mesh_diameter(vertices)
    if diameter > MAX_DIAMETER_M:
        raise InputError(
            f"mesh: diameter is {diameter:.1f} (expected metres, under {MAX_DIAMETER_M:g} m); "
            "it looks like the mesh is in millimetres: pass scale=0.001 "
            "(command line: --mesh-scale 0.001)"
        )
    if diameter <= 0:
        raise InputError("mesh: all vertices coincide (diameter 0)")
    return mesh_from_trimesh(source, diameter)


def mesh_from_trimesh(source: trimesh.Trimesh, diameter: float | None = None) -> Mesh:
    """A :class:`Mesh` of a trimesh as it is, without load_mesh's checks of units and size (for
    scene geometry such as a background plane, which may be metres wide).

    Args:
        source: the ``trimesh.Trimesh`` (kept as the Mesh's ``trimesh``, not copied).
        diameter: pass it when already computed; None computes it (mesh_diameter).

    Returns:
        Mesh.
    """
    vertices = np.asarray(source.vertices, dtype=np.float64)
    if diameter is None:
        diameter = mesh_diameter(vertices)
    uv, texture = _texture_of(source)
    colors = _vertex_colors(source)
    normals = np.asarray(source.vertex_normals, dtype=np.float32)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    return Mesh(
        vertices=vertices.astype(np.float32),
        faces=np.asarray(source.faces, dtype=np.int64),
        vertex_colors=np.clip(colors, 0.0, 1.0).astype(np.float32),
        normals=normals,
        diameter=diameter,
        center=(lo + hi) / 2.0,
        uv=uv,
        texture=texture,
        trimesh=source,
    )
