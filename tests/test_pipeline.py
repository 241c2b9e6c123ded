"""Pipeline building blocks: hypotheses, input checks, frame preparation, the geometric
refiner/scorer ops (CPU, small crops)."""
import math

import numpy as np
import pytest
import torch

from chunkpose.ops.crops import crop_windows
from chunkpose.ops.geometry import rotation_angle, so3_exp
from chunkpose.pipeline import frame as framing
from chunkpose.pipeline.hypotheses import icosphere_vertices, initial_poses, rotation_hypotheses, translation_guess
from chunkpose.pipeline.roi import CallRegion

# ----------------------------------------------------------------------------- hypotheses


def test_icosphere_has_42_unit_views_at_subdivision_1():
    v = icosphere_vertices(1)
    assert v.shape == (42, 3)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
    assert len(np.unique(np.round(v, 6), axis=0)) == 42


def test_252_rotation_hypotheses_are_distinct_and_cover_so3():
    R = rotation_hypotheses(252, dtype=torch.float64)
    assert R.shape == (252, 3, 3)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(252, 3, 3), atol=1e-12)
    rel = (R[:, None].transpose(-1, -2) @ R[None]).reshape(-1, 3, 3)
    d = rotation_angle(rel).reshape(252, 252) + torch.eye(252, dtype=torch.float64) * 10
    assert d.min() > math.radians(25)  # clustering at 30 deg would keep all of them
    g = torch.Generator().manual_seed(1)
    Rr = so3_exp(torch.randn(500, 3, generator=g, dtype=torch.float64) * 3)
    nearest = rotation_angle((Rr[:, None].transpose(-1, -2) @ R[None]).reshape(-1, 3, 3)).reshape(500, 252).min(1).values
    assert nearest.max() < math.radians(36)  # any rotation is within ~34 deg of a hypothesis


def test_fewer_hypotheses_for_tests():
    assert rotation_hypotheses(12).shape == (12, 3, 3)
    assert rotation_hypotheses(1).shape == (1, 3, 3)
    with pytest.raises(ValueError, match="hypotheses"):
        rotation_hypotheses(0)


def test_translation_guess_is_bbox_centre_at_median_depth():
    K = np.array([[100.0, 0, 50], [0, 100.0, 40], [0, 0, 1]])
    mask = np.zeros((80, 100), bool)
    mask[20:31, 60:81] = True  # bbox centre (70, 25)
    depth = np.zeros((80, 100), np.float32)
    depth[mask] = 0.5
    depth[20, 60] = 0.9  # the median ignores one outlier
    t = translation_guess(mask, depth, K)
    assert np.allclose(t, [(70 - 50) * 0.5 / 100, (25 - 40) * 0.5 / 100, 0.5])
    poses = initial_poses(t, 6)
    assert poses.shape == (6, 4, 4) and torch.allclose(poses[:, :3, 3], torch.tensor(t, dtype=torch.float32).expand(6, 3))


# ----------------------------------------------------------------------------- input checks


def _good(H=24, W=32):
    rgb = np.zeros((H, W, 3), np.uint8)
    depth = np.full((H, W), 0.8, np.float32)
    K = np.array([[50.0, 0, W / 2], [0, 50.0, H / 2], [0, 0, 1]])
    mask = np.zeros((H, W), bool)
    mask[8:16, 10:20] = True
    return rgb, depth, K, mask


def test_good_input_passes_and_nan_depth_becomes_missing():
    rgb, depth, K, mask = _good()
    depth[0, 0] = np.nan
    rgb2, depth2, K2, mask2 = framing.validate_inputs(rgb, depth, K, mask.astype(np.uint8))
    assert depth2.dtype == np.float32 and depth2[0, 0] == 0 and mask2.dtype == bool and mask2.sum() == mask.sum()
    assert K2.dtype == np.float64


