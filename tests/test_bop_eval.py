"""BOP19 evaluation checked against hand-computed cases: symmetries, MSSD, MSPD, VSD,
matching, recall and average recall, and a whole run on a synthetic BOP set (detections
with wrong, missing and low-score entries, no scene_gt.json on the run side)."""
import json
import math

import numpy as np
import pytest

from bop_synthetic import TARGETS, make_scenes, wrong_mask, write_sets
import trimesh
from scipy.spatial.transform import Rotation

from chunkpose.bop_eval import errors as E
from chunkpose.bop_eval.matching import greedy_match, top_estimates, valid_gt
from chunkpose.bop_eval.scores import ObjectErrors, average_recall, recall, recall_grid
from chunkpose.io.bop_reader import bop_symmetry_transforms

CUBE = np.array([[x, y, z] for x in (-50, 50) for y in (-50, 50) for z in (-50, 50)], float)  # mm
RZ180 = [-1, 0, 0, 0, 0, -1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]


def test_thresholds_are_bops():
    assert len(E.VSD_TAUS) == len(E.VSD_THRESHOLDS) == len(E.MSSD_THRESHOLDS) == 10
    assert E.MSSD_THRESHOLDS[0] == 0.05 and E.MSSD_THRESHOLDS[-1] == pytest.approx(0.5)
    assert E.MSPD_THRESHOLDS == (5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0)


def test_eval_symmetries_discretise_like_bop19():
    assert np.allclose(E.eval_symmetries({}), np.eye(4)[None])
    discrete = E.eval_symmetries({"symmetries_discrete": [RZ180]})
    assert discrete.shape == (2, 4, 4) and np.allclose(discrete[1], np.array(RZ180).reshape(4, 4))
    continuous = {"symmetries_continuous": [{"axis": [0, 0, 1], "offset": [0, 0, 10]}]}
    syms = E.eval_symmetries(continuous)
    assert len(syms) == math.ceil(math.pi / 0.01) == 315  # BOP19: max_sym_disc_step 0.01
    assert np.allclose(syms[0], np.eye(4))
    step = np.degrees(Rotation.from_matrix(syms[1][:3, :3]).magnitude())
    assert step == pytest.approx(360 / 315)
    assert np.allclose(syms[:, :3, :3] @ [0, 0, 10] + syms[:, :3, 3], [0, 0, 10])  # the axis passes the offset
    # registration's set (5 degree steps) is the same construction with another step
    assert len(bop_symmetry_transforms(continuous, scale=1.0)) == 72
    both = E.eval_symmetries({"symmetries_discrete": [RZ180], **continuous})
    assert len(both) == 2 * 315


def test_mssd_mspd_of_translations_closed_form():
    K = np.array([[600.0, 0, 320], [0, 600.0, 240], [0, 0, 1]])
    syms = E.eval_symmetries({})
    R, t = np.eye(3), np.array([0.0, 0.0, 1000.0])
    # every vertex moves by the offset: MSSD is its length
    assert E.mssd(R, t + [10, 0, 0], R, t, CUBE, syms) == pytest.approx(10.0)
    # sideways: du = fx dx / z, largest for the nearest vertices (z = 950)
    assert E.mspd(R, t + [10, 0, 0], R, t, K, CUBE, syms) == pytest.approx(600 * 10 / 950)
    # along the axis: du = fx x (1/z - 1/(z + 20)), largest at |x| = |y| = 50, z = 950
    moved = E.mspd(R, t + [0, 0, 20], R, t, K, CUBE, syms)
    du = 600 * 50 * (1 / 950 - 1 / 970)
    assert E.mssd(R, t + [0, 0, 20], R, t, CUBE, syms) == pytest.approx(20.0)
    assert moved == pytest.approx(math.hypot(du, du))


