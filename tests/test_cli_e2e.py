"""End to end with the real estimator on small synthetic scenes written by chunkpose.synth:
YCBInEOAT (register + track) and BOP (register each instance), and the demo command."""
import functools
import json

import cv2
import numpy as np
import pytest

from chunkpose import cli
from chunkpose.io.results import read_bop_csv

synth = pytest.importorskip("chunkpose.synth")

W, H = 320, 240
# A third of FoundationPose's 252 rotation hypotheses keeps these CPU tests quick (the
# command line itself always uses the estimator's default); objects of a clear size.
FAST = dict(hypotheses=84)
FAST_ARGS = ["--device", "cpu", "--budget-gb", "0.5"]
FOOTPRINT = 0.08


def _estimator_factory(**fixed):
    from chunkpose import PoseEstimator

    return functools.partial(PoseEstimator, **fixed)


def _mesh_file(scene, folder):
    path = folder / "mesh.obj"
    scene.mesh.trimesh.export(path)
    return path


@pytest.fixture(scope="module")
def ycb_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("ycb")
    scene = synth.make_scene(width=W, height=H, frames=2, footprint=FOOTPRINT, seed=1)
    scene.save(root / "scene", layout="ycbineoat")
    return scene, root / "scene", _mesh_file(scene, root)


def test_run_ycbineoat_end_to_end(ycb_scene, tmp_path, capsys):
    scene, scene_dir, mesh = ycb_scene
    out = tmp_path / "out"
    rc = cli.main(["run", "--scene", str(scene_dir), "--mesh", str(mesh), "--out", str(out), "--json", "--debug", "2",
                   *FAST_ARGS], estimator_factory=_estimator_factory(**FAST))
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames_done"] == 2 and summary["peak_bytes"] <= summary["budget_bytes"]
    report = json.loads((out / "report.json").read_text())
    diameter = scene.mesh.diameter
    names = sorted(p.stem for p in (scene_dir / "rgb").iterdir())
    for name, gt, rec in zip(names, scene.poses, report["frames"]):
        pose = np.loadtxt(out / "ob_in_cam" / f"{name}.txt")
        np.testing.assert_allclose(pose, rec["pose"], atol=1e-6)
        assert np.linalg.norm(pose[:3, 3] - gt[:3, 3]) < 0.1 * diameter
        assert rec["add_s"] < 0.1 * diameter, rec
        assert cv2.imread(str(out / "vis" / f"{name}.png")).shape == (H, W, 3)
    assert (out / "debug" / names[0] / "scene_raw.ply").is_file() and (out / "debug" / names[0] / "model_tf.obj").is_file()
    assert report["frames"][0]["chunk_plan"]  # the engine's stages are reported


def test_run_bop_end_to_end(tmp_path, capsys):
    scene = synth.make_scene(width=W, height=H, frames=1, footprint=FOOTPRINT, seed=2)
    dataset = tmp_path / "synthbop"
    scene.save(dataset, layout="bop")
    scene_dirs = sorted((dataset / "test").iterdir())
    assert scene_dirs, "synth wrote no BOP scene"
    scene_id = int(scene_dirs[0].name)
    out = tmp_path / "out"
    rc = cli.main(["run", "--bop", str(dataset), "--scene-id", str(scene_id), "--out", str(out), "--json",
                   *FAST_ARGS], estimator_factory=_estimator_factory(**FAST))
    assert rc == 0
    json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    csvs = list(out.glob("*.csv"))
    assert len(csvs) == 1
    rows = read_bop_csv(csvs[0])
    assert len(rows) == 1
    gt = scene.poses[0]
    assert np.linalg.norm(rows[0]["t"] / 1000.0 - gt[:3, 3]) < 0.1 * scene.mesh.diameter
    report = json.loads((out / "report.json").read_text())
    assert report["frames"][0]["add_s"] < 0.1 * scene.mesh.diameter


@pytest.mark.slow
def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--width", str(W), "--height", str(H), "--frames", "2", "--out", str(out), "--json",
                   *FAST_ARGS], estimator_factory=_estimator_factory(**FAST))
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["command"] == "demo" and summary["frames_done"] == 2
    assert summary["add_s_mean"] is not None and summary["peak_bytes"] <= summary["budget_bytes"]
    assert (out / "report.json").is_file() and (out / "vis" / "000000.png").is_file()


@pytest.mark.slow
def test_demo_full_resolution_under_three_minutes(tmp_path):
    """The README's main job: 3072x2048, 252 hypotheses, 1 GiB budget, < 3 min on 2 CPU cores."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "demo"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "chunkpose", "demo", "--out", str(out), "--json", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=Path(cli.__file__).parents[2])
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["width"] == 3072 and summary["height"] == 2048 and summary["downscale_factor"] == 1.0
    assert summary["peak_bytes"] <= summary["budget_bytes"] == 2**30
    assert summary["frames"][0]["add_s"] < 0.1 * json.loads((out / "report.json").read_text())["mesh_diameter"]
    assert elapsed < 180, f"demo took {elapsed:.0f} s"
