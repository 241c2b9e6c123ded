"""Synthetic sequences with events (jumps, occlusions) and scenes with several objects:
where the events are, the placement rule, saving with meshes and reading back."""
import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from chunkpose.io.mesh import load_mesh
from chunkpose.io.bop_reader import BOPReader
from chunkpose.io.readers import YCBInEOATReader, object_masks, object_names, object_poses, scene_meshes
from chunkpose.ops.render import make_renderer
from chunkpose.synth import JUMP, OCCLUDED, REAPPEARED, Jump, Occlusion, make_scene

pytestmark = pytest.mark.gl
W, H = 160, 120
SMALL = dict(width=W, height=H, distractors=1)


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def centre(scene_or_track, k):
    pose = scene_or_track.poses[k]
    return pose[:3, :3] @ scene_or_track.mesh.center + pose[:3, 3]


def turn_deg(a, b):
    return np.degrees(Rotation.from_matrix(a[:3, :3].T @ b[:3, :3]).magnitude())


def touches_border(mask):
    return mask[[0, -1], :].any() or mask[:, [0, -1]].any()


@pytest.fixture(scope="module")
def jump_scene():
    return make_scene(frames=6, footprint=0.05, seed=4, events=[Jump(frame=3)], **SMALL)


@pytest.fixture(scope="module")
def occluded_scene():
    return make_scene(frames=7, footprint=0.05, seed=5, events=[Occlusion(start=2, frames=3)], **SMALL)


@pytest.fixture(scope="module")
def multi_scene():
    return make_scene(objects=["mug", "drill", "duck"], frames=3, seed=1,
                      events=[Occlusion(start=1, frames=1, obj="duck")], **SMALL)


# ----------------------------------------------------------------------------- events


def test_jump_is_where_and_as_large_as_asked(jump_scene):
    scene = jump_scene
    d = scene.mesh.diameter
    assert scene.event_frames(JUMP) == [3] and scene.events[3] == (JUMP,)
    assert all(tags == () for k, tags in enumerate(scene.events) if k != 3)
    for k in range(1, scene.frames):
        move = np.linalg.norm(centre(scene, k) - centre(scene, k - 1))
        angle = turn_deg(scene.poses[k - 1], scene.poses[k])
        if k == 3:  # 1.2 diameters and 90 degrees, plus one frame of the smooth motion
            assert move == pytest.approx(1.2 * d, abs=0.2 * d)
            assert angle == pytest.approx(90.0, abs=5.0)
        else:
            assert move < 0.25 * d and angle < 5.0
    for mask in scene.masks:  # the object stays wholly in view
        assert mask.sum() > 100 and not touches_border(mask)


def test_occlusion_hides_the_object_completely_then_it_reappears(occluded_scene):
    scene = occluded_scene
    assert scene.event_frames(OCCLUDED) == [2, 3, 4] and scene.event_frames(REAPPEARED) == [5]
    for k in range(scene.frames):
        full = scene.full_masks[k]
        assert full.sum() > 100  # an occluder: the object is still there behind it
        if k in (2, 3, 4):
            assert not scene.masks[k].any()
            # what the camera sees there is nearer than any point of the object
            z_front = centre(scene, k)[2] - scene.mesh.radius
            assert (scene.depth_clean[k][full] < z_front).all()
        else:
            assert scene.masks[k].sum() > 0.6 * full.sum()
    assert scene.info["visible_fraction"][2] == 0.0


def test_out_of_view_occlusion_and_poses():
    scene = make_scene(frames=5, footprint=0.05, seed=6, events=[Occlusion(start=1, frames=2, by="out_of_view")],
                       **SMALL)
    assert scene.event_frames(OCCLUDED) == [1, 2] and scene.event_frames(REAPPEARED) == [3]
    for k in (1, 2):
        assert not scene.masks[k].any() and not scene.full_masks[k].any()
        u, v = (scene.K @ centre(scene, k))[:2] / centre(scene, k)[2]
        assert not (0 <= u < W and 0 <= v < H)
    for k in (0, 3, 4):
        assert scene.masks[k].sum() > 100
    # back on its smooth path: frame 3 continues from frame 0's motion
    assert np.linalg.norm(centre(scene, 3) - centre(scene, 0)) < 0.5 * scene.mesh.diameter