def test_symmetric_poses_have_zero_error():
    K = np.array([[600.0, 0, 320], [0, 600.0, 240], [0, 0, 1]])
    R_g = Rotation.from_euler("xyz", [20, -30, 50], degrees=True).as_matrix()
    t = np.array([30.0, -20.0, 900.0])
    R_e = R_g @ np.array(RZ180).reshape(4, 4)[:3, :3]
    syms = E.eval_symmetries({"symmetries_discrete": [RZ180]})
    assert E.mssd(R_e, t, R_g, t, CUBE, syms) == pytest.approx(0.0, abs=1e-9)
    assert E.mspd(R_e, t, R_g, t, K, CUBE, syms) == pytest.approx(0.0, abs=1e-9)
    # without the symmetry the corner (50, 50, z) lands on (-50, -50, z)
    assert E.mssd(R_e, t, R_g, t, CUBE, E.eval_symmetries({})) == pytest.approx(2 * math.hypot(50, 50))
    # continuous symmetry: the residual is the distance to the nearest of the 315 steps
    ring = np.array([[40 * math.cos(a), 40 * math.sin(a), z] for a in np.linspace(0, 2 * np.pi, 24, endpoint=False)
                     for z in (-30, 30)])
    cont = E.eval_symmetries({"symmetries_continuous": [{"axis": [0, 0, 1], "offset": [0, 0, 0]}]})
    R_e = R_g @ Rotation.from_euler("z", 7, degrees=True).as_matrix()
    residual = min(abs(7 - k * 360 / 315) for k in range(316))
    assert E.mssd(R_e, t, R_g, t, ring, cont) == pytest.approx(2 * 40 * math.sin(math.radians(residual) / 2))


def test_vsd_depth_offset_and_occlusion_closed_form():
    """A 10x10 px square at 1000 mm, 2 columns hidden by an occluder at 800 mm; the
    estimate is 22 mm deeper (0.22 diameters): its own pixels fail the visibility test but
    those the GT sees are kept, so the union is the 80 visible px, all off by 0.22."""
    K = np.array([[1e6, 0, 0], [0, 1e6, 0], [0, 0, 1]])  # distance == depth at this focal length
    gt = np.zeros((12, 16))
    gt[1:11, 1:11] = 1000.0
    test = np.where(gt > 0, gt, 2000.0)
    test[1:11, 1:3] = 800.0
    est = np.where(gt > 0, 1022.0, 0.0)
    errors = E.vsd_from_depths(est, gt, test, K, 15.0, E.VSD_TAUS, diameter=100.0)
    assert errors == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # taus 0.05..0.2 vs 0.25..0.5
    # 3 px to the right at the same depth, no depth measured around: union 13x10, inter 7x10
    shifted = np.zeros_like(gt)
    shifted[1:11, 4:14] = 1000.0
    assert E.vsd_from_depths(shifted, gt, np.where(gt > 0, gt, 0.0), K, 15.0, E.VSD_TAUS, 100.0) == \
        pytest.approx([60 / 130] * 10)
    assert E.vsd_from_depths(np.zeros_like(gt), np.zeros_like(gt), test, K, 15.0, E.VSD_TAUS, 100.0) == [1.0] * 10


