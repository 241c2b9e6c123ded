"""Crop windows (box_3d) and the ROI that crops read."""
import numpy as np
import pytest
import torch

import chunkpose.ops as ops
from test_ops_common import look_at_poses

K = np.array([[610.0, 0.0, 322.5], [0.0, 612.0, 241.0], [0.0, 0.0, 1.0]])


def naive_box3d(pose, K, diameter, crop_ratio, size):
    """One hypothesis, written out step by step in float64."""
    t = pose[:3, 3]
    r = diameter * crop_ratio / 2

    def project(p):
        q = K @ p
        return q[:2] / q[2]

    c = project(t)
    half = 0.0
    for off in ([r, 0, 0], [-r, 0, 0], [0, r, 0], [0, -r, 0]):
        half = max(half, np.abs(project(t + np.array(off)) - c).max())
    left, right = np.round(c[0] - half), np.round(c[0] + half)
    top, bottom = np.round(c[1] - half), np.round(c[1] + half)
    scale = np.diag([size / (right - left), size / (bottom - top), 1.0])
    shift = np.array([[1, 0, -left], [0, 1, -top], [0, 0, 1.0]])
    return scale @ shift, np.array([left, top, right, bottom])


def test_box3d_transforms_match_the_step_by_step_reference():
    poses = look_at_poses(9, seed=1)
    cw = ops.crop_windows(poses, K, diameter=0.2, crop_ratio=1.2, size=160, image_size=(480, 640))
    assert cw.transforms.shape == (9, 3, 3) and cw.transforms.dtype == torch.float32
    for i in range(9):
        T, box = naive_box3d(poses[i], K, 0.2, 1.2, 160)
        np.testing.assert_allclose(cw.transforms[i].double().numpy(), T, rtol=1e-6, atol=1e-3)
        np.testing.assert_array_equal(cw.boxes[i].numpy(), box)
    # the box corners map to the crop corners
    left, top = cw.boxes[0, 0].item(), cw.boxes[0, 1].item()
    p = cw.transforms[0].double() @ torch.tensor([left, top, 1.0], dtype=torch.float64)
    assert abs(p[0]) < 1e-3 and abs(p[1]) < 1e-3


def test_rounding_is_half_to_even():
    # centre exactly at 320.5 - 20 = 300.5 -> 300 (even), 340.5 -> 340
    Kh = np.array([[100.0, 0.0, 320.5], [0.0, 100.0, 240.0], [0.0, 0.0, 1.0]])
    pose = np.eye(4)
    pose[:3, 3] = [0.0, 0.0, 1.0]
    cw = ops.crop_windows(pose[None], Kh, diameter=0.4, crop_ratio=1.0, size=160)
    assert cw.boxes[0].tolist() == [300.0, 220.0, 340.0, 260.0]


def test_roi_covers_every_sampled_pixel_and_is_clipped():
    poses = look_at_poses(30, spread=0.08, seed=2)
    cw = ops.crop_windows(poses, K, diameter=0.25, crop_ratio=1.1, size=64, image_size=(480, 640))
    x0, y0, x1, y1 = cw.roi
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    px, py = ops.sample_positions(cw.transforms, 64)
    inside = (px > -1) & (px < 640) & (py > -1) & (py < 480)
    # bilinear reads floor and floor+1, nearest reads round: all within the ROI when in the image
    for xs, ys in [(px.floor(), py.floor()), (px.floor() + 1, py.floor() + 1), (px.round(), py.round())]:
        ok = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        in_img = (xs >= 0) & (xs < 640) & (ys >= 0) & (ys < 480)
        assert bool((ok | ~in_img | ~inside).all())
    # and it is not much larger than the union of the boxes
    boxes = cw.boxes
    assert x0 >= boxes[:, 0].min() - 3 and x1 <= boxes[:, 2].max() + 3
    # an object near the border: ROI clipped to the image
    edge = poses.copy()
    edge[:, 0, 3] = -0.33
    cw2 = ops.crop_windows(edge, K, 0.25, 1.1, 64, image_size=(480, 640))
    assert cw2.roi[0] == 0
    rows, cols = cw2.roi_slices()
    assert np.zeros((480, 640))[rows, cols].shape == (cw2.roi[3] - cw2.roi[1], cw2.roi[2] - cw2.roi[0])


def test_bad_inputs_are_named():
    poses = look_at_poses(2)
    with pytest.raises(ValueError, match="poses"):
        ops.crop_windows(poses[:, :3], K, 0.2, 1.2)
    with pytest.raises(ValueError, match="diameter"):
        ops.crop_windows(poses, K, -1.0, 1.2)
    with pytest.raises(ValueError, match="K"):
        ops.crop_windows(poses, np.eye(4), 0.2, 1.2)
    behind = poses.copy()
    behind[:, 2, 3] = -1
    with pytest.raises(ValueError, match="in front"):
        ops.crop_windows(behind, K, 0.2, 1.2)
