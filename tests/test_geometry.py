"""Camera and rotation math (chunkpose.ops.geometry), with scipy's Rotation as the oracle
for the SO(3) maps and the formula itself for back-projection and resizing."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from chunkpose.ops.geometry import (MIN_DEPTH, backproject_into, look_at_rotations, make_pose, rotation_about_z,
                                    rotation_angle, scale_intrinsics, scaled_size, skew, so3_exp, so3_log)


def random_rotvecs(n=200, seed=0, max_angle=3.1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 3, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=g, dtype=torch.float64) * max_angle
    w[0] = 0.0
    w[1] = torch.tensor([1e-9, 0, 0])
    return w


def test_so3_exp_equals_scipy():
    w = random_rotvecs()
    ref = torch.from_numpy(Rotation.from_rotvec(w.numpy()).as_matrix())
    torch.testing.assert_close(so3_exp(w), ref, rtol=0, atol=1e-12)


def test_so3_log_equals_scipy_including_near_pi():
    w = random_rotvecs(seed=1)
    axes = torch.nn.functional.normalize(torch.randn(20, 3, dtype=torch.float64), dim=1)
    near_pi = axes * (math.pi - 1e-6)
    R = torch.from_numpy(Rotation.from_rotvec(torch.cat([w, near_pi]).numpy()).as_matrix())
    log = so3_log(R)
    # near pi, w and -w are the same rotation: compare the rotations they give
    torch.testing.assert_close(torch.from_numpy(Rotation.from_rotvec(log.numpy()).as_matrix()), R, rtol=0, atol=1e-6)
    torch.testing.assert_close(log[:200], w, rtol=0, atol=1e-9)
    torch.testing.assert_close(rotation_angle(R[:200]), w.norm(dim=1), rtol=0, atol=1e-7)


def test_so3_exp_with_pytorch3d_clamp():
    """eps=1e-4: the angle is sqrt(max(|w|^2, 1e-4)), so below 0.01 rad the coefficients are
    those of 0.01 rad (how the upstream refiner's steps are applied)."""
    w = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.0, 1.0], [1e-3, 0.0, 0.0]], dtype=torch.float64)
    R = so3_exp(w, eps=1e-4)
    torch.testing.assert_close(R[:2], torch.from_numpy(Rotation.from_rotvec(w[:2].numpy()).as_matrix()), rtol=0, atol=1e-12)
    theta = 0.01
    a, b = math.sin(theta) / theta, (1 - math.cos(theta)) / theta**2
    assert R[2, 1, 2].item() == pytest.approx(-a * 1e-3, rel=1e-12)
    assert R[2, 1, 1].item() == pytest.approx(1 - b * 1e-6, rel=1e-12)


def test_skew_is_the_cross_product():
    v, x = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close((skew(v) @ x[:, :, None])[:, :, 0], torch.linalg.cross(v, x))


def test_look_at_and_in_plane_rotations():
    eyes = torch.tensor([[0.0, 0, 2], [1, 0, 0], [0, -3, 0.1], [0, 0, -1], [1, 2, 3]], dtype=torch.float64)
    R = look_at_rotations(eyes)  # object in camera
    assert torch.allclose(torch.det(R), torch.ones(len(eyes), dtype=torch.float64))
    ahead = (R @ (-eyes)[:, :, None])[:, :, 0]  # the object origin is straight ahead (+z)
    assert torch.allclose(ahead[:, :2], torch.zeros(len(eyes), 2, dtype=torch.float64), atol=1e-12)
    assert (ahead[:, 2] > 0).all()
    angles = torch.tensor([0.3, -1.2], dtype=torch.float64)
    ref = Rotation.from_euler("z", angles.numpy()[:, None]).as_matrix()
    torch.testing.assert_close(rotation_about_z(angles), torch.from_numpy(ref))
    T = make_pose(R, torch.ones(5, 3, dtype=torch.float64))
    assert T.shape == (5, 4, 4) and torch.equal(T[:, 3], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(5, 4))


def test_backprojection_formula_and_invalid_depth():
    z = torch.tensor([[0.5, 0.0005, 1.0]], dtype=torch.float32)
    u = torch.tensor([10.0, 20.0, 30.0])
    v = torch.tensor([[5.0]])
    out = torch.empty(3, 1, 3)
    backproject_into((out[0], out[1], out[2]), u, v, z, 100.0, 110.0, 12.0, 6.0)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([(10 - 12) * 0.5 / 100, (5 - 6) * 0.5 / 110, 0.5]))
    assert out[:, 0, 1].abs().sum() == 0  # below MIN_DEPTH: no point
    assert MIN_DEPTH == 0.001


def test_resize_convention_is_upstreams():
    assert scaled_size(2048, 3072, 0.3) == (614, 921)  # truncated, as FoundationPose's readers
    K = np.array([[1000.0, 0, 1536], [0, 1000.0, 1024], [0, 0, 1]])
    np.testing.assert_allclose(scale_intrinsics(K, 0.5), [[500, 0, 768], [0, 500, 512], [0, 0, 1]])
