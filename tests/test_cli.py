"""The command line on tiny scenes: outputs, bad input (one line, exit 2, nothing left
behind), Ctrl-C. The estimator is a stand-in passed to cli.main so that these tests check
the command's own behaviour quickly; tests/test_cli_e2e.py runs the real one."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import trimesh

from chunkpose import cli
from chunkpose.io.results import read_bop_csv
from test_readers import write_bop, write_ycbineoat


class FakeReport:
    def __init__(self, peak):
        self.peak_bytes = peak
        self.downscale_factor = 1.0

    def to_dict(self):
        return {"peak_bytes": self.peak_bytes, "downscale_factor": 1.0,
                "stages": {"refine.render": {"name": "refine.render", "chunk_sizes": [64, 64], "n_chunks": 2,
                                             "items": 128, "peak_bytes": self.peak_bytes}}}

    def summary(self):
        return "refine.render 64x2"


class FakeResult:
    def __init__(self, pose, score):
        self.pose, self.score, self.report = pose, score, FakeReport(1000)


class FakeEstimator:
    """Returns the pose t = (0, 0, 0.5 + 0.01 i) for call i; can raise on a given call."""

    interrupt_on_call = None
    instances = []

    def __init__(self, mesh, **kwargs):
        self.mesh, self.kwargs, self.calls = mesh, kwargs, 0
        FakeEstimator.instances.append(self)

    def _next(self):
        if self.calls == FakeEstimator.interrupt_on_call:
            raise KeyboardInterrupt
        pose = np.eye(4)
        pose[:3, 3] = [0, 0, 0.5 + 0.01 * self.calls]
        self.calls += 1
        return FakeResult(pose, 0.9)

    def register(self, rgb, depth, K, mask):
        assert mask.dtype == bool and mask.any() and depth.dtype == np.float32
        return self._next()

    def track(self, rgb, depth, K, mask=None):
        return self._next()


@pytest.fixture(autouse=True)
def _reset_fake():
    FakeEstimator.interrupt_on_call = None
    FakeEstimator.instances = []


def write_mesh(path, size=0.05):
    trimesh.creation.box(extents=[size, size * 0.6, size * 0.4]).export(path)
    return path


def _leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def scene(tmp_path):
    root = tmp_path / "scene"
    write_ycbineoat(root, frames=3)
    mesh = write_mesh(tmp_path / "mesh.obj")
    return root, mesh


def test_run_writes_poses_pictures_report_and_json(scene, tmp_path, capsys):
    root, mesh = scene
    out = tmp_path / "out"
    rc = cli.main(["run", "--scene", str(root), "--mesh", str(mesh), "--out", str(out), "--json", "--debug", "2",
                   "--budget-gb", "0.5", "--device", "cpu"], estimator_factory=FakeEstimator)
    assert rc == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["command"] == "run" and summary["frames_done"] == 3
    assert summary["budget_bytes"] == int(0.5 * 2**30)
    est = FakeEstimator.instances[0]
    assert est.kwargs["budget_gb"] == 0.5 and est.kwargs["refine_iterations"] == 5 and est.kwargs["track_iterations"] == 2
    for i in range(3):
        pose = np.loadtxt(out / "ob_in_cam" / f"{i:06d}.txt")
        assert pose.shape == (4, 4) and pose[2, 3] == pytest.approx(0.5 + 0.01 * i)
        assert cv2.imread(str(out / "vis" / f"{i:06d}.png")).shape == (48, 64, 3)
    report = json.loads((out / "report.json").read_text())
    assert [f["stage"] for f in report["frames"]] == ["register", "track", "track"]
    # the fake returns exactly the annotated poses: errors are 0
    assert all(f["add"] == pytest.approx(0, abs=1e-9) and f["add_s"] == pytest.approx(0, abs=1e-9) for f in report["frames"])
    assert report["summary"]["add_auc"] == pytest.approx(1.0)
    assert report["frames"][0]["peak_bytes"] == 1000 and report["frames"][0]["chunk_plan"]
    assert (out / "debug" / "000000" / "scene_raw.ply").stat().st_size > 100
    obj = (out / "debug" / "000000" / "model_tf.obj").read_text()
    assert obj.count("\nv ") == 8 and obj.count("\nf ") == 12
    assert _leftovers(tmp_path) == []


def test_rerun_replaces_own_output_but_refuses_foreign_folder(scene, tmp_path, capsys):
    root, mesh = scene
    out = tmp_path / "out"
    args = ["run", "--scene", str(root), "--mesh", str(mesh), "--out", str(out), "--frames", "1"]
    assert cli.main(args, estimator_factory=FakeEstimator) == 0
    assert cli.main(args, estimator_factory=FakeEstimator) == 0
    assert sorted(p.name for p in (out / "ob_in_cam").iterdir()) == ["000000.txt"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    capsys.readouterr()
    rc = cli.main(args[:-4] + ["--out", str(foreign)], estimator_factory=FakeEstimator)
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]


def _break(case, root, mesh, tmp_path):
    """Damage the scene for one bad-input case; returns the --mesh to pass."""
    if case == "missing_folder":
        import shutil

        shutil.rmtree(root)
    elif case == "missing_cam_K":
        (root / "cam_K.txt").unlink()
    elif case == "unreadable_image":
        (root / "rgb" / "000000.png").write_bytes(b"\x89PNG broken")
    elif case == "size_mismatch":
        cv2.imwrite(str(root / "masks" / "000000.png"), np.full((24, 64), 255, np.uint8))
    elif case == "no_first_mask":
        (root / "masks" / "000000.png").unlink()
    elif case == "mesh_in_millimetres":
        return write_mesh(tmp_path / "mesh_mm.ply", size=50.0)
    elif case == "float_depth":
        (root / "depth" / "000000.png").unlink()
        cv2.imwrite(str(root / "depth" / "000000.tif"), np.full((48, 64), 0.5, np.float32))
    elif case == "empty_mask":
        cv2.imwrite(str(root / "masks" / "000000.png"), np.zeros((48, 64), np.uint8))
    elif case == "unreadable_later_frame":
        (root / "rgb" / "000002.png").write_bytes(b"garbage")
    return mesh


BAD_INPUT = [
    ("missing_folder", "does not exist"),
    ("missing_cam_K", "cam_K.txt"),
    ("unreadable_image", "cannot read image"),
    ("size_mismatch", "same size"),
    ("no_first_mask", "no mask for frame 000000"),
    ("mesh_in_millimetres", "--mesh-scale 0.001"),
    ("float_depth", "uint16 millimetres"),
    ("empty_mask", "empty"),
    ("unreadable_later_frame", "cannot read image"),  # found mid-run: still nothing left behind
]


@pytest.mark.parametrize("case, words", BAD_INPUT, ids=[c for c, _ in BAD_INPUT])
def test_bad_input_one_line_exit_2_no_outputs(scene, tmp_path, capsys, case, words):
    root, mesh = scene
    mesh = _break(case, root, mesh, tmp_path)
    out = tmp_path / "out"
    rc = cli.main(["run", "--scene", str(root), "--mesh", str(mesh), "--out", str(out)], estimator_factory=FakeEstimator)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("chunkpose: error: ") and words in err[0]
    assert err[0].endswith(")")  # ... (<how to fix>)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bad_input_through_a_real_process(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "chunkpose", "run", "--scene", str(tmp_path / "nope"),
                           "--mesh", str(tmp_path / "m.obj"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=Path(cli.__file__).parents[2])
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("chunkpose: error: scene folder") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_usage_errors_are_one_line_too(capsys):
    assert cli.main(["run", "--budget-gb", "-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budget-gb" in err[0]
    assert cli.main(["run", "--mesh", "m.obj"]) == 2
    assert "exactly one of --scene" in capsys.readouterr().err


def test_ctrl_c_keeps_finished_frames_and_a_valid_report(scene, tmp_path, capsys):
    root, mesh = scene
    out = tmp_path / "out"
    FakeEstimator.interrupt_on_call = 2
    rc = cli.main(["run", "--scene", str(root), "--mesh", str(mesh), "--out", str(out), "--json"],
                  estimator_factory=FakeEstimator)
    assert rc == 130
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["interrupted"] is True and report["summary"]["frames_done"] == 2
    assert sorted(p.name for p in (out / "ob_in_cam").iterdir()) == ["000000.txt", "000001.txt"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["interrupted"] is True
    assert _leftovers(tmp_path) == []


def test_bop_run_writes_results_csv_in_millimetres(tmp_path, capsys):
    dataset = tmp_path / "lm"
    write_bop(dataset)
    write_mesh(dataset / "models" / "obj_000001.ply", size=50.0)  # BOP models are in mm
    write_mesh(dataset / "models" / "obj_000005.ply", size=50.0)
    out = tmp_path / "out"
    rc = cli.main(["run", "--bop", str(dataset), "--scene-id", "2", "--out", str(out), "--json"],
                  estimator_factory=FakeEstimator)
    assert rc == 0
    assert FakeEstimator.instances[0].mesh.diameter == pytest.approx(0.05 * np.sqrt(1 + 0.36 + 0.16), rel=1e-4)
    header = (out / "chunkpose_lm-test.csv").read_text().splitlines()[0]
    assert header == "scene_id,im_id,obj_id,score,R,t,time"
    rows = read_bop_csv(out / "chunkpose_lm-test.csv")
    assert len(rows) == 1  # one instance has a non-empty mask_visib
    row = rows[0]
    assert (row["scene_id"], row["im_id"], row["obj_id"]) == (2, 7, 1)
    np.testing.assert_allclose(row["t"], [0, 0, 500.0])
    np.testing.assert_allclose(row["R"], np.eye(3))
    assert row["time"] > 0
    report = json.loads((out / "report.json").read_text())
    frame = report["frames"][0]
    assert frame["frame"] == "000002_000007_000000" and frame["diameter"] == pytest.approx(0.08)
    # estimate t=(0,0,0.5) vs ground truth (0.01,-0.02,0.5) with the same rotation
    assert frame["add"] == pytest.approx(np.hypot(0.01, 0.02))
    assert np.loadtxt(out / "ob_in_cam" / "000002_000007_000000.txt").shape == (4, 4)
    assert (out / "vis" / "000002_000007.png").is_file()
    assert report["masks"] == "mask_visib" and report["scene_ids"] == [2]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results_csv"].endswith(".csv")


def test_bop_without_scene_id_runs_every_scene_and_names_a_missing_split(tmp_path, capsys):
    dataset = tmp_path / "lm"
    write_bop(dataset)
    write_mesh(dataset / "models" / "obj_000001.ply", size=50.0)
    write_mesh(dataset / "models" / "obj_000005.ply", size=50.0)
    out = tmp_path / "out"
    assert cli.main(["run", "--bop", str(dataset), "--out", str(out)], estimator_factory=FakeEstimator) == 0
    assert json.loads((out / "report.json").read_text())["scene_ids"] == [2]
    assert cli.main(["run", "--bop", str(dataset), "--split", "val", "--out", str(tmp_path / "o2")],
                    estimator_factory=FakeEstimator) == 2
    assert "val" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_budget_too_small_says_which_budget_to_pass(scene, tmp_path, capsys):
    from chunkpose import BudgetTooSmall

    class TooSmall(FakeEstimator):
        def register(self, *a):
            raise BudgetTooSmall("budget 0.001 GiB is below the minimum 0.250 GiB register needs; pass budget_gb>=0.25",
                                 minimum_bytes=2**28)

    root, mesh = scene
    out = tmp_path / "out"
    rc = cli.main(["run", "--scene", str(root), "--mesh", str(mesh), "--out", str(out), "--budget-gb", "0.001"],
                  estimator_factory=TooSmall)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].endswith("(pass --budget-gb 0.25 or more)")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_input_errors_are_one_line_and_bugs_keep_their_traceback(scene, tmp_path, capsys):
    from chunkpose.errors import InputError

    class Picky(FakeEstimator):
        def track(self, *a):
            raise InputError("depth: contains NaN (replace NaN with 0 = missing)")

    root, mesh = scene
    rc = cli.main(["run", "--scene", str(root), "--mesh", str(mesh), "--out", str(tmp_path / "out")],
                  estimator_factory=Picky)
    assert rc == 2 and capsys.readouterr().err.strip() == "chunkpose: error: depth: contains NaN (replace NaN with 0 = missing)"
    assert not (tmp_path / "out").exists()

    class Buggy(FakeEstimator):
        def track(self, *a):
            raise ValueError("operands could not be broadcast together")  # a bug, not the user's input

    with pytest.raises(ValueError, match="broadcast"):
        cli.main(["run", "--scene", str(root), "--mesh", str(mesh), "--out", str(tmp_path / "out2")],
                 estimator_factory=Buggy)
    assert not (tmp_path / "out2").exists()


def test_debug_3_and_downscale(scene, tmp_path):
    root, mesh = scene
    out = tmp_path / "out"
    seen = []

    class Recording(FakeEstimator):
        def register(self, rgb, depth, K, mask):
            seen.append((rgb.shape, K.copy()))
            return super().register(rgb, depth, K, mask)

    rc = cli.main(["run", "--scene", str(root), "--mesh", str(mesh), "--out", str(out), "--debug", "3",
                   "--downscale", "0.5", "--zfar", "0.55"], estimator_factory=Recording)
    assert rc == 0
    assert seen[0][0] == (24, 32, 3) and seen[0][1][0, 0] == pytest.approx(25.0)
    for name in ("000000", "000001", "000002"):
        assert (out / "debug" / name / "scene_raw.ply").is_file() and (out / "debug" / name / "model_tf.obj").is_file()
    assert (out / "debug" / "000000" / "ob_mask.png").is_file()
    assert cv2.imread(str(out / "vis" / "000001.png")).shape == (24, 32, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["zfar"] == 0.55 and report["frames"][0]["input_resize"] == 0.5


def test_bop_mesh_override_and_obj_filter(tmp_path):
    dataset = tmp_path / "lm"
    write_bop(dataset)  # no models/obj_*.ply: --mesh provides the model
    out = tmp_path / "out"
    mesh = write_mesh(tmp_path / "m.obj")
    assert cli.main(["run", "--bop", str(dataset), "--scene-id", "2", "--mesh", str(mesh), "--obj-id", "1",
                     "--out", str(out)], estimator_factory=FakeEstimator) == 0
    assert len(read_bop_csv(next(out.glob("*.csv")))) == 1
    assert cli.main(["run", "--bop", str(dataset), "--scene-id", "2", "--out", str(tmp_path / "o2")],
                    estimator_factory=FakeEstimator) == 2  # models missing and no --mesh


def test_foundationpose_demo_flags_are_accepted(scene, tmp_path):
    root, mesh = scene
    out = tmp_path / "dbg"
    rc = cli.main(["run", "--test_scene_dir", str(root), "--mesh_file", str(mesh), "--est_refine_iter", "3",
                   "--track_refine_iter", "1", "--debug_dir", str(out), "--frames", "1"], estimator_factory=FakeEstimator)
    assert rc == 0 and (out / "ob_in_cam" / "000000.txt").is_file()
    assert FakeEstimator.instances[0].kwargs["refine_iterations"] == 3


def test_bench_with_an_unknown_name_is_a_usage_error(capsys):
    assert cli.main(["bench", "no_such_benchmark"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chunkpose: error: ") and len(err.splitlines()) == 1


def test_default_weights_folder_as_upstreams_demo(tmp_path, monkeypatch, capsys):
    """No --weights: ./weights with both official run folders is used (where upstream's demo
    loads them), else the geometric pair; --weights none always gives the geometric pair."""
    import argparse

    from chunkpose.cli.calls import resolve_default_weights
    from chunkpose.models.checkpoint import REFINER_RUN, SCORER_RUN

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(weights=None)
    resolve_default_weights(args)
    assert args.weights is None and capsys.readouterr().err == ""
    for run in (REFINER_RUN, SCORER_RUN):
        (tmp_path / "weights" / run).mkdir(parents=True)
        (tmp_path / "weights" / run / "model_best.pth").write_bytes(b"")
    resolve_default_weights(args)
    assert args.weights == Path("weights") and "using FoundationPose's weights" in capsys.readouterr().err
    args = argparse.Namespace(weights=Path("none"))
    resolve_default_weights(args)
    assert args.weights is None
