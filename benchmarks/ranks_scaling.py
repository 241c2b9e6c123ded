"""Dataset-parallel scaling: `torchrun --nproc-per-node=N -m chunkpose run --scenes DIR` with N ranks
against one, on the same synthetic videos, measured in one run.

    python benchmarks/ranks_scaling.py                    # 4 videos x 6 frames at 640x480, 1 and 2 ranks
    python benchmarks/ranks_scaling.py --quick            # 2 videos x 3 frames at 160x120

Each rank gets cores / N torch threads (OMP_NUM_THREADS), so a rank count never has more cores
than another. Images per second are the run's frames over the command's wall-clock time (torchrun's
start and rank 0's merge included); per rank, the units (videos) it claimed, its busy seconds and
its peak memory come from the merged report.json. The outputs of every run are compared with
the first run's (the same frames, largest pose difference). On CUDA, each rank uses cuda:LOCAL_RANK.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (apply_quick, environment, header_lines, markdown_table, measure_and_report,  # noqa: E402
                    write_markdown)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
QUICK = {"videos": 2, "frames": 3, "width": 160, "height": 120, "refine_iters": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"smoke run ({QUICK})")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=6, help="frames per video (1 registration + tracking)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--budget-gb", type=float, default=2.0)
    p.add_argument("--refine-iters", type=int, default=5, help="refiner iterations at registration")
    p.add_argument("--out", help="output folder (default benchmarks/results/<machine>/)")
    p.add_argument("--from-json", metavar="FILE", help="measure nothing: redraw the table of a saved run")
    args = p.parse_args(argv)
    apply_quick(args, QUICK)
    args.rank_counts = [int(n) for n in args.ranks.split(",")]
    return args


def make_videos(folder: Path, args) -> None:
    from chunkpose.synth import make_scene

    meshes = ("mug", "duck", "drill", "blocks")
    for i in tqdm(range(args.videos), desc="synthetic videos"):
        make_scene(mesh=meshes[i % len(meshes)], width=args.width, height=args.height, frames=args.frames,
                   footprint=0.1, seed=10 + i).save(folder / f"video{i}")


def run_ranks(n: int, videos: Path, out: Path, args) -> dict:
    """One `torchrun -m chunkpose run --scenes` with n ranks: wall time and the merged report."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n)) if args.device == "cpu" else "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "chunkpose",
           "run", "--scenes", str(videos), "--out", str(out), "--device", args.device,
           "--budget-gb", str(args.budget_gb), "--refine-iters", str(args.refine_iters)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{n} ranks failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    dist = report["distributed"]
    ranks = [{k: r.get(k) for k in ("rank", "units", "busy_seconds", "units_per_second", "peak_bytes")}
             for r in dist["ranks"]]
    return {"ranks": n, "threads_per_rank": int(env["OMP_NUM_THREADS"]), "wall_s": wall,
            "images": len(report["frames"]), "images_per_s": len(report["frames"]) / wall, "per_rank": ranks}


def poses_of(out: Path) -> dict:
    import numpy as np

    return {str(p.relative_to(out)): np.loadtxt(p) for p in sorted(out.rglob("ob_in_cam/*.txt"))}


def largest_difference(poses: dict, reference: dict) -> dict:
    """The largest translation (mm) and rotation-matrix entry difference from the reference run's
    poses; the same frames must be there. Thread counts differ between rank counts, so float
    reductions may differ in their last bits."""
    import numpy as np

    if sorted(poses) != sorted(reference):
        return {"same_frames": False, "translation_mm": None, "rotation": None}
    dt = max(float(np.abs(poses[k][:3, 3] - reference[k][:3, 3]).max()) for k in poses) * 1000
    dr = max(float(np.abs(poses[k][:3, :3] - reference[k][:3, :3]).max()) for k in poses)
    return {"same_frames": True, "translation_mm": dt, "rotation": dr}


def measure(args) -> dict:
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_videos(tmp / "videos", args)
        reference = None
        for n in tqdm(args.rank_counts, desc="rank counts"):
            out = tmp / f"ranks{n}"
            record = run_ranks(n, tmp / "videos", out, args)
            poses = poses_of(out)
            reference = reference or poses
            record["difference_from_first"] = largest_difference(poses, reference)
            records.append(record)
    base = records[0]["images_per_s"]
    for record in records:
        record["speedup"] = record["images_per_s"] / base
    settings = {k: getattr(args, k) for k in ("videos", "frames", "width", "height", "budget_gb", "device")}
    return {"environment": environment(args.device), "settings": settings, "records": records}


def _difference_text(d: dict) -> str:
    if not d["same_frames"]:
        return "DIFFERENT FRAMES"
    return f"{d['translation_mm']:.2g} mm, R {d['rotation']:.1g}"


def write_reports(payload: dict, out: Path, stem: str) -> list:
    s = payload["settings"]
    rows = []
    for r in payload["records"]:
        per_rank = "; ".join(f"rank {p['rank']}: {p['units']} videos, {p['busy_seconds']:.1f} s busy, "
                             f"peak {(p['peak_bytes'] or 0) / 2**20:.0f} MiB" for p in r["per_rank"])
        rows.append([r["ranks"], r["threads_per_rank"], r["images"], r["wall_s"], r["images_per_s"], r["speedup"],
                     _difference_text(r["difference_from_first"]), per_rank])
    lines = [f"# Dataset-parallel scaling: {s['videos']} videos x {s['frames']} frames at {s['width']}x{s['height']}",
             "", *header_lines(payload["environment"]),
             f"- budget {s['budget_gb']} GiB per rank, device {s['device']}", "",
             markdown_table(["ranks", "threads/rank", "images", "wall s", "images/s", "x 1 rank",
                             "poses vs 1 rank", "per rank"], rows), "",
             "Wall time is the whole torchrun command (start, rendezvous, work, rank 0's merge); "
             "compare ratios within this table only."]
    path = out / f"{stem}.md"
    write_markdown(path, lines)
    return [path]


def main(argv=None) -> int:
    args = parse_args(argv)
    measure_and_report("ranks_scaling", args, measure, write_reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
