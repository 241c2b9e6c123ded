"""Scene readers on tiny folders written here with cv2.imwrite."""
import json

import cv2
import numpy as np
import pytest

from chunkpose.io.bop_reader import BOPReader
from chunkpose.io.scene_files import SceneError, read_depth_file
from chunkpose.io.readers import YCBInEOATReader

K_TINY = np.array([[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]])


def tiny_frame(h=48, w=64, seed=0):
    """rgb (h,w,3) uint8 RGB, depth uint16 mm (plane at 600 mm, a box at 500 mm), mask bool."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    depth = np.full((h, w), 600, np.uint16)
    mask = np.zeros((h, w), bool)
    mask[h // 4: 3 * h // 4, w // 4: w // 2] = True
    depth[mask] = 500
    depth[0, 0] = 0  # a hole
    return rgb, depth, mask


def write_ycbineoat(root, frames=3, h=48, w=64, with_poses=True, first_mask=True):
    """A YCBInEOAT folder with ``frames`` frames; returns the per-frame (rgb, depth, mask)."""
    for sub in ("rgb", "depth", "masks", "annotated_poses"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    np.savetxt(root / "cam_K.txt", K_TINY)
    data = []
    for i in range(frames):
        rgb, depth, mask = tiny_frame(h, w, seed=i)
        name = f"{i:06d}"
        cv2.imwrite(str(root / "rgb" / f"{name}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "depth" / f"{name}.png"), depth)
        if i == 0 and first_mask:
            cv2.imwrite(str(root / "masks" / f"{name}.png"), mask.astype(np.uint8) * 255)
        if with_poses:
            pose = np.eye(4)
            pose[:3, 3] = [0.0, 0.0, 0.5 + 0.01 * i]
            np.savetxt(root / "annotated_poses" / f"{name}.txt", pose)
        data.append((rgb, depth, mask))
    return data


def test_ycbineoat_reads_frames_in_chunkpose_units(tmp_path):
    data = write_ycbineoat(tmp_path)
    reader = YCBInEOATReader(tmp_path)
    assert len(reader) == 3 and reader.names == ["000000", "000001", "000002"]
    frame = reader.frame(0, need_mask=True)
    rgb, depth, mask = data[0]
    np.testing.assert_array_equal(frame.rgb, rgb)  # RGB order, not cv2's BGR
    assert frame.depth.dtype == np.float32
    np.testing.assert_allclose(frame.depth, depth / 1000.0, atol=1e-6)
    assert frame.depth[0, 0] == 0
    np.testing.assert_array_equal(frame.mask, mask)
    np.testing.assert_allclose(frame.K, K_TINY)
    assert frame.gt_pose[2, 3] == pytest.approx(0.5)
    later = reader.frame(2)
    assert later.mask is None and later.gt_pose[2, 3] == pytest.approx(0.52)


def test_downscale_is_nearest_and_scales_first_two_rows_of_K(tmp_path):
    write_ycbineoat(tmp_path, frames=1)
    full = YCBInEOATReader(tmp_path).frame(0)
    half = YCBInEOATReader(tmp_path, downscale=0.5).frame(0)
    assert half.rgb.shape == (24, 32, 3) and half.depth.shape == (24, 32) and half.mask.shape == (24, 32)
    np.testing.assert_allclose(half.K[:2], K_TINY[:2] * 0.5)
    np.testing.assert_allclose(half.K[2], K_TINY[2])
    # nearest: no blended depth values at the box edge
    assert set(np.unique(half.depth)) <= set(np.unique(full.depth))
    assert half.mask.dtype == bool and half.mask.any()
    short = YCBInEOATReader(tmp_path, shorter_side=24).frame(0)
    assert short.depth.shape == (24, 32)
    np.testing.assert_allclose(short.K, half.K)


def test_zfar_removes_far_depth(tmp_path):
    write_ycbineoat(tmp_path, frames=1)
    frame = YCBInEOATReader(tmp_path, zfar=0.55).frame(0)
    assert frame.depth.max() == pytest.approx(0.5)
    assert (frame.depth[~frame.mask] == 0).all()


def _message(excinfo):
    return str(excinfo.value)


@pytest.mark.parametrize("breakage, words", [
    ("no_folder", "does not exist"),
    ("no_cam_K", "cam_K.txt"),
    ("bad_cam_K", "9 numbers"),
    ("unreadable_rgb", "cannot read image"),
    ("size_mismatch", "same size"),
    ("no_first_mask", "no mask for frame 000000"),
    ("empty_mask", "mask of frame 000000 is empty"),
    ("float_depth", "uint16 millimetres were expected"),
    ("metres_as_int", "looks like metres"),
    ("missing_depth", "no depth image"),
])
def test_bad_scene_input_names_the_problem_and_the_fix(tmp_path, breakage, words):
    root = tmp_path / "scene"
    write_ycbineoat(root, frames=1, first_mask=breakage != "no_first_mask")
    if breakage == "no_folder":
        root = tmp_path / "missing"
    elif breakage == "no_cam_K":
        (root / "cam_K.txt").unlink()
    elif breakage == "bad_cam_K":
        (root / "cam_K.txt").write_text("1 2 3\n")
    elif breakage == "unreadable_rgb":
        (root / "rgb" / "000000.png").write_bytes(b"not a png")
    elif breakage == "size_mismatch":
        cv2.imwrite(str(root / "depth" / "000000.png"), np.full((40, 64), 500, np.uint16))
    elif breakage == "empty_mask":
        cv2.imwrite(str(root / "masks" / "000000.png"), np.zeros((48, 64), np.uint8))
    elif breakage == "float_depth":
        (root / "depth" / "000000.png").unlink()
        cv2.imwrite(str(root / "depth" / "000000.tif"), np.full((48, 64), 0.5, np.float32))
    elif breakage == "metres_as_int":
        cv2.imwrite(str(root / "depth" / "000000.png"), np.full((48, 64), 1, np.uint16))
    elif breakage == "missing_depth":
        (root / "depth" / "000000.png").unlink()
    with pytest.raises(SceneError) as excinfo:
        YCBInEOATReader(root).frame(0, need_mask=True)
    message = _message(excinfo)
    assert words in message
    assert message.endswith(")") and "(" in message  # "<what> (<how to fix>)"
    assert "\n" not in message


def test_depth_scale_converts_raw_units(tmp_path):
    path = tmp_path / "d.png"
    cv2.imwrite(str(path), np.full((4, 4), 5000, np.uint16))
    np.testing.assert_allclose(read_depth_file(path, 0.1 / 1000), 0.5, rtol=1e-6)  # BOP depth_scale 0.1


def write_bop(root, h=48, w=64, depth_scale=0.1):
    """DATASET/test/000002 with one image and 3 annotations: two with masks (one empty), one without."""
    scene = root / "test" / "000002"
    for sub in ("rgb", "depth", "mask_visib"):
        (scene / sub).mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "camera.json").write_text(json.dumps({"depth_scale": 1.0, "width": w, "height": h}))
    (root / "models" / "models_info.json").write_text(json.dumps({
        "1": {"diameter": 80.0}, "5": {"diameter": 120.0, "symmetries_discrete": [[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]}}))
    rgb, depth_mm, mask = tiny_frame(h, w)
    cv2.imwrite(str(scene / "rgb" / "000007.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(scene / "depth" / "000007.png"), (depth_mm.astype(np.float64) / depth_scale).astype(np.uint16))
    cv2.imwrite(str(scene / "mask_visib" / "000007_000000.png"), mask.astype(np.uint8) * 255)
    cv2.imwrite(str(scene / "mask_visib" / "000007_000001.png"), np.zeros((h, w), np.uint8))
    (scene / "scene_camera.json").write_text(json.dumps({"7": {"cam_K": K_TINY.reshape(-1).tolist(), "depth_scale": depth_scale}}))
    R = np.eye(3)
    (scene / "scene_gt.json").write_text(json.dumps({"7": [
        {"obj_id": 1, "cam_R_m2c": R.reshape(-1).tolist(), "cam_t_m2c": [10.0, -20.0, 500.0]},
        {"obj_id": 5, "cam_R_m2c": R.reshape(-1).tolist(), "cam_t_m2c": [0.0, 0.0, 700.0]},
        {"obj_id": 5, "cam_R_m2c": R.reshape(-1).tolist(), "cam_t_m2c": [0.0, 0.0, 800.0]},
    ]}))
    return rgb, depth_mm, mask


def test_bop_reader_units_instances_and_model_info(tmp_path):
    rgb, depth_mm, mask = write_bop(tmp_path)
    reader = BOPReader(tmp_path, split="test", scene_id=2)
    assert len(reader) == 1
    frame, instances = reader.frame(0)
    np.testing.assert_array_equal(frame.rgb, rgb)
    np.testing.assert_allclose(frame.depth, depth_mm / 1000.0, atol=2e-4)  # raw * depth_scale = mm
    assert [(i.im_id, i.gt_index, i.obj_id) for i in instances] == [(7, 0, 1)]  # empty and missing masks skipped
    inst = instances[0]
    assert inst.name == "000007_000000"
    np.testing.assert_allclose(inst.gt_pose[:3, 3], [0.01, -0.02, 0.5])
    np.testing.assert_array_equal(inst.mask, mask)
    assert reader.model_info(1) == {"diameter": 0.08, "symmetric": False}
    assert reader.model_info(5)["symmetric"] is True


def test_bop_reader_downscale_resizes_instance_masks(tmp_path):
    write_bop(tmp_path)
    frame, instances = BOPReader(tmp_path, scene_id=2, downscale=0.5).frame(0)
    assert frame.depth.shape == (24, 32) and instances[0].mask.shape == (24, 32)
    np.testing.assert_allclose(frame.K[:2], K_TINY[:2] * 0.5)


def test_bop_reader_missing_scene_says_which_option(tmp_path):
    write_bop(tmp_path)
    with pytest.raises(SceneError, match="--split and --scene-id"):
        BOPReader(tmp_path, scene_id=3)
