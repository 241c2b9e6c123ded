"""The demo's object: a fixed asymmetric builtin by default, --mesh NAME or FILE otherwise
(with the fake estimator of test_cli, so only the command's own choices are checked)."""
import json

import pytest
import trimesh

from chunkpose import cli
from test_cli import FakeEstimator

pytestmark = pytest.mark.gl


def _demo(tmp_path, capsys, *extra):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--width", "96", "--height", "64", "--frames", "1", "--out", str(out), "--json",
                   "--device", "cpu", *extra], estimator_factory=FakeEstimator)
    return rc, out, capsys.readouterr()


def test_builtin_names_match_the_shapes_module():
    from chunkpose.shapes import BUILDERS

    assert tuple(sorted(BUILDERS)) == cli.DEMO_BUILTINS and cli.DEMO_MESH in cli.DEMO_BUILTINS


def test_default_demo_object_is_the_same_asymmetric_builtin_for_every_seed(tmp_path, capsys):
    for seed in ("0", "3"):
        rc, out, _ = _demo(tmp_path / seed, capsys, "--seed", seed)
        assert rc == 0
        report = json.loads((out / "report.json").read_text())
        assert report["mesh"] == cli.DEMO_MESH == "drill"


def test_demo_mesh_by_name_and_by_file(tmp_path, capsys):
    rc, out, _ = _demo(tmp_path / "a", capsys, "--mesh", "duck")
    assert rc == 0 and json.loads((out / "report.json").read_text())["mesh"] == "duck"
    path = tmp_path / "box_mm.obj"
    trimesh.creation.box(extents=[80.0, 50.0, 30.0]).export(path)
    rc, out, _ = _demo(tmp_path / "b", capsys, "--mesh", str(path), "--mesh-scale", "0.001")
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mesh"] == str(path) and abs(report["mesh_diameter"] - 0.099) < 0.001
    assert abs(FakeEstimator.instances[-1].mesh.diameter - 0.099) < 0.001


def test_demo_mesh_errors_are_one_line(tmp_path, capsys):
    rc, out, cap = _demo(tmp_path, capsys, "--mesh", str(tmp_path / "missing.obj"))
    assert rc == 2 and "--mesh" in cap.err and len(cap.err.strip().splitlines()) == 1 and not out.exists()
    path = tmp_path / "box_mm.obj"
    trimesh.creation.box(extents=[80.0, 50.0, 30.0]).export(path)
    rc, out, cap = _demo(tmp_path, capsys, "--mesh", str(path))
    assert rc == 2 and "millimetres" in cap.err and not out.exists()
