"""Synthetic scenes: ground truth consistency, footprint control, sensor model, writers."""
import json

import cv2
import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from chunkpose.io.mesh import load_mesh
from chunkpose.ops.render import make_renderer
from chunkpose.synth import DEPTH_NOISE_A, DEPTH_NOISE_B, make_scene, sensor_depth

pytestmark = pytest.mark.gl
W, H = 320, 240


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture(scope="module")
def scene():
    return make_scene(width=W, height=H, frames=3, footprint=0.08, seed=7)


def test_scene_contents(scene):
    assert scene.frames == 3 and (scene.width, scene.height) == (W, H)
    for rgb, depth, mask, pose in zip(scene.rgb, scene.depth, scene.masks, scene.poses):
        assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
        assert depth.shape == (H, W) and depth.dtype == np.float32
        assert mask.shape == (H, W) and mask.dtype == bool and mask.sum() > 100
        assert pose.shape == (4, 4) and np.allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-9)
    assert scene.K.shape == (3, 3) and 0.7 * W < scene.K[0, 0] < 0.9 * W
    assert (scene.depth_clean[0] > 0).all()  # the background plane fills the view
    for visible, full in zip(scene.masks, scene.full_masks):
        assert not (visible & ~full).any()
        assert visible.sum() >= 0.6 * full.sum()  # distractors never hide most of it


def test_deterministic_per_seed():
    a = make_scene(width=160, height=120, seed=3)
    b = make_scene(width=160, height=120, seed=3)
    c = make_scene(width=160, height=120, seed=4)
    assert np.array_equal(a.rgb[0], b.rgb[0]) and np.array_equal(a.depth[0], b.depth[0])
    assert np.array_equal(a.masks[0], b.masks[0]) and np.array_equal(a.poses[0], b.poses[0])
    assert not np.array_equal(a.poses[0], c.poses[0])


def test_ground_truth_pose_rerenders_to_the_visible_mask(scene):
    renderer = make_renderer(scene.mesh, backend="gl")
    for pose, mask, clean in zip(scene.poses, scene.masks, scene.depth_clean):
        out = renderer.render_full(pose, scene.K, W, H)
        rendered = out["mask"][0].numpy()
        depth = out["depth"][0].numpy()
        visible = rendered & (depth <= clean + 1e-4)  # not behind a distractor
        assert iou(visible, mask) > 0.98
        assert np.abs(depth[mask] - clean[mask]).max() < 1e-4


@pytest.mark.parametrize("footprint", [0.01, 0.05, 0.3])
def test_footprint_is_controlled(footprint):
    scene = make_scene(width=W, height=H, footprint=footprint, seed=11, distractors=0)
    assert scene.full_masks[0].mean() == pytest.approx(footprint, rel=0.25)
    if footprint <= 0.05:  # small objects are placed wholly inside the image
        assert scene.full_masks[0][[0, -1], :].sum() == 0 and scene.full_masks[0][:, [0, -1]].sum() == 0


def test_sequence_moves_smoothly():
    scene = make_scene(width=W, height=H, frames=6, footprint=0.05, seed=2, distractors=1)
    for a, b in zip(scene.poses, scene.poses[1:]):
        angle = np.degrees(Rotation.from_matrix(a[:3, :3].T @ b[:3, :3]).magnitude())
        step = np.linalg.norm(a[:3, 3] - b[:3, 3])
        assert 0.5 < angle < 5.0
        assert step < 0.05 * a[2, 3]
    assert all(m.sum() > 50 for m in scene.masks)


