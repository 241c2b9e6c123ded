"""CI smoke run of the benchmarks: both scripts in --quick mode (run side by side, one per
core) into a temporary folder; the outputs exist, parse, and say what the full reports say."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gl  # the synthetic scenes are drawn with OpenGL

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("vram_vs_speed", "accuracy_vs_scale")
GIB = 2**30


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (exit code, stderr, output folder), both scripts started at once."""
    procs = {}
    for name in SCRIPTS:
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--device", "cpu", "--out", str(out)]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    results = {}
    for name, (proc, out) in procs.items():
        _, err = proc.communicate(timeout=600)
        results[name] = (proc.returncode, err, out)
    return results


def outputs(runs, name):
    rc, err, out = runs[name]
    assert rc in (0, 1), err[-3000:]  # 1: a budget was exceeded (checked below)
    stem = f"{name}_quick"
    paths = {ext: out / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0, path
    return json.loads(paths["json"].read_text()), paths["md"].read_text(), paths["png"]


def table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]  # header, rule


def check_png(path: Path):
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def check_provenance(payload: dict, md: str, name: str):
    env = payload["environment"]
    for key in ("command", "torch", "cuda", "cpu", "python"):
        assert key in env
    assert f"benchmarks/{name}.py" in env["command"] and "--quick" in env["command"]
    assert f"command: `{env['command']}`" in md
    assert f"torch {env['torch']}" in md and "machine: `" in md


def test_vram_vs_speed_quick(runs):
    payload, md, png = outputs(runs, "vram_vs_speed")
    check_provenance(payload, md, "vram_vs_speed")
    check_png(png)
    records = {r["case"]: r for r in payload["records"]}
    assert len(table_rows(md)) == len(payload["records"])
    unbounded = records["budget unbounded"]
    assert unbounded["status"] == "ok" and unbounded["downscale_factor"] == 1.0
    assert unbounded["register_s"] > 0 and unbounded["add_register_m"] is not None
    for key in ("peak_bytes", "track_s", "chunks"):
        assert unbounded[key], key
    below = [r for c, r in records.items() if "below full-res minimum" in c]
    assert len(below) == 1 and below[0]["status"] == "ok"
    assert 0 < below[0]["downscale_factor"] < 1.0  # the fallback, reported
    for factor in ("0.5", "0.3"):
        small = records[f"downscale {factor} (no budget)"]
        assert small["status"] == "ok" and small["width"] < unbounded["width"]
    naive = records["naive upstream scorer crops"]
    assert naive["measured"] and naive["peak_bytes"] >= naive["predicted_peak_bytes"]  # quick: it fits
    assert "Naive row" in md


def test_vram_vs_speed_quick_every_bounded_budget_holds(runs):
    payload, _, _ = outputs(runs, "vram_vs_speed")
    bounded = [r for r in payload["records"] if r.get("budget_gb") is not None and r["status"] == "ok"]
    assert len(bounded) >= 2
    over = [(r["case"], r["peak_bytes"], int(r["budget_gb"] * GIB)) for r in bounded if r["peak_bytes"] > r["budget_gb"] * GIB]
    assert not over, f"measured peak above the budget (case, peak, budget): {over}"
    assert runs["vram_vs_speed"][0] == 0


def test_accuracy_vs_scale_quick(runs):
    payload, md, png = outputs(runs, "accuracy_vs_scale")
    assert runs["accuracy_vs_scale"][0] == 0
    check_provenance(payload, md, "accuracy_vs_scale")
    check_png(png)
    scales = sorted({r["scale"] for r in payload["records"]})
    assert scales == [0.5, 1.0]
    for r in payload["records"]:
        assert r["add_m"] >= r["adds_m"] >= 0 and r["diameter_m"] > 0
    rows = table_rows(md)
    assert len(rows) == len(payload["summary"]) == 2 * len(scales)  # one footprint, then "all"
    for row in rows:
        assert re.fullmatch(r"[0-9.]+|all", row[0])
        assert 0.0 <= float(row[7]) <= 1.0 and 0.0 <= float(row[8]) <= 1.0  # recalls
