"""Mesh loading: formats, colours, units, diameter, centring, bad input."""
import numpy as np
import pytest
import trimesh
from PIL import Image
from scipy.spatial.distance import pdist

from chunkpose.io.mesh import Mesh, load_mesh, mesh_diameter
from chunkpose.shapes import builtin_meshes


@pytest.fixture(scope="module")
def drill():
    return builtin_meshes()["drill"]


@pytest.mark.parametrize("ext", ["obj", "ply", "stl", "glb"])
def test_formats_load_with_geometry_and_colours(tmp_path, drill, ext):
    path = tmp_path / f"drill.{ext}"
    drill.export(path)
    mesh = load_mesh(path)
    assert isinstance(mesh, Mesh)
    assert mesh.vertices.dtype == np.float32 and mesh.faces.dtype == np.int64
    assert mesh.vertex_colors.shape == mesh.vertices.shape and mesh.normals.shape == mesh.vertices.shape
    assert mesh.diameter == pytest.approx(mesh_diameter(drill.vertices), rel=1e-5)
    assert np.allclose(mesh.center, (drill.bounds[0] + drill.bounds[1]) / 2, atol=1e-6)
    spread = mesh.vertex_colors.std(axis=0).max()
    if ext == "stl":  # no colours in STL: uniform grey
        assert np.allclose(mesh.vertex_colors, 102 / 255)  # trimesh's default colour, as upstream
    else:
        assert spread > 0.1  # the drill's colours survived


def test_millimetre_mesh_is_refused_with_the_fix(drill):
    mm = drill.copy()
    mm.apply_scale(1000.0)
    with pytest.raises(ValueError, match=r"millimetres.*scale=0\.001.*--mesh-scale 0\.001"):
        load_mesh(mm)
    fixed = load_mesh(mm, scale=0.001)
    assert fixed.diameter == pytest.approx(mesh_diameter(drill.vertices), rel=1e-5)


def test_diameter_is_the_largest_pairwise_distance():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(400, 3)) * [0.1, 0.05, 0.02]
    hull = trimesh.convex.convex_hull(points)
    assert mesh_diameter(points) == pytest.approx(pdist(points).max(), rel=1e-12)
    assert load_mesh(hull).diameter == pytest.approx(pdist(hull.vertices).max(), rel=1e-6)
    # flat meshes (no 3D hull) still work
    quad = np.array([[0, 0, 0], [0.1, 0, 0], [0.1, 0.2, 0], [0, 0.2, 0]], float)
    assert mesh_diameter(quad) == pytest.approx(np.hypot(0.1, 0.2))


def test_centered_moves_bbox_centre_to_origin(drill):
    shifted = drill.copy()
    shifted.apply_translation([0.3, -0.2, 0.1])
    mesh = load_mesh(shifted)
    centred = mesh.centered()
    assert np.allclose(mesh.center, [0.3, -0.2, 0.1], atol=1e-6)
    lo, hi = centred.vertices.min(0), centred.vertices.max(0)
    assert np.allclose((lo + hi) / 2, 0, atol=1e-6) and np.allclose(centred.center, 0)
    assert np.allclose(centred.vertices, mesh.vertices - mesh.center, atol=1e-6)
    assert centred.diameter == mesh.diameter
    assert np.allclose(centred.trimesh.vertices, centred.vertices, atol=1e-6)


def test_texture_is_kept_and_sampled_to_vertex_colours(tmp_path):
    tex = np.zeros((32, 32, 3), np.uint8)
    tex[:16, :, 0] = 255  # top half red (v = 1)
    tex[16:, :, 2] = 255  # bottom half blue (v = 0)
    vertices = np.array([[0, 0, 0], [0.1, 0, 0], [0.1, 0.1, 0], [0, 0.1, 0]], float)
    uv = np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1, 0.9]])
    visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(tex))
    quad = trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], visual=visual, process=False)
    path = tmp_path / "quad.obj"
    quad.export(path)
    mesh = load_mesh(path)
    assert mesh.has_texture and mesh.texture.shape == (32, 32, 3) and mesh.uv.shape == (len(mesh.vertices), 2)
    top = mesh.uv[:, 1] > 0.5
    assert np.allclose(mesh.vertex_colors[top], [1, 0, 0], atol=0.02)
    assert np.allclose(mesh.vertex_colors[~top], [0, 0, 1], atol=0.02)


def test_face_colours_are_averaged_to_vertices():
    box = trimesh.creation.box((0.1, 0.1, 0.1))
    box.visual.face_colors = [255, 0, 0, 255]
    mesh = load_mesh(box)
    assert np.allclose(mesh.vertex_colors, [1, 0, 0])


def test_scene_parts_are_concatenated_in_scene_coordinates():
    scene = trimesh.Scene()
    a = trimesh.creation.box((0.1, 0.1, 0.1))
    a.visual.face_colors = [0, 255, 0, 255]
    scene.add_geometry(a, transform=trimesh.transformations.translation_matrix([0.2, 0, 0]))
    scene.add_geometry(trimesh.creation.icosphere(radius=0.05))
    mesh = load_mesh(scene)
    assert len(mesh.vertices) == 8 + len(trimesh.creation.icosphere().vertices)
    assert mesh.vertices[:, 0].max() == pytest.approx(0.25)
    assert np.isclose(mesh.vertex_colors, [0, 1, 0]).all(axis=1).sum() == 8


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_mesh(tmp_path / "missing.obj")
    with pytest.raises(ValueError, match="expected a file path or a trimesh"):
        load_mesh(42)
    with pytest.raises(ValueError, match="scale"):
        load_mesh(trimesh.creation.box(), scale=-1)
    bad = trimesh.creation.box()
    bad.vertices[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        load_mesh(bad)
    (tmp_path / "junk.ply").write_text("not a mesh")
    with pytest.raises(ValueError, match="junk.ply"):
        load_mesh(tmp_path / "junk.ply")


def test_builtin_meshes_are_metric_asymmetric_and_coloured():
    meshes = builtin_meshes()
    assert len(meshes) >= 3
    for name, tm in meshes.items():
        mesh = load_mesh(tm)
        assert 0.05 <= mesh.diameter <= 0.3, name
        assert mesh.vertex_colors.std(axis=0).max() > 0.05, name
        # no proper rotational symmetry: principal moments are distinct
        moments = np.linalg.eigvalsh(np.cov(mesh.vertices.T))
        assert np.min(np.diff(moments)) / moments.max() > 0.01, name
        assert len(mesh.faces) < 20000, name