def test_sensor_depth_model():
    rng = np.random.default_rng(0)
    clean = np.full((200, 200), 1.5, np.float32)
    clean[50:150, 50:150] = 0.8  # a step: an occlusion edge
    clean[:, :10] = 0.0  # no surface
    noisy = sensor_depth(clean, rng)
    mm = noisy * 1000.0
    assert np.allclose(mm, np.round(mm), atol=1e-3)  # 1 mm quantisation
    assert (noisy[:, :10] == 0).all()
    edge = np.zeros_like(clean, bool)
    edge[49:151, 49:151] = True  # the pixel on each side of the step
    edge[51:149, 51:149] = False
    assert (noisy[edge] == 0).mean() > 0.5  # most edge pixels missing
    flat = noisy[160:, 20:]
    assert (flat == 0).mean() < 0.01
    sigma = DEPTH_NOISE_A + DEPTH_NOISE_B * 1.5**2
    assert np.std(flat[flat > 0] - 1.5) == pytest.approx(np.sqrt(sigma**2 + 1e-6 / 12), rel=0.15)
    near = noisy[70:130, 70:130]
    assert np.std(near[near > 0] - 0.8) < np.std(flat[flat > 0] - 1.5)  # grows with z


def test_noise_free_option():
    scene = make_scene(width=160, height=120, seed=1, noise=False)
    assert np.array_equal(scene.depth[0], scene.depth_clean[0])


def read_png(path, flags=cv2.IMREAD_UNCHANGED):
    image = cv2.imread(str(path), flags)
    assert image is not None, path
    return image


def test_ycbineoat_round_trip(scene, tmp_path):
    root = scene.save(tmp_path / "scene", layout="ycbineoat")
    K = np.loadtxt(root / "cam_K.txt")
    assert np.allclose(K, scene.K, rtol=1e-9)
    names = sorted(p.stem for p in (root / "rgb").glob("*.png"))
    assert len(names) == scene.frames
    for i, name in enumerate(names):
        rgb = cv2.cvtColor(read_png(root / "rgb" / f"{name}.png"), cv2.COLOR_BGR2RGB)
        assert np.array_equal(rgb, scene.rgb[i])
        depth = read_png(root / "depth" / f"{name}.png")
        assert depth.dtype == np.uint16
        assert np.abs(depth / 1000.0 - scene.depth[i]).max() <= 0.0005 + 1e-6
        mask = read_png(root / "masks" / f"{name}.png") > 0
        assert np.array_equal(mask, scene.masks[i])
        pose = np.loadtxt(root / "annotated_poses" / f"{name}.txt")
        assert np.allclose(pose, scene.poses[i], atol=1e-9)
    # the package's reader sees the same frames
    from chunkpose.io.readers import YCBInEOATReader

    frame = YCBInEOATReader(root).frame(0, need_mask=True)
    assert np.array_equal(frame.mask, scene.masks[0])
    assert np.allclose(frame.gt_pose, scene.poses[0], atol=1e-9)


def test_rerendered_saved_pose_matches_saved_mask(tmp_path):
    scene = make_scene(width=W, height=H, seed=5, footprint=0.1, distractors=0, noise=False)
    root = scene.save(tmp_path / "s", layout="ycbineoat")
    K = np.loadtxt(root / "cam_K.txt")
    pose = np.loadtxt(root / "annotated_poses" / "000000.txt")
    mask = read_png(root / "masks" / "000000.png") > 0
    depth = read_png(root / "depth" / "000000.png") / 1000.0
    out = make_renderer(scene.mesh, backend="gl").render_full(pose, K, W, H)
    assert iou(out["mask"][0].numpy(), mask) > 0.98
    rendered = out["depth"][0].numpy()
    assert np.abs(rendered[mask] - depth[mask]).max() < 0.0006


