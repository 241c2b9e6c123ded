"""PoseEstimator on small synthetic scenes (CPU, few hypotheses): registration, tracking,
chunked == unchunked, downscale only when needed, BudgetTooSmall, original mesh frame."""
import math
import warnings

import numpy as np
import pytest
import torch

from chunkpose.engine import BudgetTooSmall
from chunkpose.estimator import PoseEstimator
from chunkpose.metrics import add_error
from chunkpose.pipeline.hypotheses import rotation_hypotheses
from chunkpose.ops.geometry import so3_exp

W, H = 320, 240
HYPOTHESES = 12


def _object():
    """An asymmetric builtin object whose model origin is far from its bbox centre, so the
    test also checks that poses come back in the original mesh frame."""
    from chunkpose.io.mesh import load_mesh
    from chunkpose.shapes import builtin_meshes

    source = builtin_meshes()["duck"].copy()
    source.apply_translation((0.06, -0.03, 0.04))
    return load_mesh(source)


def _rot(axis_angle):
    return so3_exp(torch.tensor([axis_angle], dtype=torch.float64))[0].numpy()


def _render_frame(renderer, pose, K, rng, background=0.65):
    out = renderer.render_full(pose, K, W, H)
    mask = out["mask"][0].numpy()
    depth = np.where(mask, out["depth"][0].numpy(), background).astype(np.float32)
    depth = depth + (rng.standard_normal(depth.shape) * 0.0005).astype(np.float32)
    grey = np.full((H, W, 3), 90.0)
    rgb = np.where(mask[..., None], out["rgb"][0].permute(1, 2, 0).numpy() * 255, grey).astype(np.uint8)
    return rgb, depth, mask


@pytest.fixture(scope="module")
def scene():
    """An easy registration: the true rotation is 12 deg from one of the 12 hypotheses.
    Then a short sequence of small motions for tracking."""
    from chunkpose.ops.render import make_renderer

    mesh = _object()
    renderer = make_renderer(mesh, "cpu")  # renders the ORIGINAL frame (ground truth)
    K = np.array([[330.0, 0, 161.0], [0, 330.0, 118.5], [0, 0, 1]])
    rng = np.random.default_rng(0)
    R = _rot([0.12, -0.15, 0.05]) @ rotation_hypotheses(HYPOTHESES, dtype=torch.float64)[5].numpy()
    centre = np.array([0.012, -0.008, 0.42])
    pose = np.eye(4)
    pose[:3, :3] = R
    pose[:3, 3] = centre - R @ mesh.center  # bbox centre at `centre`
    frames = [(_render_frame(renderer, pose, K, rng), pose)]
    for i in range(3):
        nxt = frames[-1][1].copy()
        step = _rot([0.03, 0.04 * (-1) ** i, 0.02])
        c = nxt[:3, :3] @ mesh.center + nxt[:3, 3] + np.array([0.004, -0.003, 0.005])
        nxt[:3, :3] = step @ nxt[:3, :3]
        nxt[:3, 3] = c - nxt[:3, :3] @ mesh.center
        frames.append((_render_frame(renderer, nxt, K, rng), nxt))
    return dict(mesh=mesh, K=K, frames=frames)


def _estimator(scene, budget_gb=None, **kw):
    kw.setdefault("hypotheses", HYPOTHESES)
    kw.setdefault("refine_iterations", 4)
    return PoseEstimator(scene["mesh"], budget_gb=budget_gb, device="cpu", **kw)


def _add_ratio(pose, gt, mesh):
    return add_error(pose, gt, mesh.vertices) / mesh.diameter


def _register(est, scene, frame=0):
    (rgb, depth, mask), _ = scene["frames"][frame]
    return est.register(rgb, depth, scene["K"], mask)


def test_register_recovers_the_pose_in_the_original_mesh_frame(scene):
    est = _estimator(scene)
    res = _register(est, scene)
    gt = scene["frames"][0][1]
    assert res.pose.shape == (4, 4) and res.pose.dtype == np.float64
    assert np.allclose(res.pose[3], [0, 0, 0, 1])
    assert _add_ratio(res.pose, gt, scene["mesh"]) < 0.02
    assert math.isfinite(res.score)
    assert res.report.downscale_factor == 1.0
    assert "refine.geometric" in res.report.stages and "score.geometric" in res.report.stages
    assert np.allclose(est.last_pose, res.pose)


def test_track_follows_the_object(scene):
    est = _estimator(scene)
    _register(est, scene)
    for (rgb, depth, _), gt in scene["frames"][1:]:
        res = est.track(rgb, depth, scene["K"])
        assert _add_ratio(res.pose, gt, scene["mesh"]) < 0.05
        assert math.isnan(res.score)  # tracking does not score
        stage = res.report.stages["refine.geometric"]
        assert stage.chunk_sizes == [1] * est.track_iterations  # one hypothesis, no scoring
        assert "score.geometric" not in res.report.stages


def test_track_needs_register_first(scene):
    est = _estimator(scene)
    (rgb, depth, _), _ = scene["frames"][0]
    with pytest.raises(RuntimeError, match="register"):
        est.track(rgb, depth, scene["K"])


