"""The GPU verification script's dry run (--device cpu --quick): every step runs, passes and
leaves its outputs where the GPU run will, so the one prepared GPU run cannot break unseen."""
import csv
import json
import subprocess
from pathlib import Path

import pytest

# OpenGL draws the synthetic scenes; slow (about a minute): it runs every benchmark step again,
# so it belongs to `make test-all`, which is run before a GPU session
pytestmark = [pytest.mark.gl, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    steps = {row["step"]: row for row in csv.DictReader((out / "steps.tsv").open(), delimiter="\t")}
    logs = {name: (out / row["log"]).read_text()[-1500:] for name, row in steps.items() if row["rc"] != "0"}
    assert proc.returncode == 0 and not logs, (proc.stderr[-2000:], logs)
    assert list(steps) == ["environment", "ext_backend", "tests_cuda", "sweep_geometric", "sweep_learned",
                           "plan_accuracy", "several_objects"]
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] and "cuda_available" in env
    for stem in ("vram_vs_speed_quick", "vram_vs_speed_learned_quick", "plan_accuracy_quick", "several_objects_quick"):
        for ext in ("json", "md"):
            assert (out / "results" / f"{stem}.{ext}").stat().st_size > 0, stem
    learned = json.loads((out / "results" / "vram_vs_speed_learned_quick.json").read_text())
    assert learned["settings"]["path"] == "learned"
    unbounded = next(r for r in learned["records"] if r["case"] == "budget unbounded")
    assert unbounded["status"] == "ok" and "alloc_retries" in unbounded
    assert all("gpu_s" in stage for stage in unbounded["chunks"].values())
    assert (out / "tests_cuda.xml").is_file()
