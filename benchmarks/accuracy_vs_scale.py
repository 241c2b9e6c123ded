"""Where full resolution matters: pose error against object size in the image, at full
resolution and at the downscale factors users are told to apply (0.5, 0.3).

    python benchmarks/accuracy_vs_scale.py            # 3072x2048, the documented sweep
    python benchmarks/accuracy_vs_scale.py --quick    # smoke run, seconds

Every (footprint, seed, mesh) scene is registered at each scale under the same budget;
errors (ADD, ADD-S) are measured in metres in the original camera against ground truth.
Writes a markdown table, a PNG plot and the raw JSON under benchmarks/results/<machine>/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_common_args, apply_quick, environment, header_lines, markdown_table,  # noqa: E402
                    measure_and_report, stamp_figure, write_markdown)
from _scenes import make_estimator, resize_frames, synthetic_frames  # noqa: E402

from chunkpose.metrics import add_error, adds_error, recall_at_diameter  # noqa: E402
from chunkpose.shapes import builtin_meshes  # noqa: E402


def register_once(frames, scale: float, args) -> dict:
    if scale != 1.0:
        frames = resize_frames(frames, scale)
    est = make_estimator(frames.mesh, args.budget_gb, args.device, args)
    t0 = time.perf_counter()
    res = est.register(frames.rgb[0], frames.depth[0], frames.K, frames.masks[0])
    seconds = time.perf_counter() - t0
    gt = frames.poses[0]
    return {
        "scale": scale, "seconds": seconds, "peak_bytes": res.report.peak_bytes,
        "downscale_factor": res.report.downscale_factor,
        "add_m": add_error(res.pose, gt, frames.model_points),
        "adds_m": adds_error(res.pose, gt, frames.model_points),
        "diameter_m": frames.diameter, "object_pixels": int(frames.masks[0].sum()),
    }


def _row(label, scale, group: list[dict]) -> list:
    add = np.array([r["add_m"] for r in group])
    adds = np.array([r["adds_m"] for r in group])
    diam = np.array([r["diameter_m"] for r in group])
    return [
        label, scale, len(group), int(np.median([r["object_pixels"] for r in group])),
        round(float(np.median(add)) * 1000, 3), round(float(np.median(add / diam)), 4), round(float(np.median(adds / diam)), 4),
        recall_at_diameter(add, diam), recall_at_diameter(adds, diam),
        round(float(np.median([r["seconds"] for r in group])), 2),
        round(max(r["peak_bytes"] for r in group) / 2**20, 1), min(r["downscale_factor"] for r in group),
    ]


def summarise(records: list[dict], footprints, scales) -> list[list]:
    """One row per (footprint, scale), then one per scale over all footprints ("all")."""
    rows = []
    for fp in [*footprints, "all"]:
        for scale in scales:
            group = [r for r in records if (fp == "all" or r["footprint"] == fp) and r["scale"] == scale]
            if group:
                rows.append(_row(fp, scale, group))
    return rows


COLUMNS = ["footprint", "scale", "n", "median object px (at this scale)", "median ADD (mm)", "median ADD / diameter",
           "median ADD-S / diameter", "ADD recall@0.1d", "ADD-S recall@0.1d", "median register s", "max peak MiB",
           "engine downscale (min)"]


def plot(rows: list[list], path: Path, title: str, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r for r in rows if r[0] != "all"]
    for scale in sorted({r[1] for r in rows}, reverse=True):
        sel = [r for r in rows if r[1] == scale]
        label = "full resolution" if scale == 1.0 else f"downscale {scale}"
        line, = axes[0].plot([r[0] for r in sel], [r[7] for r in sel], "o-", label=f"{label}, ADD")
        axes[0].plot([r[0] for r in sel], [r[8] for r in sel], "s--", color=line.get_color(), label=f"{label}, ADD-S")
        axes[1].plot([r[0] for r in sel], [r[5] for r in sel], "o-", color=line.get_color(), label=f"{label}, ADD")
        axes[1].plot([r[0] for r in sel], [r[6] for r in sel], "s--", color=line.get_color(), label=f"{label}, ADD-S")
    axes[0].set_ylabel("recall at 0.1 diameter")
    axes[0].set_ylim(-0.05, 1.05)
    axes[1].set_ylabel("median error / diameter")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("object footprint (fraction of the full frame)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    stamp_figure(fig, env)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--footprints", default="0.005,0.01,0.03,0.1,0.2")
    p.add_argument("--scales", default="1.0,0.5,0.3")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--meshes", default="all", help="comma-separated builtin mesh names, or 'all'")
    p.add_argument("--budget-gb", type=float, default=1.0)
    args = p.parse_args(argv)
    apply_quick(args)
    if args.quick:
        args.seeds, args.footprints, args.scales = 1, "0.1", "1.0,0.5"
        if args.meshes == "all":
            args.meshes = "drill"  # not symmetric: ADD means something
    return args


def measure(args) -> dict:
    """Register every (footprint, seed, mesh) scene at every scale; the raw payload."""
    env = environment(args.device)
    footprints = [float(x) for x in args.footprints.split(",")]
    scales = [float(x) for x in args.scales.split(",")]
    meshes = builtin_meshes()
    names = list(meshes) if args.meshes == "all" else args.meshes.split(",")
    unknown = [n for n in names if n not in meshes]
    if unknown:
        raise SystemExit(f"--meshes: unknown builtin mesh(es) {unknown}; choose from {sorted(meshes)}")
    records = []
    jobs = [(fp, seed, name) for fp in footprints for seed in range(args.seeds) for name in names]
    for fp, seed, name in tqdm(jobs, desc="accuracy_vs_scale", unit="scene"):
        frames = synthetic_frames(args.width, args.height, 1, seed, mesh=meshes[name], footprint=fp)
        for scale in scales:
            record = register_once(frames, scale, args)
            record.update(footprint=fp, seed=seed, mesh=name)
            records.append(record)
    return {"environment": env, "settings": vars(args), "records": records,
            "summary": summarise(records, footprints, scales)}


def write_reports(payload: dict, out: Path, stem: str) -> None:
    env, settings = payload["environment"], payload["settings"]
    rows = summarise(payload["records"], [float(x) for x in settings["footprints"].split(",")],
                     [float(x) for x in settings["scales"].split(",")])
    names = sorted({r["mesh"] for r in payload["records"]})
    title = (f"{settings['width']}x{settings['height']}, {len(names)} meshes ({', '.join(names)}) x "
             f"{settings['seeds']} seeds, budget {settings['budget_gb']} GiB, {settings['hypotheses']} hypotheses, "
             f"{settings['refine_iters']} iterations, on {env.get('gpu', env['cpu'])}")
    plot(rows, out / f"{stem}.png", title, env)
    md = [f"# Accuracy versus scale: {title}", "", *header_lines(env), "", markdown_table(COLUMNS, rows), "",
          "Footprint: the object's share of the image area. Errors in the original camera, metres, "
          "relative to the object diameter. Downscaled rows resize rgb/depth/mask (nearest) and K.",
          f"![plot]({stem}.png)", ""]
    write_markdown(out / f"{stem}.md", md)


def main(argv=None) -> int:
    args = parse_args(argv)
    measure_and_report("accuracy_vs_scale", args, measure, write_reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