def _bad_cases():
    rgb, depth, K, mask = _good()
    cases = {
        "rgb_shape": ((rgb[..., 0], depth, K, mask), "rgb"),
        "rgb_float": ((rgb.astype(np.float32) / 255, depth, K, mask), "rgb"),
        "depth_shape": ((rgb, depth[:-1], K, mask), "depth"),
        "depth_3d": ((rgb, np.stack([depth] * 2, -1), K, mask), "depth"),
        "depth_uint16": ((rgb, (depth * 1000).astype(np.uint16), K, mask), "depth"),
        "depth_all_zero": ((rgb, np.zeros_like(depth), K, mask), "depth"),
        "depth_all_nan": ((rgb, np.full_like(depth, np.nan), K, mask), "depth"),
        "depth_millimetres": ((rgb, depth * 1000, K, mask), "millimetres"),
        "K_shape": ((rgb, depth, K[:2], mask), "K"),
        "K_flat": ((rgb, depth, K.ravel(), mask), "K"),
        "K_negative_focal": ((rgb, depth, np.diag([-50.0, 50.0, 1.0]), mask), "K"),
        "K_zero_focal": ((rgb, depth, np.diag([50.0, 0.0, 1.0]), mask), "K"),
        "K_nan": ((rgb, depth, np.full((3, 3), np.nan), mask), "K"),
        "mask_empty": ((rgb, depth, K, np.zeros_like(mask)), "mask"),
        "mask_size": ((rgb, depth, K, mask[:-2]), "mask"),
        "mask_rgb": ((rgb, depth, K, np.stack([mask] * 3, -1)), "mask"),
        "mask_no_depth": ((rgb, np.where(mask, 0, depth).astype(np.float32), K, mask), "mask"),
        "mask_missing": ((rgb, depth, K, None), "mask"),
    }
    return cases


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_input_raises_value_error_naming_the_argument(case):
    args, word = _bad_cases()[case]
    with pytest.raises(ValueError, match=word):
        framing.validate_inputs(*args)


def test_resize_inputs_scales_K_and_keeps_nearest_values():
    rgb, depth, K, mask = _good(40, 60)
    depth[10, 10] = 0.5
    r, d, K2, m = framing.resize_inputs(rgb, depth, K, mask, 0.5)
    assert r.shape == (20, 30, 3) and d.shape == (20, 30) and m.shape == (20, 30) and m.dtype == bool
    assert set(np.unique(d)) <= set(np.unique(depth))  # nearest: no new depth values
    assert np.allclose(K2[:2], K[:2] * 0.5) and np.allclose(K2[2], K[2])


# ----------------------------------------------------------------------------- frame preparation


def test_prepared_roi_equals_full_frame_cleaning_inside_the_roi():
    from chunkpose.engine import Engine
    from chunkpose.ops.depth import bilateral_filter_depth, erode_depth

    rng = np.random.default_rng(0)
    H, W = 60, 80
    depth = (0.7 + 0.002 * rng.standard_normal((H, W))).astype(np.float32)
    depth[20:35, 30:50] -= 0.1  # an object in front: edges that erosion acts on
    depth[rng.uniform(size=(H, W)) < 0.1] = 0  # holes that the bilateral filter fills
    rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), bool)
    mask[20:35, 30:50] = True
    K = np.array([[70.0, 0, 41.5], [0, 70.0, 29.5], [0, 0, 1]])
    roi = (25, 15, 57, 41)
    frame = framing.prepare_frame(rgb, depth, K, mask, CallRegion.of_box(roi, (H, W), True), 0.1, Engine(None), "cpu")
    full = bilateral_filter_depth(erode_depth(torch.from_numpy(depth)))
    x0, y0, x1, y1 = roi
    assert frame.origin == (x0, y0) and frame.full_size == (H, W)
    assert torch.equal(frame.depth, full[y0:y1, x0:x1])
    assert frame.rgb.dtype == torch.uint8 and torch.equal(frame.rgb, torch.from_numpy(rgb[y0:y1, x0:x1]).permute(2, 0, 1))
    assert torch.equal(frame.mask, torch.from_numpy(mask[y0:y1, x0:x1]))
    # The same region cleaned on demand at the pixels crops sample gives the same points.
    lazy = framing.prepare_frame(rgb, depth, K, None, CallRegion.of_box(roi, (H, W), False, on_demand=True), 0.1,
                                 Engine(None), "cpu")
    assert lazy.depth.shape == (41 - 15 + 8, 57 - 25 + 8) and lazy.on_demand is not None
    windows = crop_windows(torch.tensor([[[1.0, 0, 0, -0.02], [0, 1.0, 0, 0.0], [0, 0, 1.0, 0.6], [0, 0, 0, 1.0]],
                                         [[1.0, 0, 0, 0.01], [0, 1.0, 0, 0.01], [0, 0, 1.0, 0.62], [0, 0, 0, 1.0]]]),
                           K, 0.15, 1.2, size=24)
    for semantics in ("refiner", "scorer"):
        assert torch.equal(lazy.xyz_crops(windows.transforms, 24, semantics),
                           frame.xyz_crops(windows.transforms, 24, semantics))