def test_an_occlusion_does_not_move_the_objects():
    plain = make_scene(frames=4, footprint=0.05, seed=8, **SMALL)
    hidden = make_scene(frames=4, footprint=0.05, seed=8, events=[Occlusion(start=1, frames=2)], **SMALL)
    for a, b in zip(plain.poses, hidden.poses):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- several objects


def test_several_objects_keep_the_visibility_rule(multi_scene):
    scene = multi_scene
    assert scene.names == ["mug", "drill", "duck"] and [t.obj_id for t in scene.objects] == [1, 2, 3]
    assert scene.mesh is scene.objects[0].mesh and scene.masks is scene.objects[0].masks
    assert scene.poses is scene.objects[0].poses and scene.full_masks is scene.objects[0].full_masks
    for k in range(scene.frames):
        union = np.zeros((H, W), int)
        for track in scene.objects:
            visible, full = track.masks[k], track.full_masks[k]
            assert not (visible & ~full).any()
            union += visible
            if OCCLUDED in track.events[k]:
                assert not visible.any()
                continue
            assert visible.sum() >= 0.6 * full.sum()
            # the objects among themselves hide at most a sliver of each other
            others = np.any([o.masks[k] for o in scene.objects if o is not track], axis=0)
            assert (full & others).sum() <= 0.15 * full.sum()
        assert union.max() <= 1  # visible masks never overlap
        labels = scene.label_image(k)
        for track in scene.objects:
            np.testing.assert_array_equal(labels == track.obj_id, track.masks[k])
    assert scene.object("duck").event_frames(OCCLUDED) == [1]
    assert scene.object("mug").events == [(), (), ()]


def test_each_objects_pose_rerenders_to_its_silhouette(multi_scene):
    for track in multi_scene.objects:
        renderer = make_renderer(track.mesh, backend="gl")
        for pose, full in zip(track.poses, track.full_masks):
            rendered = renderer.render_full(pose, multi_scene.K, W, H)["mask"][0].numpy()
            assert iou(rendered, full) > 0.98


def test_a_number_of_objects_and_every_builtin():
    scene = make_scene(objects=4, frames=1, seed=2, **SMALL)
    assert sorted(scene.names) == ["blocks", "drill", "duck", "mug"]
    assert scene.info["distractors"] == 1  # plain clutter: no builtin is left
    for track in scene.objects:
        assert track.masks[0].sum() >= 0.6 * track.full_masks[0].sum() > 0


def test_deterministic_per_seed():
    kwargs = dict(objects=["duck", "blocks"], frames=3, seed=3, events=[Jump(frame=1, obj="blocks")], **SMALL)
    a, b = make_scene(**kwargs), make_scene(**kwargs)
    c = make_scene(**{**kwargs, "seed": 4})
    for x, y in zip(a.objects, b.objects):
        assert all(np.array_equal(p, q) for p, q in zip(x.poses, y.poses))
        assert all(np.array_equal(p, q) for p, q in zip(x.masks, y.masks))
    assert all(np.array_equal(p, q) for p, q in zip(a.rgb, b.rgb))
    assert not np.array_equal(a.objects[1].poses[0], c.objects[1].poses[0])


# ----------------------------------------------------------------------------- saving


def test_save_several_objects_and_read_back(multi_scene, tmp_path):
    scene = multi_scene
    root = scene.save(tmp_path / "scene")
    meshes = scene_meshes(root)
    assert sorted(meshes) == sorted(scene.names)
    for track in scene.objects:
        loaded = load_mesh(meshes[track.name])
        assert loaded.diameter == pytest.approx(track.mesh.diameter, rel=1e-6)
        np.testing.assert_allclose(loaded.vertex_colors, track.mesh.vertex_colors, atol=1 / 255)
    assert object_names(root) == sorted(scene.names)
    assert json.loads((root / "labels.json").read_text()) == {"mug": 1, "drill": 2, "duck": 3}
    for k in range(scene.frames):
        name = f"{k:06d}"
        masks, poses = object_masks(root, name), object_poses(root, name)
        assert sorted(masks) == sorted(poses) == sorted(scene.names)
        for track in scene.objects:
            np.testing.assert_array_equal(masks[track.name], track.masks[k])
            np.testing.assert_allclose(poses[track.name], track.poses[k], atol=1e-9)
    assert not object_masks(root, "000001")["duck"].any()
    # the label images alone give the same masks
    import shutil

    shutil.rmtree(root / "masks")
    assert object_names(root) == ["mug", "drill", "duck"]
    for track in scene.objects:
        np.testing.assert_array_equal(object_masks(root, "000000")[track.name], track.masks[0])