@pytest.mark.gl
def test_vsd_of_a_rendered_square_shifted_sideways():
    """A 0.2 m square at 1 m, fx = 100: u in 10..30, which bop_toolkit's pixel grid (pixel i
    centred at u = i + 0.5) draws as columns 10..29; the estimate 4 cm to the side covers
    14..33. VSD = (union - intersection) / union = (24 - 16) / 24 at every tau."""
    from chunkpose.io.mesh import load_mesh
    from chunkpose.ops.render import make_renderer

    quad = trimesh.Trimesh([[-0.1, -0.1, 0], [0.1, -0.1, 0], [0.1, 0.1, 0], [-0.1, 0.1, 0]],
                           [[0, 1, 2], [0, 2, 3], [0, 2, 1], [0, 3, 2]], process=False)
    mesh = load_mesh(quad)
    renderer = make_renderer(mesh, "cpu", backend="gl")
    K = np.array([[100.0, 0, 20.0], [0, 100.0, 20.0], [0, 0, 1]])
    gt_pose, est_pose = np.eye(4), np.eye(4)
    gt_pose[2, 3] = est_pose[2, 3] = 1.0
    est_pose[0, 3] = 0.04
    render_gt = E.render_in_image(renderer, mesh.vertices, gt_pose, K, 48, 48)
    render_est = E.render_in_image(renderer, mesh.vertices, est_pose, K, 48, 48)
    test = np.zeros((48, 48))
    x0, y0, w, h = render_gt[1]
    test[y0:y0 + h, x0:x0 + w] = render_gt[0]
    assert (test > 0).sum() == 400 and (test[10:30, 10:30] > 0).sum() == 400
    errors = E.vsd_from_renders(render_est, render_gt, test, K, 15.0, E.VSD_TAUS, 200 * math.sqrt(2))
    assert errors == pytest.approx([8 / 24] * 10)
    assert E.vsd_from_renders(render_gt, render_gt, test, K, 15.0, E.VSD_TAUS, 282.8) == [0.0] * 10


@pytest.mark.gl
def test_renders_fall_on_bop_toolkits_pixel_grid():
    """bop_toolkit's renderers centre pixel i at u = i + 0.5: a square spanning u, v in
    10.2 .. 30.2 covers pixels 10..29 there (centres 10.5 .. 29.5), not 11..30."""
    from chunkpose.io.mesh import load_mesh
    from chunkpose.ops.render import make_renderer

    quad = trimesh.Trimesh([[-0.1, -0.1, 0], [0.1, -0.1, 0], [0.1, 0.1, 0], [-0.1, 0.1, 0]],
                           [[0, 1, 2], [0, 2, 3], [0, 2, 1], [0, 3, 2]], process=False)
    mesh = load_mesh(quad)
    K = np.array([[100.0, 0, 20.2], [0, 100.0, 20.2], [0, 0, 1]])
    pose = np.eye(4)
    pose[2, 3] = 1.0
    depth, (x0, y0, w, h) = E.render_in_image(make_renderer(mesh, "cpu", backend="gl"), mesh.vertices, pose, K, 48, 48)
    image = np.zeros((48, 48))
    image[y0:y0 + h, x0:x0 + w] = depth
    expected = np.zeros((48, 48), bool)
    expected[10:30, 10:30] = True
    np.testing.assert_array_equal(image > 0, expected)


def test_bop_shortcuts():
    assert E.centres_within_diameter([0, 0, 1000], [0, 0, 1099], 100) and not \
        E.centres_within_diameter([0, 0, 1000], [0, 0, 1100], 100)
    assert E.sphere_projections_overlap([0, 0, 1000], [99, 0, 1000], 50)
    assert not E.sphere_projections_overlap([0, 0, 1000], [101, 0, 1000], 50)


def test_valid_gt_most_visible_per_target():
    obj_ids, visib = [1, 1, 1, 2, 3], [0.05, 0.8, 0.3, 0.9, 0.5]
    targets = {1: 2, 2: 1}  # object 3 is no target
    assert valid_gt(obj_ids, visib, targets).tolist() == [False, True, True, True, False]
    assert valid_gt(obj_ids, visib, targets, visib_gt_min=0.1).tolist() == [False, True, True, True, False]
    assert valid_gt(obj_ids, visib, {1: 1}).tolist() == [False, True, False, False, False]
    assert valid_gt([1, 1], [0.5, 0.5], {1: 1}).tolist() == [True, False]  # ties: the first


def test_greedy_matching_is_one_to_one_by_score():
    # two estimates, both correct for the single instance: only the higher score matches
    assert greedy_match([0.3, 0.9], [[0.1], [0.2]], 0.5).tolist() == [-1, 0]
    # the best-scored estimate takes the instance it fits best; the next one the other
    assert greedy_match([0.9, 0.8], [[0.1, 0.05], [0.01, 0.3]], 0.5).tolist() == [1, 0]
    # strictly below the threshold
    assert greedy_match([0.9], [[0.5]], 0.5).tolist() == [-1]
    # invalid instances are never taken, even with a smaller error
    assert greedy_match([0.9], [[0.01, 0.2]], 0.5, gt_valid=[False, True]).tolist() == [1]
    assert top_estimates([0.2, 0.9, 0.5, 0.9], 2) == [1, 3]