def test_chunked_equals_unchunked(scene):
    whole = _register(_estimator(scene, budget_gb=None), scene)
    (rgb, depth, mask), _ = scene["frames"][0]
    # near the smallest budget that still runs at full resolution: stages must be chunked
    tight = _estimator(scene, budget_gb=None).required_budget_gb(rgb, depth, scene["K"], mask) * 1.05
    chunked = _register(_estimator(scene, budget_gb=tight), scene)
    assert chunked.report.downscale_factor == 1.0
    refine = chunked.report.stages["refine.geometric"]
    assert max(refine.chunk_sizes) < HYPOTHESES  # it really was chunked
    assert max(whole.report.stages["refine.geometric"].chunk_sizes) == HYPOTHESES
    assert np.allclose(chunked.pose, whole.pose, atol=1e-5)
    assert chunked.score == pytest.approx(whole.score, abs=1e-5)
    assert chunked.report.total_peak_bytes <= chunked.report.budget_bytes


@pytest.mark.parametrize("budget_gb", [None, 2.0, 0.25, "just_enough"])
def test_no_downscale_when_full_resolution_fits(scene, budget_gb):
    if budget_gb == "just_enough":  # the estimator's own threshold, as a user would ask for it
        (rgb, depth, mask), _ = scene["frames"][0]
        budget_gb = _estimator(scene, budget_gb=None).required_budget_gb(rgb, depth, scene["K"], mask) * 1.001
    est = _estimator(scene, budget_gb=budget_gb, refine_iterations=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no downscale warning
        res = _register(est, scene)
    assert res.report.downscale_factor == 1.0 and res.report.downscale_reason is None
    if budget_gb is not None:
        assert res.report.peak_bytes <= res.report.budget_bytes


def test_downscale_only_below_the_full_resolution_minimum_and_pose_still_right(scene):
    probe = _estimator(scene, budget_gb=None)
    (rgb, depth, mask), gt = scene["frames"][0]
    # what the estimator says registration needs at 0.7 x the resolution: less than at full
    budget_gb = probe.required_budget_gb(rgb, depth, scene["K"], mask, scale=0.7)
    assert budget_gb < probe.required_budget_gb(rgb, depth, scene["K"], mask)
    est = _estimator(scene, budget_gb=budget_gb)
    with pytest.warns(UserWarning, match="downscal"):
        res = est.register(rgb, depth, scene["K"], mask)
    assert 0.65 < res.report.downscale_factor < 1.0
    assert "full resolution" in res.report.downscale_reason
    assert res.report.total_peak_bytes <= res.report.budget_bytes
    # metric pose in the original camera
    assert _add_ratio(res.pose, gt, scene["mesh"]) < 0.1


def test_budget_too_small_names_the_minimum(scene):
    est = _estimator(scene, budget_gb=1e-4)
    with pytest.raises(BudgetTooSmall) as info:
        _register(est, scene)
    assert info.value.minimum_bytes > 1e-4 * 2**30
    assert f"{info.value.minimum_gb:.3f} GiB" in str(info.value)


def test_bad_input_is_rejected_before_any_work(scene):
    est = _estimator(scene)
    (rgb, depth, mask), _ = scene["frames"][0]
    with pytest.raises(ValueError, match="mask"):
        est.register(rgb, depth, scene["K"], np.zeros_like(mask))
    with pytest.raises(ValueError, match="millimetres"):
        est.register(rgb, depth * 1000, scene["K"], mask)
    with pytest.raises(ValueError, match="K"):
        est.register(rgb, depth, scene["K"][:2], mask)
    with pytest.raises(ValueError, match="refine_iterations"):
        PoseEstimator(scene["mesh"], budget_gb=None, device="cpu", refine_iterations=-1)


def test_weights_folder_selects_the_learned_pair(scene, tmp_path):
    """weights=DIR loads chunkpose.pipeline.learned; random weights give some finite pose."""
    from chunkpose.models.checkpoint import save_weights
    from chunkpose.models.refine_net import RefineNet
    from chunkpose.models.score_net import ScoreNetMultiPair
    from chunkpose.pipeline.learned import LearnedRefiner, LearnedScorer

    torch.manual_seed(0)
    save_weights(tmp_path / "weights", RefineNet().eval(), ScoreNetMultiPair().eval())
    est = _estimator(scene, budget_gb=None, weights=tmp_path / "weights", hypotheses=2, refine_iterations=1)
    assert isinstance(est.refiner, LearnedRefiner) and isinstance(est.scorer, LearnedScorer)
    res = _register(est, scene)
    assert np.isfinite(res.pose).all() and np.isfinite(res.score)
    assert "refine.learned" in res.report.stages


def test_only_the_roi_goes_on_the_device(scene):
    """A small object in a large frame: the call's measured peak stays far below even one
    full-frame xyz map (the frame stays on the host; only the ROI is uploaded)."""
    (rgb, depth, mask), gt = scene["frames"][0]
    big_h, big_w, ox, oy = 1200, 1600, 700, 500
    big_rgb = np.full((big_h, big_w, 3), 90, np.uint8)
    big_depth = np.full((big_h, big_w), 0.65, np.float32)
    big_mask = np.zeros((big_h, big_w), bool)
    big_rgb[oy:oy + H, ox:ox + W] = rgb
    big_depth[oy:oy + H, ox:ox + W] = depth
    big_mask[oy:oy + H, ox:ox + W] = mask
    K = scene["K"].copy()
    K[0, 2] += ox
    K[1, 2] += oy
    est = _estimator(scene, budget_gb=1.0)
    res = est.register(big_rgb, big_depth, K, big_mask)
    assert _add_ratio(res.pose, gt, scene["mesh"]) < 0.02
    assert res.report.peak_bytes < big_h * big_w * 12
