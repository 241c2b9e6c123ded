"""Scenes with several objects on disk, without rendering: write_ycbineoat's per-object
layout (mesh/, masks/<name>/, annotated_poses/<name>/, labels/) and the readers' helpers
scene_meshes, object_names, object_masks, object_poses."""
import json

import cv2
import numpy as np
import pytest
import trimesh

from chunkpose.io.mesh import load_mesh
from chunkpose.io.scene_files import SceneError
from chunkpose.io.readers import YCBInEOATReader, object_masks, object_names, object_poses, scene_meshes
from chunkpose.io.writers import export_scene_mesh, label_image, write_ycbineoat

H, W = 24, 32
K = np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]])


def frames(n=2):
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(n)]
    depth = [np.full((H, W), 0.6, np.float32) for _ in range(n)]
    return rgb, depth


def box_mask(x0, x1, y0=4, y1=12):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def pose(z):
    p = np.eye(4)
    p[:3, 3] = [0.01, -0.02, z]
    return p


@pytest.fixture
def two_objects(tmp_path):
    rgb, depth = frames()
    masks = {"cup": [box_mask(2, 8), box_mask(3, 9)], "can": [box_mask(12, 20), np.zeros((H, W), bool)]}
    poses = {"cup": [pose(0.5), pose(0.51)], "can": [pose(0.6), pose(0.61)]}
    meshes = {"cup": trimesh.creation.cylinder(radius=0.04, height=0.1), "can": trimesh.creation.box((0.05, 0.05, 0.1))}
    root = write_ycbineoat(tmp_path / "scene", rgb, depth, K, masks=masks, poses=poses, meshes=meshes, labels=True)
    return root, masks, poses, meshes


def test_several_objects_round_trip(two_objects):
    root, masks, poses, meshes = two_objects
    assert sorted(p.name for p in root.iterdir()) == [
        "annotated_poses", "cam_K.txt", "depth", "labels", "labels.json", "masks", "mesh", "rgb"]
    assert object_names(root) == ["can", "cup"]  # folders: sorted by name
    for k, name in enumerate(["000000", "000001"]):
        got = object_masks(root, name)
        assert sorted(got) == ["can", "cup"]
        for obj in masks:
            np.testing.assert_array_equal(got[obj], masks[obj][k])
            np.testing.assert_allclose(object_poses(root, name)[obj], poses[obj][k], atol=1e-12)
    found = scene_meshes(root)
    assert sorted(found) == ["can", "cup"]
    for obj, source in meshes.items():
        assert load_mesh(found[obj]).diameter == pytest.approx(load_mesh(source).diameter, rel=1e-6)
    # the existing reader still reads the frames (there is no single-object mask)
    reader = YCBInEOATReader(root)
    assert len(reader) == 2 and reader.frame(1).mask is None


def test_label_images_name_every_object(two_objects):
    root, masks, _, _ = two_objects
    assert json.loads((root / "labels.json").read_text()) == {"cup": 1, "can": 2}
    labels = cv2.imread(str(root / "labels" / "000000.png"), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}
    import shutil

    shutil.rmtree(root / "masks")  # now only the label images tell the objects apart
    assert object_names(root) == ["cup", "can"]  # by label value
    for k, name in enumerate(["000000", "000001"]):
        got = object_masks(root, name)
        for obj in masks:
            np.testing.assert_array_equal(got[obj], masks[obj][k])


def test_label_image_values_and_overlap():
    masks = {"a": [box_mask(0, 4)], "b": [box_mask(10, 14)]}
    labels = label_image(masks, 0, H, W)
    assert labels[5, 1] == 1 and labels[5, 11] == 2 and labels[0, 20] == 0
    with pytest.raises(ValueError, match="masks of 'a' and 'b' overlap in frame 0"):
        label_image({"a": [box_mask(0, 6)], "b": [box_mask(4, 8)]}, 0, H, W)