def test_top_n_keeps_the_higher_score():
    """One instance (inst_count 1), two estimates: only the higher-scored one is evaluated."""
    wrong_first = ObjectErrors(1, 0, 1, [0.9], [[0.8]], [True])  # the 0.1-scored right one was cut
    right_first = ObjectErrors(1, 0, 1, [0.9], [[0.01]], [True])
    assert recall([wrong_first], 0.5) == 0.0 and recall([right_first], 0.5) == 1.0


def test_average_recall_by_hand():
    """4 targets: A matched below 0.12 (8 of 10 thresholds), B's first instance below 0.3
    (4 of 10), B's second never, C (no estimate) never: AR = (8 + 4) / (10 x 4)."""
    entries = [
        ObjectErrors(1, 0, 1, [0.9], [[0.12]], [True]),
        ObjectErrors(1, 1, 1, [0.7], [[0.3, np.inf]], [True, True]),
        ObjectErrors(1, 2, 2, [], np.zeros((0, 1)), [True]),
        ObjectErrors(1, 2, 3, [0.5], [[0.01]], [False]),  # no valid instance: counts nothing
    ]
    assert recall(entries, 0.15) == 0.25 and recall(entries, 0.35) == 0.5
    assert average_recall(entries, E.MSSD_THRESHOLDS) == pytest.approx(12 / 40)
    assert average_recall(entries, E.MSSD_THRESHOLDS, obj_id=1) == pytest.approx(12 / 30)
    vsd = [ObjectErrors(1, 0, 1, [0.9], np.array([[[0.0] * 5 + [1.0] * 5]]), [True])]
    grid = recall_grid(vsd, E.VSD_THRESHOLDS, settings=10)
    assert grid.shape == (10, 10) and grid.mean() == 0.5


@pytest.fixture(scope="module")
def scenes():
    return make_scenes()