# ----------------------------------------------------------------------------- geometric ops


@pytest.fixture(scope="module")
def small_setup():
    """A tiny rendered scene: an asymmetric object over a plane, its frame and renderer."""
    from chunkpose.engine import Engine
    from chunkpose.io.mesh import load_mesh
    from chunkpose.ops.render import make_renderer
    from chunkpose.shapes import builtin_meshes

    mesh = load_mesh(builtin_meshes()["duck"]).centered()
    renderer = make_renderer(mesh, "cpu")
    W, H = 256, 192
    K = np.array([[300.0, 0, 128], [0, 300.0, 96], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = so3_exp(torch.tensor([[0.4, -0.9, 0.3]], dtype=torch.float64))[0].numpy()
    pose[:3, 3] = [0.01, -0.005, 0.42]
    out = renderer.render_full(pose, K, W, H)
    m = out["mask"][0].numpy()
    depth = np.where(m, out["depth"][0].numpy(), 0.6).astype(np.float32)
    rgb = (out["rgb"][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    frame = framing.prepare_frame(rgb, depth, K, m, CallRegion.of_box((0, 0, W, H), (H, W), True), mesh.diameter,
                                  Engine(None), "cpu")
    return dict(mesh=mesh, renderer=renderer, frame=frame, pose=torch.tensor(pose, dtype=torch.float32))


def _perturbed(pose, angles_deg, shift):
    g = torch.Generator().manual_seed(3)
    out = []
    for a in angles_deg:
        w = torch.nn.functional.normalize(torch.randn(1, 3, generator=g), dim=1) * math.radians(a)
        p = pose.clone()
        p[:3, :3] = so3_exp(w)[0] @ p[:3, :3]
        p[:3, 3] += torch.tensor(shift)
        out.append(p)
    return torch.stack(out)


def _add(P, gt, vertices):
    v = torch.as_tensor(vertices, dtype=torch.float32)
    a = v @ P[:, :3, :3].transpose(1, 2) + P[:, None, :3, 3]
    b = v @ gt[:3, :3].T + gt[:3, 3]
    return (a - b).norm(dim=-1).mean(-1)


def test_geometric_refiner_converges_from_nearby_poses(small_setup):
    from chunkpose.engine import Engine
    from chunkpose.pipeline.geometric import GeometricRefiner

    s = small_setup
    P0 = _perturbed(s["pose"], [5, 10, 15], [0.005, -0.004, -0.01])
    P = GeometricRefiner(crop_size=64).refine(P0, s["frame"], s["renderer"], Engine(None), 4)
    before = _add(P0, s["pose"], s["mesh"].vertices) / s["mesh"].diameter
    after = _add(P, s["pose"], s["mesh"].vertices) / s["mesh"].diameter
    assert (before > 0.05).all()
    assert (after < 0.02).all(), after


def test_icp_step_result_does_not_depend_on_the_slicing(small_setup):
    from chunkpose.ops.crops import crop_windows
    from chunkpose.pipeline.geometric import GeometricRefiner, icp_step

    s = small_setup
    ref = GeometricRefiner(crop_size=48)
    P0 = _perturbed(s["pose"], [0, 8, 20, 40], [0.0, 0.003, -0.02])
    T = crop_windows(P0, s["frame"].K, s["frame"].diameter, ref.crop_ratio, size=48).transforms
    kwargs = dict(frame=s["frame"], renderer=s["renderer"], size=48, thresholds=(0.05, 0.02, 0.01),
                  align_to=(128.0, 96.0), damping=1e-3, min_pairs=10, max_rotation=0.35, max_translation=0.05,
                  search_radius=2)
    whole = icp_step(P0, T, **kwargs)
    parts = torch.cat([icp_step(P0[i:i + 1], T[i:i + 1], **kwargs) for i in range(len(P0))])
    assert torch.allclose(whole, parts, atol=1e-5)


def test_geometric_scorer_prefers_the_true_pose(small_setup):
    from chunkpose.engine import Engine
    from chunkpose.pipeline.geometric import GeometricScorer

    s = small_setup
    P = torch.cat([s["pose"][None], _perturbed(s["pose"], [4, 15, 40, 90], [0.002, 0.0, 0.004])])
    scores = GeometricScorer(crop_size=64).score(P, s["frame"], s["renderer"], Engine(None))
    assert scores.shape == (5,)
    assert int(scores.argmax()) == 0
    assert scores[0] > scores[2] > scores[4]


def test_geometric_scorer_gives_symmetric_poses_equal_scores():
    """A cylinder turned about its axis looks the same: same score, nothing breaks."""
    import trimesh

    from chunkpose.engine import Engine
    from chunkpose.io.mesh import load_mesh
    from chunkpose.ops.render import make_renderer
    from chunkpose.pipeline.geometric import GeometricRefiner, GeometricScorer

    mesh = load_mesh(trimesh.creation.cylinder(radius=0.04, height=0.1, sections=64)).centered()
    renderer = make_renderer(mesh, "cpu")
    K = np.array([[150.0, 0, 80], [0, 150.0, 60], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = so3_exp(torch.tensor([[1.0, 0.2, 0.0]], dtype=torch.float64))[0].numpy()
    pose[:3, 3] = [0, 0, 0.45]
    out = renderer.render_full(pose, K, 160, 120)
    m = out["mask"][0].numpy()
    depth = np.where(m, out["depth"][0].numpy(), 0.6).astype(np.float32)
    rgb = np.zeros((120, 160, 3), np.uint8)
    frame = framing.prepare_frame(rgb, depth, K, m, CallRegion.of_box((0, 0, 160, 120), (120, 160), True),
                                  mesh.diameter, Engine(None), "cpu")
    base = torch.tensor(pose, dtype=torch.float32)
    spun = []
    for a in (0.0, 1.0, 2.5):  # rotations about the cylinder's own z axis
        p = base.clone()
        p[:3, :3] = base[:3, :3] @ so3_exp(torch.tensor([[0.0, 0.0, a]]))[0]
        spun.append(p)
    P = torch.stack(spun)
    scores = GeometricScorer(crop_size=64).score(P, frame, renderer, Engine(None))
    assert torch.allclose(scores, scores[0].expand(3), atol=0.02)
    refined = GeometricRefiner(crop_size=64).refine(P, frame, renderer, Engine(None), 2)
    assert torch.isfinite(refined).all()
    assert (refined[:, :3, 3] - base[:3, 3]).norm(dim=1).max() < 0.01


def test_overlapping_regions_merge_and_their_objects_share_one_cleaned_frame():
    from chunkpose.engine import Engine
    from chunkpose.ops.depth import bilateral_filter_depth, erode_depth
    from chunkpose.pipeline.roi import merge_regions

    size = (60, 80)
    a = CallRegion.of_box((5, 5, 30, 30), size, True)
    b = CallRegion.of_box((28, 10, 50, 40), size, True)  # overlaps a
    c = CallRegion.of_box((70, 50, 78, 58), size, True)  # apart
    merged = merge_regions([a, b, c])
    assert [members for _, members in merged] == [[0, 1], [2]]
    assert merged[0][0].roi == (5, 5, 50, 40) and merged[1][0] == c
    assert merge_regions([a]) == [(a, [0])]
    # the objects' frames share the merged region's tensors; each has its own mask and diameter
    rng = np.random.default_rng(1)
    depth = (0.7 + 0.002 * rng.standard_normal(size)).astype(np.float32)
    rgb = rng.integers(0, 255, size + (3,), dtype=np.uint8)
    masks = [np.zeros(size, bool) for _ in range(3)]
    masks[0][10:20, 10:20] = masks[1][15:30, 30:45] = masks[2][52:56, 72:76] = True
    K = np.array([[70.0, 0, 41.5], [0, 70.0, 29.5], [0, 0, 1]])
    engine = Engine(None)
    with engine.call("frame"):
        frames = framing.prepare_frames(rgb, depth, K, masks, [a, b, c], [0.1, 0.2, 0.3], engine, "cpu")
    assert engine.report.stages["depth.erode"].calls == 2  # one clean-up per merged region
    assert frames[0].depth.data_ptr() == frames[1].depth.data_ptr() != frames[2].depth.data_ptr()
    assert [f.diameter for f in frames] == [0.1, 0.2, 0.3]
    full = bilateral_filter_depth(erode_depth(torch.from_numpy(depth)))
    for frame, mask in zip(frames, masks):
        x0, y0, x1, y1 = frame.roi
        assert torch.equal(frame.depth, full[y0:y1, x0:x1])
        assert torch.equal(frame.mask, torch.from_numpy(mask[y0:y1, x0:x1]))