def test_save_one_object_keeps_the_old_layout_and_adds_its_mesh(occluded_scene, tmp_path):
    scene = occluded_scene
    root = scene.save(tmp_path / "one")
    assert sorted(p.name for p in root.iterdir()) == ["annotated_poses", "cam_K.txt", "depth", "masks", "mesh", "rgb"]
    assert (root / "masks" / "000000.png").is_file() and (root / "annotated_poses" / "000000.txt").is_file()
    meshes = scene_meshes(root)
    assert list(meshes) == [scene.objects[0].name]
    assert load_mesh(meshes[scene.objects[0].name]).diameter == pytest.approx(scene.mesh.diameter, rel=1e-6)
    reader = YCBInEOATReader(root)
    assert np.array_equal(reader.frame(0, need_mask=True).mask, scene.masks[0])
    assert not reader.frame(3).mask.any()  # occluded: an empty mask is saved
    assert object_masks(root, "000000") == {} and object_poses(root, "000000") == {}


def test_save_several_objects_as_bop(multi_scene, tmp_path):
    scene = multi_scene
    root = scene.save(tmp_path / "bop", layout="bop")
    info = json.loads((root / "models" / "models_info.json").read_text())
    assert sorted(info) == ["1", "2", "3"]
    for track in scene.objects:
        assert info[str(track.obj_id)]["diameter"] == pytest.approx(track.mesh.diameter * 1000, rel=1e-5)
    reader = BOPReader(root, split="test", scene_id=1)
    for k in range(scene.frames):
        _, instances = reader.frame(k)
        shown = [t for t in scene.objects if t.masks[k].any()]
        assert [i.obj_id for i in instances] == [t.obj_id for t in shown]
        for instance, track in zip(instances, shown):
            np.testing.assert_allclose(instance.gt_pose, track.poses[k], atol=1e-6)
            np.testing.assert_array_equal(instance.mask, track.masks[k])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(objects=["mug", "drill", "duck", "blocks", "mug"]), r"objects: expected 1\.\.4"),
    (dict(objects=5), r"objects: expected 1\.\.4"),
    (dict(mesh="mug", objects=["duck", "drill"]), "mesh, objects: pass one"),
    (dict(frames=5, events=[Occlusion(start=3, frames=2)]), r"reappears at frame 5, past the last frame \(4\)"),
    (dict(frames=5, events=[Occlusion(start=0, frames=2)]), "start at frame 1"),
    (dict(frames=5, events=[Jump(frame=0)]), r"must be in 1\.\.4"),
    (dict(frames=1, events=[Jump(frame=1)]), "pass more frames"),
    (dict(frames=6, events=[Occlusion(start=1, frames=3), Jump(frame=2)]), r"put it at the reappearance, Jump\(frame=4\)"),
    (dict(frames=6, events=[Occlusion(start=1, frames=2), Occlusion(start=2, frames=2)]), "overlap"),
    (dict(frames=4, events=[Jump(frame=1, obj="teapot")]), "no object named 'teapot'"),
    (dict(frames=4, events=[Jump(frame=1, obj=2)]), r"object index in 0\.\.0"),
    (dict(frames=4, events=[Jump(frame=1, rotation_deg=270)]), r"rotation_deg: expected degrees in \[0, 180\]"),
    (dict(frames=4, events=[Occlusion(start=1, frames=1, by="magic")]), "by: expected one of"),
    (dict(frames=4, events=["jump at 2"]), "expected a Jump or an Occlusion"),
    (dict(objects=["mug", "duck", "drill"], footprint=0.2), "keep the sum under 0.3"),
    (dict(objects=["mug", "duck"], footprint=[0.05]), "one per object"),
])
def test_bad_input_is_refused_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_scene(width=64, height=48, **kwargs)


def test_a_jump_that_cannot_fit_says_what_to_change():
    with pytest.raises(ValueError, match="smaller footprint or translation_diameters"):
        make_scene(frames=3, footprint=0.3, seed=0, distractors=0, events=[Jump(frame=1, translation_diameters=3.0)],
                   width=64, height=48)