@pytest.mark.gl
def test_run_and_evaluate_a_synthetic_bop_set(scenes, tmp_path):
    """Images 0, 1 (mug, object 1) and 2 (duck, object 2) are targets, image 3 is not.
    Detections: image 0 right (and a duck the targets do not ask for), image 1 a wrong mask
    scored 0.8 and the right one scored 0.1, image 2 none, image 3 right. The estimates
    follow: image 0 perfect (plus a worse second one), image 1 two diameters off (plus a
    perfect one scored lower, which top-1 drops), image 3 perfect. So 1 of 3 targets is
    found at every threshold of every metric."""
    from chunkpose.bop_eval import evaluate, format_table, plot
    from chunkpose.io import bop, bop_results
    from chunkpose.io.bop_reader import BOPReader
    from chunkpose.io.results import bop_csv_row, write_bop_csv

    gt_root, run_root, det_path = write_sets(scenes, tmp_path)
    targets = TARGETS
    wrong = wrong_mask(scenes)

    # the run side: no ground truth, targets from the dataset, masks from the detections
    reader = BOPReader(run_root, scene_id=1)
    assert not reader.has_ground_truth()
    detections = bop.read_detections(det_path)
    chosen = bop.select_detections(detections, bop.read_targets(bop.default_targets_path(run_root)))
    assert list(chosen) == [(1, 0), (1, 1), (1, 2)]
    assert [(d.obj_id, d.score) for d in chosen[(1, 0)]] == [(1, 0.9)]
    assert [(d.obj_id, d.score) for d in chosen[(1, 1)]] == [(1, 0.8)]
    assert chosen[(1, 2)] == []
    masks = {}
    for (_, im_id), dets_of_image in chosen.items():
        frame = reader.image(reader.index_of(im_id))
        masks[im_id] = [inst.mask for inst in reader.detection_instances(frame, dets_of_image)]
    np.testing.assert_array_equal(masks[0][0], scenes[0].masks[0])
    np.testing.assert_array_equal(masks[1][0], wrong)
    assert masks[2] == []

    # the estimates (as registration from those masks would give them), time = pose + detection
    def time_of(im_id):
        return 1.0 + bop.image_detection_time(detections.get((1, im_id), [])) if (1, im_id) in detections else 1.0

    diameter = scenes[1].mesh.diameter
    far = scenes[1].poses[0].copy()
    far[0, 3] += 2 * diameter
    worse = scenes[0].poses[0].copy()
    worse[:3, 3] *= 1.5
    rows = [
        bop_csv_row(1, 0, 1, 0.9, scenes[0].poses[0], time_of(0)),
        bop_csv_row(1, 0, 1, 0.5, worse, time_of(0)),
        bop_csv_row(1, 1, 1, 0.8, far, time_of(1)),
        bop_csv_row(1, 1, 1, 0.1, scenes[1].poses[0], time_of(1)),
        bop_csv_row(1, 3, 2, 0.9, scenes[3].poses[0], time_of(3)),
    ]
    csv_path = tmp_path / bop_results.results_filename("chunkpose", run_root)
    write_bop_csv(csv_path, rows)
    assert csv_path.name == "chunkpose_ycbv-test.csv"
    assert bop_results.check_bop_results(csv_path) == []
    header, first = csv_path.read_text().splitlines()[:2]
    assert header == bop_results.RESULTS_HEADER and first.count(",") == 6 and len(first.split(",")[4].split()) == 9

    result = evaluate(gt_root, csv_path)
    assert (result["targets"], result["estimates"], result["rows"], result["images"]) == (3, 2, 5, 3)
    for key in ("AR_VSD", "AR_MSSD", "AR_MSPD", "AR", "ADD(-S)_recall_0.1d"):
        assert result[key] == pytest.approx(1 / 3), key
    # the perfect estimate's ADD is ~1e-7 m (CSV rounding): recall 0 at 0 m, 1 from 1 mm on
    assert result["ADD(-S)_AUC"] == pytest.approx((1 - 0.5 * 0.001 / 0.1) / 3, abs=1e-9)
    assert result["per_object"][1]["AR"] == pytest.approx(0.5) and result["per_object"][1]["targets"] == 2
    assert result["per_object"][2]["AR"] == 0.0 and result["per_object"][2]["targets"] == 1
    assert result["time_per_image"] == pytest.approx(1.2)
    assert result["curves"]["MSSD"]["recall"] == pytest.approx([1 / 3] * 10)
    assert (result["method"], result["dataset"], result["vsd_delta_mm"]) == ("chunkpose", "ycbv", 15.0)
    table = format_table(result)
    assert "all" in table and "0.333" in table and "chunkpose on ycbv-test" in table
    png = plot(result, tmp_path / "recall.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(result)  # plain numbers only: the command line can print it as JSON

    # the older rule (visib_fract >= 0.1) and derived targets give the same on this set
    assert evaluate(gt_root, csv_path, visib_gt_min=0.1)["AR"] == pytest.approx(1 / 3)
    (gt_root / "test_targets_bop19.json").unlink()
    with pytest.warns(UserWarning, match="visib_fract >= 0.1"):
        derived = evaluate(gt_root, csv_path)
    assert derived["targets"] == 4 and derived["AR"] == pytest.approx(2 / 4)  # image 3 is now a target
    # without scene_gt_info.json the visibility is computed as calc_gt_info does
    bop.write_targets(gt_root / "test_targets_bop19.json", targets)
    (gt_root / "test" / "000001" / "scene_gt_info.json").unlink()
    with pytest.warns(UserWarning, match="calc_gt_info"):
        assert evaluate(gt_root, csv_path)["AR"] == pytest.approx(1 / 3)
