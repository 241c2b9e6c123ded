"""ADD, ADD-S, AUC and recall against hand-computed cases."""
import numpy as np
import pytest

from chunkpose.metrics import (add_error, adds_error, auc, pose_errors, recall_at_diameter,
                               rotation_error_deg)


def _rot_z(deg):
    a = np.radians(deg)
    pose = np.eye(4)
    pose[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return pose


def _asymmetric_points():
    rng = np.random.default_rng(0)
    return rng.normal(size=(200, 3)) * [0.05, 0.02, 0.01]


def test_identical_poses_have_zero_error():
    pose = _rot_z(30)
    pose[:3, 3] = [0.1, -0.2, 0.7]
    pts = _asymmetric_points()
    assert add_error(pose, pose, pts) == pytest.approx(0.0, abs=1e-12)
    assert adds_error(pose, pose, pts) == pytest.approx(0.0, abs=1e-12)


def test_translation_offset_gives_add_equal_to_offset():
    gt = np.eye(4)
    est = np.eye(4)
    est[:3, 3] = [0.003, 0.004, 0.0]  # 5 mm
    pts = _asymmetric_points()
    assert add_error(est, gt, pts) == pytest.approx(0.005)
    assert adds_error(est, gt, pts) <= 0.005 + 1e-12


def test_adds_is_zero_for_a_symmetric_shape_rotated_by_its_symmetry():
    # the 8 corners of a square prism: symmetric under 90 degrees about z
    pts = np.array([[x, y, z] for x in (-0.02, 0.02) for y in (-0.02, 0.02) for z in (-0.01, 0.01)])
    gt = np.eye(4)
    gt[:3, 3] = [0, 0, 0.5]
    est = gt @ _rot_z(90)
    assert adds_error(est, gt, pts) == pytest.approx(0.0, abs=1e-12)
    # ADD does not know about symmetry: each corner moves to its neighbour, 0.04 m away
    assert add_error(est, gt, pts) == pytest.approx(0.04)


def test_add_of_a_rotation_is_the_mean_chord():
    pts = np.array([[0.1, 0, 0], [0, 0.1, 0]])
    err = add_error(_rot_z(180), np.eye(4), pts)
    assert err == pytest.approx(0.2)  # each point goes to its antipode
    assert rotation_error_deg(_rot_z(180), np.eye(4)) == pytest.approx(180.0)


def test_auc_values():
    assert auc([0.0, 0.0]) == pytest.approx(1.0)
    assert auc([0.2, 1.0]) == pytest.approx(0.0)
    # all errors at 5 cm: recall is 0 below 0.05, 1 from 0.05 (on the 1 mm grid): area 0.05
    # plus the trapezoid half-step between 0.049 and 0.050 -> (0.05 + 0.0005) / 0.1
    assert auc([0.05]) == pytest.approx(0.505)
    # half perfect, half failed
    assert auc([0.0, np.inf]) == pytest.approx(0.5)
    # NaN (a failed estimate) counts as a miss
    assert auc([0.0, np.nan]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        auc([])


def test_recall_at_diameter():
    errors = [0.001, 0.009, 0.011, 0.5]
    assert recall_at_diameter(errors, 0.1) == pytest.approx(0.5)
    assert recall_at_diameter(errors, [0.1, 0.1, 0.2, 0.1]) == pytest.approx(0.75)


def test_pose_errors_subsamples_big_meshes_consistently():
    pts = np.random.default_rng(1).normal(size=(50000, 3)) * 0.05
    est = np.eye(4)
    est[:3, 3] = [0.0, 0.0, 0.002]
    e = pose_errors(est, np.eye(4), pts, max_points=2000)
    assert e["add"] == pytest.approx(0.002)
    assert e["trans_m"] == pytest.approx(0.002)
    assert e["rot_deg"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="pose_est"):
        add_error(np.eye(3), np.eye(4), pts)