def test_bop_round_trip(scene, tmp_path):
    root = scene.save(tmp_path / "bop", layout="bop")
    camera = json.loads((root / "camera.json").read_text())
    assert (camera["width"], camera["height"]) == (W, H) and camera["fx"] == pytest.approx(scene.K[0, 0])
    info = json.loads((root / "models" / "models_info.json").read_text())
    assert info["1"]["diameter"] == pytest.approx(scene.mesh.diameter * 1000, rel=1e-5)
    model = trimesh.load(root / "models" / "obj_000001.ply", process=False)
    assert np.allclose(np.asarray(model.vertices), scene.mesh.vertices * 1000, atol=1e-2)
    folder = root / "test" / "000001"
    cams = json.loads((folder / "scene_camera.json").read_text())
    gts = json.loads((folder / "scene_gt.json").read_text())
    infos = json.loads((folder / "scene_gt_info.json").read_text())
    assert sorted(cams) == sorted(gts) == [str(i) for i in range(scene.frames)]
    for i in range(scene.frames):
        K = np.array(cams[str(i)]["cam_K"]).reshape(3, 3)
        assert np.allclose(K, scene.K)
        gt = gts[str(i)][0]
        assert gt["obj_id"] == 1
        R = np.array(gt["cam_R_m2c"]).reshape(3, 3)
        t = np.array(gt["cam_t_m2c"]) / 1000.0
        assert np.allclose(R, scene.poses[i][:3, :3], atol=1e-9) and np.allclose(t, scene.poses[i][:3, 3], atol=1e-9)
        raw = read_png(folder / "depth" / f"{i:06d}.png")
        depth_m = raw * cams[str(i)]["depth_scale"] / 1000.0
        assert np.abs(depth_m - scene.depth[i]).max() <= 0.0005 + 1e-6
        visib = read_png(folder / "mask_visib" / f"{i:06d}_000000.png") > 0
        assert np.array_equal(visib, scene.masks[i])  # the scene's own masks
        # scene_gt_info is calc_gt_info's, rendered on bop_toolkit's pixel grid (half a pixel
        # from the images'): its counts agree with the masks up to their edges
        assert infos[str(i)][0]["px_count_visib"] == pytest.approx(scene.masks[i].sum(), rel=0.02)
    from chunkpose.io.bop_reader import BOPReader

    frame, instances = BOPReader(root, split="test", scene_id=1).frame(0)
    assert np.allclose(instances[0].gt_pose, scene.poses[0], atol=1e-6)
    assert np.array_equal(instances[0].mask, scene.masks[0])


def test_writes_are_atomic(scene, tmp_path, monkeypatch):
    import chunkpose.io.writers as writers

    target = tmp_path / "out"
    calls = {"n": 0}
    real = writers._imwrite

    def failing(path, image):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        real(path, image)

    monkeypatch.setattr(writers, "_imwrite", failing)
    with pytest.raises(OSError, match="disk full"):
        scene.save(target, layout="ycbineoat")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(writers, "_imwrite", real)
    scene.save(target, layout="ycbineoat")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        scene.save(target, layout="ycbineoat")
    scene.save(target, layout="ycbineoat", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="footprint"):
        make_scene(width=64, height=48, footprint=0.9)
    with pytest.raises(ValueError, match="width"):
        make_scene(width=0, height=48)
    scene = make_scene(width=64, height=48, seed=0, distractors=0)
    with pytest.raises(ValueError, match="layout"):
        scene.save("/tmp/never", layout="coco")
    with pytest.raises(ValueError, match="millimetres"):
        from chunkpose.io.writers import write_ycbineoat

        write_ycbineoat("/tmp/never", scene.rgb, [scene.depth[0] * 1000], scene.K)


def test_user_mesh_is_accepted():
    box = trimesh.creation.box((0.1, 0.06, 0.04))
    scene = make_scene(mesh=box, width=W, height=H, seed=0, footprint=0.05, distractors=2)
    assert scene.mesh.diameter == pytest.approx(load_mesh(box).diameter)
    assert scene.masks[0].sum() > 0.6 * scene.full_masks[0].sum()


@pytest.mark.slow
def test_full_resolution_scene():
    scene = make_scene(width=3072, height=2048, footprint=0.02, seed=0)
    assert scene.rgb[0].shape == (2048, 3072, 3)
    assert scene.full_masks[0].mean() == pytest.approx(0.02, rel=0.25)
    out = make_renderer(scene.mesh, backend="gl").render_full(scene.poses[0], scene.K, 3072, 2048)
    visible = out["mask"][0].numpy() & (out["depth"][0].numpy() <= scene.depth_clean[0] + 1e-4)
    assert iou(visible, scene.masks[0]) > 0.98
