"""Scene folders as upstream FoundationPose's reader accepts them: masks with alpha or colour,
cam_K.txt with comments, hidden files, depth at another resolution, rgb_-prefixed names."""
import cv2
import numpy as np
import pytest

from chunkpose.io.readers import YCBInEOATReader, object_names, scene_meshes
from chunkpose.io.scene_files import SceneError, read_intrinsics_file, read_mask_file
from test_readers import write_ycbineoat


def _mask_image(tmp_path, image):
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), image)
    return read_mask_file(path)


def test_opaque_alpha_is_not_the_mask(tmp_path):
    image = np.zeros((6, 8, 4), np.uint8)
    image[..., 3] = 255  # opaque everywhere
    image[1:3, 1:4, :3] = 255
    assert _mask_image(tmp_path, image).sum() == 6


def test_colour_mask_uses_the_first_marked_channel_in_cv2_order(tmp_path):
    image = np.zeros((6, 8, 3), np.uint8)
    image[1:3, 1:4, 2] = 128  # red object (cv2's channel 2)
    image[5, 0:2, 1] = 9  # a green mark: cv2's channel 1 comes first, as upstream reads it
    mask = _mask_image(tmp_path, image)
    assert mask.sum() == 2 and mask[5, 0] and mask[5, 1]
    image[5, 0:2, 1] = 0
    assert _mask_image(tmp_path, image).sum() == 6


def test_cut_out_mask_in_alpha_alone(tmp_path):
    image = np.zeros((6, 8, 4), np.uint8)
    image[1:3, 1:4, 3] = 255
    assert _mask_image(tmp_path, image).sum() == 6


def test_grey_mask_of_ones_or_255(tmp_path):
    image = np.zeros((6, 8), np.uint8)
    image[1:3, 1:4] = 1
    assert _mask_image(tmp_path, image).sum() == 6


def test_cam_K_with_comments_reads_as_numpy_loadtxt(tmp_path):
    path = tmp_path / "cam_K.txt"
    path.write_text("# camera matrix\n600 0 320  # fx 0 cx\n0 600 240\n0 0 1\n")
    np.testing.assert_array_equal(read_intrinsics_file(path), np.loadtxt(path))


def test_hidden_files_and_folders_are_ignored(tmp_path):
    write_ycbineoat(tmp_path, frames=2)
    (tmp_path / "rgb" / "._000000.png").write_bytes(b"macOS resource fork")
    (tmp_path / "masks" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "textured.obj").write_text("v 0 0 0\n")
    (tmp_path / "mesh" / "._textured.obj").write_bytes(b"\x00")
    reader = YCBInEOATReader(tmp_path)
    assert reader.names == ["000000", "000001"]
    assert reader.frame(0, need_mask=True).mask.any()
    assert object_names(tmp_path) == []
    assert list(scene_meshes(tmp_path)) == ["textured"]


def test_depth_and_mask_at_another_resolution_are_resized_to_rgb(tmp_path):
    data = write_ycbineoat(tmp_path, frames=1, h=48, w=64)
    rgb, depth, mask = data[0]
    cv2.imwrite(str(tmp_path / "depth" / "000000.png"), depth[::2, ::2])
    cv2.imwrite(str(tmp_path / "masks" / "000000.png"), mask[::2, ::2].astype(np.uint8) * 255)
    with pytest.warns(UserWarning, match="resized to the rgb size"):
        frame = YCBInEOATReader(tmp_path).frame(0, need_mask=True)
    assert frame.depth.shape == (48, 64) and frame.mask.shape == (48, 64)
    np.testing.assert_allclose(frame.depth[::2, ::2], depth[::2, ::2] / 1000.0, atol=1e-6)
    np.testing.assert_array_equal(frame.mask[::2, ::2], mask[::2, ::2])


def test_depth_of_another_aspect_ratio_is_an_error(tmp_path):
    write_ycbineoat(tmp_path, frames=1, h=48, w=64)
    cv2.imwrite(str(tmp_path / "depth" / "000000.png"), np.full((48, 48), 500, np.uint16))
    with pytest.raises(SceneError, match="another aspect ratio"):
        YCBInEOATReader(tmp_path).frame(0)


def test_rgb_prefixed_names_find_depth_and_mask_by_replacement(tmp_path):
    write_ycbineoat(tmp_path, frames=1)
    for folder, word in (("rgb", "rgb"), ("depth", "depth"), ("masks", "masks")):
        (tmp_path / folder / "000000.png").rename(tmp_path / folder / f"{word}_000000.png")
    frame = YCBInEOATReader(tmp_path).frame(0, need_mask=True)
    assert frame.name == "rgb_000000" and frame.mask.any() and (frame.depth > 0).any()


def test_ground_truth_poses_by_position_when_no_name_matches(tmp_path):
    """Upstream takes sorted(annotated_poses/*)[i] for frame i: pose files named otherwise
    (pose_0.txt, pose_1.txt, ...) are read by position when there is one per frame."""
    write_ycbineoat(tmp_path, frames=2)
    folder = tmp_path / "annotated_poses"
    for i, name in enumerate(["000000", "000001"]):
        (folder / f"{name}.txt").rename(folder / f"pose_{i}.txt")
    reader = YCBInEOATReader(tmp_path)
    assert reader.has_ground_truth()
    assert reader.frame(1).gt_pose[2, 3] == pytest.approx(0.51)
    (folder / "pose_1.txt").unlink()  # one file for two frames: nothing is guessed
    assert not YCBInEOATReader(tmp_path).has_ground_truth()