def test_single_object_layout_is_unchanged_and_gains_mesh(tmp_path):
    rgb, depth = frames()
    root = write_ycbineoat(tmp_path / "one", rgb, depth, K, masks=[box_mask(2, 8)], poses=[pose(0.5), pose(0.5)],
                           meshes={"cup": trimesh.creation.cylinder(radius=0.04, height=0.1)})
    assert sorted(p.name for p in (root / "masks").iterdir()) == ["000000.png"]
    assert sorted(p.name for p in (root / "annotated_poses").iterdir()) == ["000000.txt", "000001.txt"]
    assert list(scene_meshes(root)) == ["cup"]
    assert object_names(root) == [] and object_masks(root, "000000") == {} and object_poses(root, "000000") == {}
    np.testing.assert_array_equal(YCBInEOATReader(root).frame(0, need_mask=True).mask, box_mask(2, 8))


def test_textured_mesh_is_saved_with_its_material(tmp_path):
    from PIL import Image

    box = trimesh.creation.box((0.1, 0.06, 0.04))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    box.visual = trimesh.visual.TextureVisuals(uv=rng.uniform(size=(len(box.vertices), 2)), image=image)
    mesh = load_mesh(box)
    path = export_scene_mesh(mesh, tmp_path, "box")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box.mtl", "box.obj", "box.png"]
    loaded = load_mesh(path)
    assert loaded.has_texture and loaded.diameter == pytest.approx(mesh.diameter, rel=1e-6)
    assert mesh.trimesh.visual.material.name != "box"  # the caller's mesh is left alone


def test_vertex_colours_survive_the_obj(tmp_path):
    from chunkpose.shapes import builtin_meshes

    mesh = load_mesh(builtin_meshes()["duck"])
    loaded = load_mesh(export_scene_mesh(mesh, tmp_path, "duck"))
    np.testing.assert_allclose(loaded.vertex_colors, mesh.vertex_colors, atol=1 / 255)
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(masks={"../up": [box_mask(0, 4)]}), "cannot be a folder name"),
    (dict(masks={"a": [box_mask(0, 4)] * 3}), r"masks\['a'\]: expected 2 frames \(or only the first\), got 3"),
    (dict(masks={"a": [np.zeros((5, 5), bool)]}), r"masks\['a'\]\[0\]: expected shape \(24, 32\)"),
    (dict(poses={"a": [pose(0.5)]}), r"poses\['a'\]: expected 2 frames, got 1"),
    (dict(masks={"a": [box_mask(0, 6)] * 2, "b": [box_mask(4, 8)] * 2}, labels=True), "overlap in frame 0"),
    (dict(masks=[box_mask(0, 4)], labels=True), "labels: needs masks per object"),
    (dict(meshes={"a b": trimesh.creation.box()}), "meshes: object name 'a b'"),
])
def test_writer_refuses_bad_input_and_leaves_nothing(tmp_path, kwargs, match):
    rgb, depth = frames()
    with pytest.raises(ValueError, match=match):
        write_ycbineoat(tmp_path / "out", rgb, depth, K, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_readers_without_objects_and_with_clashing_meshes(tmp_path):
    assert scene_meshes(tmp_path) == {} and object_names(tmp_path) == [] and object_masks(tmp_path, "000000") == {}
    (tmp_path / "mesh").mkdir()
    trimesh.creation.box((0.1, 0.1, 0.1)).export(tmp_path / "mesh" / "a.obj")
    (tmp_path / "mesh" / "a.mtl").write_text("")  # materials are not meshes
    assert list(scene_meshes(tmp_path)) == ["a"]
    trimesh.creation.box((0.1, 0.1, 0.1)).export(tmp_path / "mesh" / "a.ply")
    with pytest.raises(SceneError, match="two meshes named 'a'"):
        scene_meshes(tmp_path)


def test_bad_label_files_are_explained(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels.json").write_text(json.dumps({"a": "one"}))
    with pytest.raises(SceneError, match="map object names to label values"):
        object_names(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"a": 1}))
    cv2.imwrite(str(tmp_path / "labels" / "000000.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(SceneError, match="single-channel"):
        object_masks(tmp_path, "000000")
