"""`torchrun --nproc-per-node=2 -m chunkpose run` on a synthetic BOP set and on two short
videos: the merged folder equals a single-process run's (ob_in_cam/, vis/, the results CSV
but for its time column, report.json's frames), every unit is done exactly once, and the
report says which rank did what. The estimator is tests/distributed_cli.py's stand-in, so
that the check is of the run's plumbing, not of pose estimation (tests/test_cli_e2e.py)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bop_synthetic import make_scenes, write_sets
from chunkpose import cli
from distributed_cli import InputPose

pytestmark = pytest.mark.gl

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "distributed_cli.py"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun(*argv, nproc=2):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(LAUNCHER.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(LAUNCHER), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def files_of(folder: Path) -> dict:
    """Every output file's bytes, except those whose content has timings (report, CSV)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "report.json" and p.suffix != ".csv"}


def frames_of(folder: Path) -> list:
    keep = ("frame", "scene", "stage", "pose", "score", "scene_id", "im_id", "obj_id", "gt_index", "add")
    report = json.loads((folder / "report.json").read_text())
    return [{k: f.get(k) for k in keep} for f in report["frames"]]


def csv_rows(path: Path) -> list:
    with path.open() as f:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def bop_set(tmp_path_factory):
    return write_sets(make_scenes(), tmp_path_factory.mktemp("bopdist"))


def test_bop_images_over_two_ranks_equal_one_process(bop_set, tmp_path):
    _, run_root, detections = bop_set
    args = ["run", "--bop", str(run_root), "--detections", str(detections)]
    single, spread = tmp_path / "single", tmp_path / "spread"
    assert cli.main([*args, "--out", str(single)], estimator_factory=InputPose) == 0
    result = torchrun(*args, "--out", str(spread), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_of(spread) == files_of(single) and files_of(single)
    assert frames_of(spread) == frames_of(single)
    name = "chunkpose_ycbv-test.csv"
    assert csv_rows(spread / name) == csv_rows(single / name) and len(csv_rows(single / name)) == 2
    dist = json.loads((spread / "report.json").read_text())["distributed"]
    assert dist["world_size"] == 2 and dist["units_total"] == 3 and dist["units_done"] == 3
    assert sum(rank["units"] for rank in dist["ranks"]) == 3  # every target image exactly once
    assert json.loads(result.stdout.strip().splitlines()[-1])["world_size"] == 2
    # the same command again: the shards hold every image, nothing is redone
    again = torchrun(*args, "--out", str(spread))
    assert again.returncode == 0, again.stderr[-3000:]
    assert files_of(spread) == files_of(single)


def test_videos_over_two_ranks_equal_one_process(tmp_path):
    from chunkpose.synth import make_scene

    scenes = tmp_path / "scenes"
    for name, seed in (("a", 1), ("b", 2)):
        make_scene(mesh="mug", width=96, height=72, frames=3, footprint=0.1, seed=seed).save(scenes / name)
    single, spread = tmp_path / "single", tmp_path / "spread"
    assert cli.main(["run", "--scenes", str(scenes), "--out", str(single)], estimator_factory=InputPose) == 0
    result = torchrun("run", "--scenes", str(scenes), "--out", str(spread))
    assert result.returncode == 0, result.stderr[-3000:]
    files = files_of(single)
    assert sorted(files) == sorted(f"{s}/{kind}/{i:06d}.{ext}" for s in "ab" for kind, ext in
                                   (("ob_in_cam", "txt"), ("vis", "png")) for i in range(3))
    assert files_of(spread) == files
    assert frames_of(spread) == frames_of(single)
    assert [f["scene"] for f in frames_of(single)] == ["a"] * 3 + ["b"] * 3
