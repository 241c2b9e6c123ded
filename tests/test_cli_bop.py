"""`chunkpose run --bop` on a BOP test set (no ground truth) from detections, then
`chunkpose eval` of its CSV against the ground truth: targets honoured, BOP19's top-N of
the detections, detection time added, a results name bop_toolkit parses, hand-computed
recalls. The set: tests/bop_synthetic.py."""
import json

import numpy as np
import pytest

from chunkpose import cli
from bop_synthetic import DETECTION_TIME_S, make_scenes, wrong_mask, write_sets
from chunkpose.io import bop_results
from chunkpose.io.results import read_bop_csv
from test_cli import FakeResult

pytestmark = pytest.mark.gl


@pytest.fixture(scope="module")
def scenes():
    return make_scenes()


@pytest.fixture(scope="module")
def dataset(scenes, tmp_path_factory):
    return write_sets(scenes, tmp_path_factory.mktemp("bopcli"))


def oracle(scenes):
    """An estimator that gives the true pose when its mask is an object's true mask, and a
    pose two diameters off otherwise (what registering a wrong mask does)."""
    seen = []

    class Oracle:
        def __init__(self, mesh, **kwargs):
            self.mesh = mesh

        def register(self, rgb, depth, K, mask):
            seen.append(mask)
            for s in scenes:
                if np.array_equal(mask, s.masks[0]):
                    return FakeResult(s.poses[0], 0.7)
            far = scenes[1].poses[0].copy()
            far[0, 3] += 2 * scenes[1].mesh.diameter
            return FakeResult(far, 0.6)

    return Oracle, seen


def test_run_from_detections_then_eval(scenes, dataset, tmp_path, capsys):
    gt_root, run_root, detections = dataset
    factory, seen = oracle(scenes)
    out = tmp_path / "out"
    rc = cli.main(["run", "--bop", str(run_root), "--detections", str(detections), "--method", "chunk-pose",
                   "--out", str(out), "--json"], estimator_factory=factory)
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    csv_path = out / "chunk-pose_ycbv-test.csv"
    assert summary["results_csv"] == str(csv_path.resolve()) or summary["results_csv"].endswith(csv_path.name)
    assert bop_results.parse_results_filename(csv_path) == {**bop_results.parse_results_filename(csv_path),
                                                            "method": "chunk-pose", "dataset": "ycbv", "split": "test"}
    assert bop_results.check_bop_results(csv_path) == []
    rows = read_bop_csv(csv_path)
    # targets honoured: image 3 and image 0's duck are not registered; image 2 has no detection
    assert [(r["im_id"], r["obj_id"]) for r in rows] == [(0, 1), (1, 1)]
    # top-1 of image 1 is the wrong mask scored 0.8, not the right one scored 0.1
    assert len(seen) == 2 and np.array_equal(seen[1], wrong_mask(scenes))
    assert all(r["time"] >= DETECTION_TIME_S for r in rows)  # the detection time is in the image's time
    np.testing.assert_allclose(rows[0]["t"], scenes[0].poses[0][:3, 3] * 1000, atol=1e-3)
    report = json.loads((out / "report.json").read_text())
    assert report["masks"] == "detections" and report["images_total"] == 3 and report["method"] == "chunk-pose"
    assert [f["frame"] for f in report["frames"]] == ["000001_000000_000000", "000001_000001_000000"]
    assert (out / "ob_in_cam" / "000001_000000_000000.txt").is_file() and (out / "vis" / "000001_000001.png").is_file()
    assert not (out / ".image").exists()

    rc = cli.main(["eval", "--bop", str(gt_root), "--results", str(csv_path), "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    # 1 of 3 targets found at every threshold of every metric (image 0); image 1 is 2 d off
    for key in ("AR", "AR_VSD", "AR_MSSD", "AR_MSPD", "ADD(-S)_recall_0.1d"):
        assert line[key] == pytest.approx(1 / 3), key
    assert (line["targets"], line["estimates"], line["images"]) == (3, 2, 3)
    assert "chunk-pose on ycbv-test" in captured.err
    assert json.loads((out / "bop_eval.json").read_text())["per_object"]["1"]["AR"] == pytest.approx(0.5)
    assert (out / "bop_recall.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_bop_input_fails_before_any_output(dataset, tmp_path, capsys):
    gt_root, run_root, detections = dataset
    out = tmp_path / "out"
    # a method name bop_toolkit would misread
    assert cli.main(["run", "--bop", str(run_root), "--detections", str(detections), "--method", "chunk_pose",
                     "--out", str(out)], estimator_factory=oracle([])[0]) == 2
    assert "method" in capsys.readouterr().err and not out.exists()
    # a test set (ground truth withheld) needs detections
    assert cli.main(["run", "--bop", str(run_root), "--out", str(out)], estimator_factory=oracle([])[0]) == 2
    assert "--detections" in capsys.readouterr().err and not out.exists()
    # evaluating needs the ground truth
    csv_path = tmp_path / "chunkpose_ycbv-test.csv"
    csv_path.write_text("scene_id,im_id,obj_id,score,R,t,time\n")
    assert cli.main(["eval", "--bop", str(run_root), "--results", str(csv_path), "--out", str(tmp_path / "ev")]) == 2
    assert "scene_gt.json" in capsys.readouterr().err and not (tmp_path / "ev").exists()


def test_ground_truth_mode_picks_the_most_visible_by_visib_fract():
    """BOP19's valid instances are the inst_count highest by visib_fract: a large, half
    hidden instance (many pixels) loses to a small one in full view."""
    from chunkpose.cli.bop import _largest_per_target
    from chunkpose.io.bop_reader import BopInstance

    big = np.zeros((20, 20), bool)
    big[:10] = True
    small = np.zeros((20, 20), bool)
    small[:2, :2] = True
    half_hidden = BopInstance(1, 0, 5, None, big, visib_fract=0.5)
    in_view = BopInstance(1, 1, 5, None, small, visib_fract=1.0)
    assert _largest_per_target([half_hidden, in_view], {5: 1}) == [in_view]
    no_info = [BopInstance(1, 0, 5, None, big), BopInstance(1, 1, 5, None, small)]
    assert _largest_per_target(no_info, {5: 1}) == no_info[:1]  # by pixels without gt_info
